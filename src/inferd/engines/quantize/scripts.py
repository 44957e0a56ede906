"""Where llama.cpp's Python conversion scripts live, and how to run them.

``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their ``conversion`` package and the
matching ``gguf-py`` ship inside the llama-cpp-python sdist (``vendor/llama.cpp``), not in
its wheel. We do not copy third-party code into this repository: ``scripts/setup_env.sh``
extracts them from the sdist of the pinned version into ``<venv>/share/inferd/llama.cpp``
(override with ``INFERD_LLAMA_SCRIPTS``). They run in a subprocess with that ``gguf-py``
first on the path, so the PyPI ``gguf`` package transformers uses is never shadowed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from inferd.engines.jobs.child import JobFailed, JobStopped

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def scripts_dir() -> Path:
    return Path(os.environ.get("INFERD_LLAMA_SCRIPTS") or Path(sys.prefix) / "share" / "inferd" / "llama.cpp")


def script(name: str) -> Path:
    """The path of one script; JobFailed (with the fix) when setup has not extracted it."""
    path = scripts_dir() / name
    if not path.is_file():
        raise JobFailed(
            f"llama.cpp's {name} is not installed at {path}: run scripts/setup_env.sh (it extracts the "
            f"scripts from the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist), or set INFERD_LLAMA_SCRIPTS")
    return path


def run_script(name: str, args: list[str], stop_requested: object = None) -> None:
    """Run a conversion script, its output going to this process's log; fail with its last lines.

    ``stop_requested`` (a ``threading.Event``) ends the script early: JobStopped.
    """
    path = script(name)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(scripts_dir() / "gguf-py"), str(scripts_dir()), env.get("PYTHONPATH", "")) if p)
    sys.stderr.flush()
    proc = subprocess.Popen([sys.executable, str(path), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    last: list[str] = []
    for line in proc.stdout:
        sys.stderr.write(line)
        if line.strip():
            last = (last + [line.strip()])[-4:]
        if stop_requested is not None and stop_requested.is_set():  # type: ignore[attr-defined]
            proc.kill()
            proc.wait()
            raise JobStopped("stopped on request")
    code = proc.wait()
    if code != 0:
        raise JobFailed(f"{name} failed (exit status {code}): {' | '.join(last)}")
