"""The audio backends on their packaged models, over real gRPC: piper -> whisper -> silero-vad.

All audio is made here: piper speaks known sentences, whisper must transcribe them back
(word error rate <= 0.2) and silero-vad must find the speech between a second of silence
on each side. Models load once per module (piper ~1-3 s, whisper ~1-5 s, VAD 0.1 s on
2 cores); tests wrap the loaded backends in fresh servers.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
import wave
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("av", reason="the audio extra is not installed (pip install 'inferd[audio]')")
pytest.importorskip("faster_whisper", reason="the audio extra is not installed (pip install 'inferd[audio]')")
pytest.importorskip("piper", reason="the audio extra is not installed (pip install 'inferd[audio]')")

from inferd.backends.context import CallContext  # noqa: E402
from inferd.backends.piper import PiperBackend  # noqa: E402
from inferd.backends.silero_vad import SileroVadBackend  # noqa: E402
from inferd.backends.transcript_words import read_words  # noqa: E402
from inferd.backends.whisper import WhisperBackend  # noqa: E402
from inferd.client import new_client  # noqa: E402
from inferd.client.errors import RpcError  # noqa: E402
from inferd.engines.audio.files import load_audio  # noqa: E402
from inferd.errors import LoadError  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from tests.helpers import running_server  # noqa: E402
from tests.helpers import test_settings as settings_with  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."
THREE = "The sun rose over the quiet village. Children ran to the river to play. Their parents watched from the hill."


def _load(backend, options: pb.ModelOptions, name: str):
    try:
        backend.load(options, CallContext("LoadModel"))
    except LoadError as exc:
        if "not installed" in str(exc):
            pytest.skip(str(exc))  # under CI=true conftest turns this skip into a failure
        raise
    backend._mark_loaded(name)  # what the runtime does after a successful load
    return backend


@pytest.fixture(scope="module")
def piper() -> PiperBackend:
    # noise_w 0: sentence durations are deterministic, so TTS and TTSStream can be compared.
    backend = _load(PiperBackend(), pb.ModelOptions(Threads=2, Options=["noise_w:0"]), "piper")
    yield backend
    backend._free()


@pytest.fixture(scope="module")
def whisper() -> WhisperBackend:
    backend = _load(WhisperBackend(), pb.ModelOptions(Threads=2, Options=["beam_size:1"]), "whisper")
    yield backend
    backend._free()


@pytest.fixture(scope="module")
def vad() -> SileroVadBackend:
    backend = _load(SileroVadBackend(), pb.ModelOptions(), "silero-vad")
    yield backend
    backend._free()


@pytest.fixture(scope="module")
def speech(piper: PiperBackend, tmp_path_factory) -> Path:
    """SENTENCE spoken by piper, as a WAV file (made in-process; the rpcs are tested below)."""
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    assert piper.tts(pb.TTSRequest(text=SENTENCE, dst=str(path)), CallContext("TTS")).success
    return path


async def _client(server):
    return new_client(f"127.0.0.1:{server.port}", parallel=True)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)] / max(1, len(ref))


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def speech_bounds(samples: np.ndarray, rate: int) -> tuple[float, float]:
    """First and last sample louder than 2 % of full scale, in seconds."""
    loud = np.flatnonzero(np.abs(samples) > 0.02)
    return loud[0] / rate, loud[-1] / rate


# ---- the round trip ---------------------------------------------------------------------
async def test_round_trip_piper_whisper_vad(piper, whisper, vad, tmp_path):
    dst = tmp_path / "spoken.wav"
    async with running_server(piper) as server:
        client = await _client(server)
        result = await client.tts(text=SENTENCE, dst=str(dst), timeout=60)
        await client.close()
    assert result.success and "wrote" in result.message
    seconds = wav_seconds(dst)
    assert 1.5 < seconds < 6.0
    async with running_server(whisper) as server:
        client = await _client(server)
        out = await client.audio_transcription(dst=str(dst), timeout=120)
        await client.close()
    assert wer(SENTENCE, out.text) <= 0.2, out.text
    assert out.language == "en" and abs(out.duration - seconds) < 0.05
    assert out.segments and out.segments[0].tokens
    # LocalAI's unit: nanoseconds (Go time.Duration)
    assert 0 <= out.segments[0].start < out.segments[-1].end <= int((seconds + 0.5) * 1e9)
    assert out.segments[-1].end > int(seconds * 0.5 * 1e9)

    samples = load_audio(dst, 16000)
    start, end = speech_bounds(samples, 16000)
    silence = np.zeros(16000, dtype=np.float32)
    padded = np.concatenate([silence, samples, silence])
    async with running_server(vad) as server:
        client = await _client(server)
        found = await client.vad(audio=padded.tolist(), timeout=60)
        await client.close()
    assert len(found.segments) == 1, found
    seg = found.segments[0]
    assert abs(seg.start - (1.0 + start)) <= 0.25 and abs(seg.end - (1.0 + end)) <= 0.25, (seg, start, end)
    assert seg.start > 0.75 and seg.end < padded.size / 16000 - 0.75  # none over the silence


# ---- TTSStream ----------------------------------------------------------------------------
async def test_tts_stream_is_incremental_and_matches_the_file(piper, tmp_path):
    async with running_server(piper) as server:
        client = await _client(server)
        t0 = time.monotonic()
        replies, arrivals = [], []
        async for reply in client.tts_stream(text=THREE, timeout=120):
            replies.append(reply)
            arrivals.append(time.monotonic() - t0)
        dst = tmp_path / "three.wav"
        assert (await client.tts(text=THREE, dst=str(dst), timeout=120)).success
        await client.close()
    # LocalAI's convention (core/backend/tts.go): sample rate as JSON first, then raw PCM
    assert replies[0].message == b'{"sample_rate": 22050}' and not replies[0].audio
    audio = [r for r in replies[1:] if r.audio]
    assert len(audio) == 3  # one per sentence
    assert not audio[0].audio.startswith(b"RIFF")
    first_audio = arrivals[1]
    assert first_audio < 0.75 * arrivals[-1], arrivals  # the first sentence came before the text was done
    pcm = b"".join(r.audio for r in audio)
    streamed = len(pcm) / 2 / 22050
    assert abs(streamed - wav_seconds(dst)) <= 0.05 * wav_seconds(dst)


# ---- every request field, against the engines ---------------------------------------------
async def test_whisper_request_fields(whisper, speech):
    async with running_server(whisper) as server:
        client = await _client(server)
        word = await client.audio_transcription(dst=str(speech), timestamp_granularities=["segment", "word"],
                                                language="en", threads=1, timeout=120)
        spoken = [w for seg in word.segments for w in read_words(seg)]
        assert [t.strip(" .").lower() for _, _, t in spoken][:3] == ["the", "quick", "brown"], spoken
        assert all(0 <= s <= e for s, e, _ in spoken) and spoken[-1][1] <= int(1e10), spoken
        assert all(a[0] <= b[0] for a, b in zip(spoken, spoken[1:], strict=False))
        other = await client.audio_transcription(dst=str(speech), prompt="A pangram about a fox.", translate=True,
                                                 temperature=0.3, timeout=120)
        assert wer(SENTENCE, other.text) <= 0.5, other.text  # sampled at 0.3: a looser bound
        deltas, final = [], None
        async for reply in client.audio_transcription_stream(dst=str(speech), timeout=120):
            if reply.HasField("final_result"):
                final = reply.final_result
            else:
                deltas.append(reply.delta)
        await client.close()
    assert deltas and final is not None
    assert "".join(deltas).strip() == final.text and wer(SENTENCE, final.text) <= 0.2
    assert not read_words(final.segments[0])  # words only when asked for


def _encode_file(path: Path, samples: np.ndarray, rate: int, codec: str, layout: str) -> Path:
    """Write mono float ``samples`` (already at ``rate``) with FFmpeg's ``codec`` into ``path``."""
    import av

    channels = 2 if layout == "stereo" else 1
    pcm = (np.repeat(samples[None, :], channels, 0) * 32767).astype(np.int16).T.reshape(1, -1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in (*stream.encode(frame), *stream.encode(None)):
            out.mux(packet)
    return path


async def test_whisper_decodes_other_containers_and_rates(whisper, speech, tmp_path):
    files = [
        _encode_file(tmp_path / "fox.flac", load_audio(speech, 44100), 44100, "flac", "stereo"),
        _encode_file(tmp_path / "fox.mp3", load_audio(speech, 32000), 32000, "libmp3lame", "mono"),
        _encode_file(tmp_path / "fox.ogg", load_audio(speech, 48000), 48000, "libopus", "stereo"),
    ]
    async with running_server(whisper) as server:
        client = await _client(server)
        for path in files:
            out = await client.audio_transcription(dst=str(path), timeout=120)
            assert wer(SENTENCE, out.text) <= 0.2, (path.name, out.text)
        await client.close()


async def test_piper_voice_and_language(piper, tmp_path):
    async with running_server(piper) as server:
        client = await _client(server)
        for voice, language in (("en_US-joe-medium", "en-US"), ("en_US-joe-medium.onnx", None), ("", "en")):
            req = pb.TTSRequest(text="Hello.", dst=str(tmp_path / "v.wav"), voice=voice)
            if language is not None:
                req.language = language
            assert (await client.tts(req, timeout=60)).success
        for field, req in (
            ("voice", pb.TTSRequest(text="Hi.", dst=str(tmp_path / "x.wav"), voice="de_DE-thorsten")),
            ("language", pb.TTSRequest(text="Hi.", dst=str(tmp_path / "x.wav"), language="fr")),
            ("language", pb.TTSRequest(text="Hi.", dst=str(tmp_path / "x.wav"), voice="en_US-joe-medium",
                                       language="de")),
        ):
            with pytest.raises(RpcError) as exc:
                await client.tts(req, timeout=60)
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in exc.value.details
        await client.close()


# ---- load options -------------------------------------------------------------------------
def test_vad_load_options_change_the_segments(vad, speech):
    samples = load_audio(speech, 16000)
    padded = np.concatenate([np.zeros(16000, np.float32), samples, np.zeros(16000, np.float32)])
    req = pb.VADRequest(audio=padded.tolist())
    base = vad.vad(req, CallContext("VAD")).segments[0]
    other = SileroVadBackend()
    for options, check in (
        (["speech_pad_ms:300"], lambda s: len(s) == 1 and s[0].start < base.start - 0.2),
        (["min_speech_ms:10000"], lambda s: len(s) == 0),  # speech shorter than 10 s is dropped
        (["threshold:0.99", "neg_threshold:0.98"], lambda s: sum(x.end - x.start for x in s) < base.end - base.start),
        (["min_silence_ms:0", "max_speech_s:0.5"], lambda s: len(s) > 1 and all(x.end - x.start <= 0.6 for x in s)),
    ):
        other.load(pb.ModelOptions(Options=options, Threads=1), CallContext("LoadModel"))
        segments = other.vad(req, CallContext("VAD")).segments
        assert check(segments), (options, segments)
    assert other.audio_engine.session.get_session_options().intra_op_num_threads == 1


def test_piper_load_options(piper):
    other = PiperBackend()
    other.load(pb.ModelOptions(Threads=1, Options=["length_scale:1.6", "noise_scale:0.3", "noise_w_scale:0",
                                                     "speaker_id:0", "volume:0.5"]), CallContext("LoadModel"))
    slow = np.concatenate(list(other.audio_engine.synthesize(SENTENCE)))
    normal = np.concatenate(list(piper.audio_engine.synthesize(SENTENCE)))
    assert slow.size > 1.3 * normal.size  # length_scale 1.6 speaks slower
    assert np.abs(slow).max() <= 0.51  # volume 0.5 after piper's peak normalization
    assert other.audio_engine._voice(other.audio_engine.default).session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(LoadError, match="speaker"):
        PiperBackend().load(pb.ModelOptions(Options=["speaker_id:3"]), CallContext("LoadModel"))


def test_whisper_load_options(speech):
    other = WhisperBackend()
    message = other.load(pb.ModelOptions(Threads=1, Options=["beam_size:2", "vad_filter:true", "compute_type:float32",
                                                             "condition_on_previous_text:false"]),
                         CallContext("LoadModel"))
    assert "float32" in message and "beam 2" in message
    out = other.audio_transcription(pb.TranscriptRequest(dst=str(speech)), CallContext("AudioTranscription"))
    assert wer(SENTENCE, out.text) <= 0.2
    other._free()


@pytest.mark.parametrize(("backend", "options", "match"), [
    (SileroVadBackend, pb.ModelOptions(Threads=10**6), "Threads"),
    (PiperBackend, pb.ModelOptions(Threads=10**6), "Threads"),
    (WhisperBackend, pb.ModelOptions(Options=["compute_type:float128"]), "compute_type"),
    (WhisperBackend, pb.ModelOptions(Options=["beam_size:1000"]), "beam_size"),
    (SileroVadBackend, pb.ModelOptions(Options=["threshold:nan"]), "threshold"),
    (PiperBackend, pb.ModelOptions(Options=["length_scale:-1"]), "length_scale"),
    (SileroVadBackend, pb.ModelOptions(Model="no-such-vad.onnx"), "not found"),
    (WhisperBackend, pb.ModelOptions(ModelFile="/nonexistent/whisper"), "not found"),
])
async def test_bad_load_requests_fail_the_load(backend, options, match):
    async with running_server(backend()) as server:
        client = await _client(server)
        result = await client.load_model(options, timeout=60)
        await client.close()
    assert not result.success and match in result.message


def test_model_named_by_path_and_by_alias(tmp_path, speech):
    from inferd.engines.audio import packaged

    vad_file = packaged.silero_vad_model()
    b = SileroVadBackend()
    assert str(vad_file) in b.load(pb.ModelOptions(ModelFile=str(vad_file)), CallContext("LoadModel"))
    assert str(vad_file) in b.load(pb.ModelOptions(Model=vad_file.name, ModelPath=str(vad_file.parent)),
                                   CallContext("LoadModel"))
    assert str(vad_file) in b.load(pb.ModelOptions(Model="silero-vad", ModelPath=str(tmp_path)),
                                   CallContext("LoadModel"))
    # the classic one-window-per-call export gives exactly the same segments as the block one
    streaming = packaged.silero_vad_model("streaming")
    assert "streaming model" in b.load(pb.ModelOptions(ModelFile=str(streaming)), CallContext("LoadModel"))
    audio = np.concatenate([np.zeros(8000, np.float32), load_audio(speech, 16000), np.zeros(8000, np.float32)])
    by_window = b.vad(pb.VADRequest(audio=audio.tolist()), CallContext("VAD"))
    assert "sequence model" in b.load(pb.ModelOptions(), CallContext("LoadModel"))
    assert b.vad(pb.VADRequest(audio=audio.tolist()), CallContext("VAD")) == by_window and by_window.segments
    models = tmp_path / "models"
    models.mkdir()
    confined = SileroVadBackend(settings=settings_with(models_dir=str(models)))
    with pytest.raises(Exception, match="INFERD_MODELS_DIR"):
        confined.load(pb.ModelOptions(ModelFile=str(vad_file)), CallContext("LoadModel"))


# ---- bad inputs: the exact status and the field ----------------------------------------------
async def test_bad_inputs_name_the_field(piper, whisper, vad, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not audio\n" * 20)
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)  # nobody writes to it: opening it to read would block forever
    cases = [
        (vad, "vad", pb.VADRequest(), grpc.StatusCode.INVALID_ARGUMENT, "audio"),
        (vad, "vad", pb.VADRequest(audio=[0.0, math.nan, 0.1]), grpc.StatusCode.INVALID_ARGUMENT, "audio"),
        (vad, "vad", pb.VADRequest(audio=[0.0, math.inf]), grpc.StatusCode.INVALID_ARGUMENT, "audio"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(text_file)), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(tmp_path / "gone.wav")), grpc.StatusCode.NOT_FOUND, "dst"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(tmp_path)), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(fifo)), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst="/dev/urandom"), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (whisper, "audio_transcription", pb.TranscriptRequest(), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(text_file), language="fr"),
         grpc.StatusCode.INVALID_ARGUMENT, "language"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(text_file), temperature=math.nan),
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(text_file), threads=10**6),
         grpc.StatusCode.INVALID_ARGUMENT, "threads"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(text_file), timestamp_granularities=["char"]),
         grpc.StatusCode.INVALID_ARGUMENT, "timestamp_granularities[0]"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(text_file), diarize=True),
         grpc.StatusCode.INVALID_ARGUMENT, "diarize"),
        (whisper, "audio_transcription", pb.TranscriptRequest(dst=str(text_file), prompt="p" * 5000),
         grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (piper, "tts", pb.TTSRequest(text="Hi.", dst=str(tmp_path / "missing" / "out.wav")), grpc.StatusCode.NOT_FOUND, "dst"),
        (piper, "tts", pb.TTSRequest(text="Hi.", dst=str(tmp_path)), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (piper, "tts", pb.TTSRequest(text="Hi.", dst=os.devnull), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (piper, "tts", pb.TTSRequest(text="Hi."), grpc.StatusCode.INVALID_ARGUMENT, "dst"),
        (piper, "tts", pb.TTSRequest(text="   ", dst=str(tmp_path / "e.wav")), grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (piper, "tts", pb.TTSRequest(text="x" * 20_001, dst=str(tmp_path / "e.wav")), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    ]
    for backend, method, request, code, field in cases:
        async with running_server(backend) as server:
            client = await _client(server)
            with pytest.raises(RpcError) as exc:
                await getattr(client, method)(request, timeout=60)
            await client.close()
        assert exc.value.code == code, (request, exc.value)
        assert field in exc.value.details, (request, exc.value)
    assert Path(os.devnull).is_char_device()  # refused, not replaced by a regular file
    async with running_server(piper) as server:  # a stream fails before sending anything
        client = await _client(server)
        with pytest.raises(RpcError) as exc:
            async for _ in client.tts_stream(text="", timeout=60):
                pytest.fail("a reply was sent for an empty text")
        await client.close()
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and "text" in exc.value.details


# ---- INFERD_AUDIO_DIR ----------------------------------------------------------------------
async def test_audio_dir_confines_tts_output_and_transcription_input(piper, whisper, speech, tmp_path):
    root = tmp_path / "audio"
    root.mkdir()
    (root / "in.wav").write_bytes(speech.read_bytes())
    settings = settings_with(audio_dir=str(root))
    saved = piper.settings, whisper.settings
    piper.settings = whisper.settings = settings  # what create_backend(settings=...) gives them
    try:
        async with running_server(piper) as server:
            client = await _client(server)
            assert (await client.tts(text="Hi.", dst="out.wav", timeout=60)).success  # relative: inside the root
            assert (root / "out.wav").is_file()
            for dst in (str(tmp_path / "outside.wav"), "../escape.wav"):
                with pytest.raises(RpcError) as exc:
                    await client.tts(text="Hi.", dst=dst, timeout=60)
                assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "dst" in exc.value.details and "INFERD_AUDIO_DIR" in exc.value.details
            await client.close()
        (root / "link.wav").symlink_to(speech)  # a symlink pointing out is caught too
        async with running_server(whisper) as server:
            client = await _client(server)
            assert wer(SENTENCE, (await client.audio_transcription(dst="in.wav", timeout=120)).text) <= 0.2
            for dst in (str(speech), "link.wav", "../in.wav"):
                with pytest.raises(RpcError) as exc:
                    await client.audio_transcription(dst=dst, timeout=60)
                assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and "INFERD_AUDIO_DIR" in exc.value.details
            await client.close()
    finally:
        piper.settings, whisper.settings = saved
    assert not (tmp_path / "outside.wav").exists() and not (tmp_path / "escape.wav").exists()


# ---- cancellation ----------------------------------------------------------------------------
# A stream is pulled one reply at a time, so a cancelled stream is closed after the unit in
# progress (a sentence, a 30 s whisper window); a unary call runs every unit in one worker
# call, so there the engines' own checks between units are what stop it (a deadline here).
# The units the engine really ran are counted (a wrapper around the per-unit model call), so
# "stopped" is measured, not guessed from timing.
async def _wait_idle(backend, seconds: float = 60.0) -> None:
    t0 = time.monotonic()
    while backend.busy():
        assert time.monotonic() - t0 < seconds, "the call never ended"
        await asyncio.sleep(0.02)


def _count_calls(monkeypatch, obj, method: str) -> list[int]:
    counter = [0]
    original = getattr(obj, method)

    def counting(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, method, counting)
    return counter


async def test_cancelling_tts_stops_synthesis(piper, tmp_path, monkeypatch):
    voice = piper.audio_engine._voice(piper.audio_engine.default)
    sentences = _count_calls(monkeypatch, voice, "phoneme_ids_to_audio")
    text = " ".join(f"This is sentence number {i} of a long story." for i in range(40))
    async with running_server(piper) as server:
        client = await _client(server)
        t0 = time.monotonic()
        stream = client.tts_stream(text=text, timeout=300)
        async for reply in stream:
            if reply.audio:
                break
        first = time.monotonic() - t0  # about one sentence
        await stream.aclose()
        await _wait_idle(piper)
        assert sentences[0] <= 3, sentences  # of 40
        sentences[0] = 0
        dst = tmp_path / "long.wav"
        with pytest.raises(RpcError) as exc:
            await client.tts(text=text, dst=str(dst), timeout=3 * first)
        assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await _wait_idle(piper)
        assert 1 <= sentences[0] < 20, sentences  # stopped at the deadline, not after 40
        assert not dst.exists()  # the WAV is written whole or not at all
        await client.close()


async def test_cancelling_transcription_stops_decoding(whisper, speech, tmp_path, monkeypatch):
    windows = _count_calls(monkeypatch, whisper.audio_engine.model, "generate_with_fallback")
    samples = load_audio(speech, 16000)
    # 6 windows of 30 s, one sentence each (repeating speech back to back would trip whisper's
    # compression-ratio fallback and re-decode every window up to 6 times)
    long_audio = np.tile(np.concatenate([samples, np.zeros(30 * 16000 - samples.size, np.float32)]), 6)
    path = tmp_path / "long.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((long_audio * 32767).astype("<i2").tobytes())
    async with running_server(whisper) as server:
        client = await _client(server)
        t0 = time.monotonic()
        stream = client.audio_transcription_stream(dst=str(path), timeout=300)
        async for reply in stream:
            assert reply.delta
            break
        first = time.monotonic() - t0  # one 30 s window (plus reading the file)
        await stream.aclose()
        await _wait_idle(whisper)
        assert windows[0] <= 2, windows  # of 6
        windows[0] = 0
        with pytest.raises(RpcError) as exc:
            await client.audio_transcription(dst=str(path), timeout=first)
        assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await _wait_idle(whisper)
        assert windows[0] <= 3, windows
        await client.close()


# ---- LoadModel / Free with calls in flight -----------------------------------------------------
async def test_free_and_load_while_vad_calls_are_in_flight():
    backend = SileroVadBackend()
    audio = (np.sin(np.arange(16000 * 90) / 7.0) * 0.3).astype(np.float32).tolist()
    async with running_server(backend) as server:
        client = await _client(server)
        assert (await client.load_model(pb.ModelOptions(), timeout=30)).success

        async def one():
            try:
                await client.vad(audio=audio, timeout=60)
                return "ok"
            except RpcError as exc:
                return exc.code

        calls = [asyncio.ensure_future(one()) for _ in range(4)]
        while not backend.busy():
            await asyncio.sleep(0.005)
        assert (await client.free(timeout=30)).success
        assert (await client.load_model(pb.ModelOptions(), timeout=30)).success
        results = await asyncio.gather(*calls)
        allowed = {"ok", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION}
        assert set(results) <= allowed, results
        assert (await client.vad(audio=audio[:16000], timeout=60)) is not None  # serves again
        await client.close()


async def test_free_while_a_tts_stream_runs(piper):
    other = PiperBackend()
    async with running_server(other) as server:
        client = await _client(server)
        assert (await client.load_model(pb.ModelOptions(Threads=1), timeout=60)).success
        text = " ".join(f"Sentence {i} is here." for i in range(12))

        async def consume():
            n = 0
            try:
                async for reply in client.tts_stream(text=text, timeout=120):
                    n += bool(reply.audio)
                return n
            except RpcError as exc:
                return exc.code

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.5)
        assert (await client.free(timeout=60)).success
        result = await task
        assert result == 12 or result in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), result
        with pytest.raises(RpcError) as exc:
            await client.tts(text="Hi.", dst=os.devnull, timeout=30)
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        await client.close()


def test_several_voices_in_the_directory(piper, tmp_path):
    """``voice`` picks a file among several; ``language`` picks the voice that speaks it."""
    import json

    from inferd.engines.audio import packaged

    src = packaged.piper_voice_model()
    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "en_US-joe-medium.onnx").symlink_to(src)
    (voices / "en_US-joe-medium.onnx.json").symlink_to(f"{src}.json")
    config = json.loads(Path(f"{src}.json").read_text())
    config["language"] = {"code": "en_GB", "family": "en"}
    config["audio"]["sample_rate"] = 16000  # a different voice file: played at another rate
    (voices / "en_GB-copy-low.onnx").symlink_to(src)
    (voices / "en_GB-copy-low.onnx.json").write_text(json.dumps(config))
    backend = PiperBackend()
    message = backend.load(pb.ModelOptions(ModelFile=str(voices / "en_US-joe-medium.onnx"), Threads=1),
                           CallContext("LoadModel"))
    assert "2 voice(s)" in message
    for request, rate in ((pb.TTSRequest(voice="en_GB-copy-low"), 16000), (pb.TTSRequest(language="en-GB"), 16000),
                          (pb.TTSRequest(language="en_US"), 22050), (pb.TTSRequest(), 22050)):
        request.text, request.dst = "Hello.", str(tmp_path / "out.wav")
        assert backend.tts(request, CallContext("TTS")).success
        with wave.open(request.dst) as w:
            assert w.getframerate() == rate, request
    backend._free()


def test_a_fifo_as_model_fails_the_load_instead_of_blocking(tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    Path(f"{fifo}.json").write_text("{}")
    for backend in (SileroVadBackend(), PiperBackend()):
        with pytest.raises(LoadError, match="not a regular file"):
            backend.load(pb.ModelOptions(ModelFile=str(fifo)), CallContext("LoadModel"))
