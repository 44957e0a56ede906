"""The audio backends as LocalAI external backends (``inferd-localai --backend NAME --addr ...``).

Each backend is started the way LocalAI starts one (subprocess, ``--addr``, Health polled until
``OK``, nothing loaded before LoadModel), loaded with the fields LocalAI sends, then called the
way LocalAI calls it: TTS to a file then TTSStream (JSON sample rate first, then PCM),
AudioTranscription on that file (segments in nanoseconds), VAD on float32 16 kHz, and the Opus
rpcs with ``session_id`` as its realtime API does. ``INFERD_AUDIO_DIR`` is set for the piper and
whisper processes, so the confinement is exercised end to end from the environment.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("av", reason="the audio extra is not installed (pip install 'inferd[audio]')")

from inferd.engines.audio import packaged  # noqa: E402
from inferd.engines.audio.files import load_audio  # noqa: E402
from inferd.errors import LoadError  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from tests.test_localai_compat import localai_backend  # noqa: E402


def _require(fn) -> Path:
    try:
        return fn()
    except LoadError as exc:
        pytest.skip(str(exc))  # under CI=true conftest turns this skip into a failure


def _load(stub, options: pb.ModelOptions) -> None:
    assert stub.Status(pb.HealthMessage(), timeout=5).state == pb.StatusResponse.UNINITIALIZED
    result = stub.LoadModel(options, timeout=300)
    assert result.success, result.message
    assert stub.Status(pb.HealthMessage(), timeout=5).state == pb.StatusResponse.READY


def test_piper_and_whisper_under_localai(tmp_path: Path) -> None:
    voice = _require(packaged.piper_voice_model)
    whisper_dir = _require(packaged.whisper_model_dir)
    audio_dir = tmp_path / "generated"
    audio_dir.mkdir()
    env = {"INFERD_AUDIO_DIR": str(audio_dir)}
    dst = audio_dir / "tts-1.wav"
    with localai_backend("piper", tmp_path, "equals", env=env) as (stub, _, _):
        # LocalAI: Model = file name in the models dir, ModelFile = full path, ModelPath = the dir
        _load(stub, pb.ModelOptions(Model=voice.name, ModelFile=str(voice), ModelPath=str(voice.parent), Threads=2))
        assert stub.TTS(pb.TTSRequest(text="Good morning everyone.", dst=str(dst), voice=""), timeout=120).success
        replies = list(stub.TTSStream(pb.TTSRequest(text="Good morning. See you soon."), timeout=120))
        assert json.loads(replies[0].message) == {"sample_rate": 22050}
        assert sum(len(r.audio) for r in replies[1:]) > 22050  # over half a second of s16le
        with pytest.raises(grpc.RpcError) as exc:
            stub.TTS(pb.TTSRequest(text="Hi.", dst=str(tmp_path / "outside.wav")), timeout=60)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "INFERD_AUDIO_DIR" in exc.value.details()
    with wave.open(str(dst)) as w:
        seconds = w.getnframes() / w.getframerate()
    with localai_backend("whisper", tmp_path, env=env) as (stub, _, _):
        _load(stub, pb.ModelOptions(Model="whisper-1", ModelFile=str(whisper_dir / "model.bin"), Threads=2))
        out = stub.AudioTranscription(pb.TranscriptRequest(dst=str(dst), threads=2), timeout=300)
        assert "morning" in out.text.lower()
        assert out.segments and 0 < out.segments[-1].end <= int((seconds + 0.5) * 1e9)  # Go time.Duration
        final = [r.final_result for r in stub.AudioTranscriptionStream(
            pb.TranscriptRequest(dst=str(dst), stream=True), timeout=300) if r.HasField("final_result")]
        assert len(final) == 1 and "morning" in final[0].text.lower()
    with localai_backend("silero-vad", tmp_path) as (stub, _, _):
        _load(stub, pb.ModelOptions(Model="silero-vad"))
        speech = load_audio(dst, 16000)  # realtime.go: 16 kHz int16 -> float32 in [-1, 1]
        gap = np.zeros(16000, dtype=np.float32)
        found = stub.VAD(pb.VADRequest(audio=np.concatenate([gap, speech, gap]).tolist()), timeout=60)
        assert len(found.segments) == 1 and 0.75 < found.segments[0].start < found.segments[0].end < seconds + 1.25


def test_opus_under_localai_needs_no_model(tmp_path: Path) -> None:
    _require(packaged.silero_vad_model)
    with localai_backend("silero-vad", tmp_path) as (stub, _, _):
        # the codec answers before any LoadModel (LocalAI's opus backend has no model)
        t = np.arange(48000) / 48000
        pcm = (0.4 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes()
        enc = stub.AudioEncode(pb.AudioEncodeRequest(pcm_data=pcm, sample_rate=48000, channels=1), timeout=30)
        assert len(enc.frames) == 50 and enc.samples_per_frame == 960
        dec = stub.AudioDecode(pb.AudioDecodeRequest(frames=enc.frames, options={"session_id": "s1"}), timeout=30)
        assert dec.sample_rate == 48000 and abs(len(dec.pcm_data) // 2 - 48000) <= 960
        with pytest.raises(grpc.RpcError) as exc:
            stub.VAD(pb.VADRequest(audio=[0.0] * 512), timeout=30)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # VAD does need the model
