"""``/v1/audio/speech`` (piper) and ``/v1/audio/transcriptions`` (whisper) through the HTTP front.

A round trip with the official client: speech synthesized by the packaged piper voice is
transcribed back by the packaged whisper tiny.en.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from inferd.supervisor.config import ModelSpec, SupervisorConfig  # noqa: E402
from tests.test_http import KEY, Front  # noqa: E402


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    pytest.importorskip("faster_whisper")
    pytest.importorskip("onnxruntime")
    tmp = tmp_path_factory.mktemp("audio-front")
    f = Front(SupervisorConfig(models=(
        ModelSpec("voice", "piper", options={"Threads": 1}, parallel=True),
        ModelSpec("ears", "whisper", options={"Threads": 1}),
    ), run_dir=str(tmp / "run"), stop_grace=2.0))
    try:
        yield f
    finally:
        f.close()


def test_speech_then_transcription_round_trip(front: Front) -> None:
    client = openai.OpenAI(base_url=front.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    speech = client.audio.speech.create(model="voice", voice="", input="Hello world, this is a test.",
                                        response_format="wav")
    audio = speech.read()
    with wave.open(io.BytesIO(audio)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getnframes() / w.getframerate() > 0.5
    verbose: Any = client.audio.transcriptions.create(model="ears", file=("hello.wav", audio, "audio/wav"),
                                                      response_format="verbose_json")
    words = verbose.text.lower()
    assert "hello" in words and "test" in words
    assert verbose.segments and 0 <= verbose.segments[0].start < verbose.segments[0].end < 10


def test_audio_errors(front: Front, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(front.url + "/v1/audio/transcriptions", headers=headers, data={"model": "ears"},
                   files={"file": ("x.wav", b"not audio at all", "audio/wav")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(front.url + "/v1/audio/transcriptions", headers=headers, data={"model": "ears"},
                   files={"file": ("x.wav", b"", "audio/wav")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(front.url + "/v1/audio/speech", headers=headers, json={"model": "ears", "input": "hi"})
    assert r.status_code == 501 and "does not support TTS" in r.json()["error"]["message"]
    r = httpx.post(front.url + "/v1/audio/speech", headers=headers, json={"model": "voice", "input": ""})
    assert r.status_code == 400
