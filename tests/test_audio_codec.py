"""AudioEncode/AudioDecode (Opus) and the rules every audio backend shares, over real gRPC.

No model is needed: the codec rpcs answer before LoadModel (LocalAI's realtime API uses
them on a codec backend it never gives a model), so these tests run on an unloaded
``silero-vad`` backend. The tone is made here; libopus comes from PyAV's FFmpeg.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

pytest.importorskip("av", reason="the audio extra is not installed (pip install 'inferd[audio]')")

from inferd.backends.audio_base import AudioBackend  # noqa: E402
from inferd.backends.piper import PiperBackend  # noqa: E402
from inferd.backends.registry import resolve_backend_class  # noqa: E402
from inferd.backends.silero_vad import SileroVadBackend  # noqa: E402
from inferd.backends.whisper import WhisperBackend  # noqa: E402
from inferd.client import new_client  # noqa: E402
from inferd.client.errors import RpcError  # noqa: E402
from inferd.engines.audio.opus import OpusCodec  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from tests.helpers import running_server  # noqa: E402


def tone(freq: float = 440.0, seconds: float = 1.0, rate: int = 48000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")


def dominant_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(pcm.size)))
    return float(np.argmax(spectrum) * rate / pcm.size)


@pytest.fixture
async def client():
    async with running_server(SileroVadBackend()) as server:
        c = new_client(f"127.0.0.1:{server.port}", parallel=True)
        yield c
        await c.close()


async def test_opus_round_trip_of_a_440_hz_tone(client):
    pcm = tone()
    enc = await client.audio_encode(pb.AudioEncodeRequest(pcm_data=pcm.tobytes(), sample_rate=48000, channels=1))
    assert enc.sample_rate == 48000 and enc.samples_per_frame == 960  # LocalAI's 20 ms at 48 kHz
    assert len(enc.frames) == 50 and all(0 < len(f) < 1500 for f in enc.frames)
    assert sum(len(f) for f in enc.frames) < pcm.nbytes / 8  # it really compressed (64 kbit/s vs 768)
    dec = await client.audio_decode(pb.AudioDecodeRequest(frames=enc.frames))
    out = np.frombuffer(dec.pcm_data, dtype="<i2")
    assert dec.sample_rate == 48000 and dec.samples_per_frame == 960
    assert abs(out.size - pcm.size) <= 960  # within one frame
    assert abs(dominant_hz(out, 48000) - 440.0) <= 5.0
    assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) > 0.25 * 32767 * 0.5  # not silence


async def test_every_codec_option_against_libopus(client):
    # 16 kHz stereo in, resampled to a 24 kHz codec, 10 ms frames given as a sample count.
    pcm16 = np.repeat(tone(440.0, 1.0, 16000).reshape(-1, 1), 2, axis=1)
    enc = await client.audio_encode(pb.AudioEncodeRequest(
        pcm_data=pcm16.tobytes(), sample_rate=16000, channels=2,
        options={"sample_rate": "24000", "frame_size": "240", "bitrate": "32000", "complexity": "5",
                 "application": "voip"}))
    assert enc.sample_rate == 24000 and enc.samples_per_frame == 240 and len(enc.frames) == 100
    dec = await client.audio_decode(pb.AudioDecodeRequest(
        frames=enc.frames, options={"sample_rate": "16000", "channels": "2"}))
    out = np.frombuffer(dec.pcm_data, dtype="<i2").reshape(-1, 2)
    assert dec.sample_rate == 16000 and dec.samples_per_frame == 160
    assert abs(out.shape[0] - 16000) <= 160
    assert abs(dominant_hz(out[:, 0], 16000) - 440.0) <= 5.0
    # frame_ms, lowdelay, 8 kHz output; a partial last frame is padded, not dropped
    enc = await client.audio_encode(pcm_data=tone(440.0, 0.95).tobytes(), sample_rate=48000,
                                    options={"frame_ms": "40", "application": "lowdelay"})
    assert enc.samples_per_frame == 1920 and len(enc.frames) == 24  # ceil(0.95 s / 40 ms)
    dec = await client.audio_decode(frames=enc.frames, options={"sample_rate": "8000"})
    assert abs(len(dec.pcm_data) // 2 - 24 * 320) <= 8
    assert abs(dominant_hz(np.frombuffer(dec.pcm_data, dtype="<i2"), 8000) - 440.0) <= 10.0


async def test_session_decoder_carries_state_across_calls(client):
    enc = await client.audio_encode(pcm_data=tone().tobytes(), sample_rate=48000)
    frames = list(enc.frames)
    whole = np.frombuffer((await client.audio_decode(frames=frames)).pcm_data, dtype="<i2")
    parts = []
    for i in range(0, len(frames), 15):  # LocalAI's realtime loop: batches of one session's packets
        parts.append((await client.audio_decode(frames=frames[i:i + 15],
                                                options={"session_id": "call-1"})).pcm_data)
    batched = np.frombuffer(b"".join(parts), dtype="<i2")
    assert np.array_equal(batched, whole)  # same decoder state as one call


@pytest.mark.parametrize(("request_", "field"), [
    (pb.AudioEncodeRequest(pcm_data=b"\x01\x02\x03", sample_rate=48000), "pcm_data"),
    (pb.AudioEncodeRequest(pcm_data=b"\x00" * 6, sample_rate=48000, channels=2), "pcm_data"),
    (pb.AudioEncodeRequest(pcm_data=b"\x00\x00", sample_rate=3), "sample_rate"),
    (pb.AudioEncodeRequest(pcm_data=b"\x00\x00", channels=3), "channels"),
    (pb.AudioEncodeRequest(pcm_data=b"\x00\x00", options={"sample_rate": "44100"}), "options[sample_rate]"),
    (pb.AudioEncodeRequest(pcm_data=b"\x00\x00", options={"frame_ms": "7"}), "options[frame_ms]"),
    (pb.AudioEncodeRequest(pcm_data=b"\x00\x00", options={"bitrate": "x"}), "options[bitrate]"),
    (pb.AudioEncodeRequest(pcm_data=b"\x00\x00", options={"bogus": "1"}), "options[bogus]"),
    (pb.AudioDecodeRequest(frames=[b"\xff\xfe\x00 not opus at all"]), "frames[0]"),
    (pb.AudioDecodeRequest(frames=[b""]), "frames[0]"),
    (pb.AudioDecodeRequest(frames=[b"\x00"], options={"channels": "5"}), "options[channels]"),
])
async def test_bad_codec_input_is_invalid_argument_naming_the_field(client, request_, field):
    call = client.audio_encode if isinstance(request_, pb.AudioEncodeRequest) else client.audio_decode
    with pytest.raises(RpcError) as exc:
        await call(request_)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in exc.value.details


async def test_empty_input_encodes_to_nothing(client):
    enc = await client.audio_encode(pcm_data=b"", sample_rate=16000)
    assert list(enc.frames) == [] and enc.sample_rate == 48000
    dec = await client.audio_decode(frames=[])
    assert dec.pcm_data == b""


async def test_model_rpcs_need_a_model_and_sound_generation_says_what_is_missing(client):
    with pytest.raises(RpcError) as exc:
        await client.vad(audio=[0.0] * 512)
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(RpcError) as exc:
        await client.sound_generation(text="rain on a tin roof", dst="/tmp/x.wav")
    assert exc.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "no sound/music generation model" in exc.value.details and "module:" in exc.value.details


def test_registry_and_capabilities():
    expected = {
        "silero-vad": {"VAD"},
        "piper": {"TTS", "TTSStream"},
        "whisper": {"AudioTranscription", "AudioTranscriptionStream"},
    }
    for name, own in expected.items():
        cls = resolve_backend_class(name)
        assert issubclass(cls, AudioBackend)
        assert set(cls.capabilities()) == own | {"AudioEncode", "AudioDecode"}
        assert "SoundGeneration" not in cls.capabilities()
    assert {SileroVadBackend, PiperBackend, WhisperBackend} == {resolve_backend_class(n) for n in expected}


async def test_decoded_output_is_bounded(client, monkeypatch):
    import inferd.engines.audio.opus as opus

    frames = (await client.audio_encode(pcm_data=tone(seconds=0.5).tobytes(), sample_rate=48000)).frames
    monkeypatch.setattr(opus, "MAX_DECODE_SECONDS", 1)  # the server runs in this process
    with pytest.raises(RpcError) as exc:
        await client.audio_decode(frames=list(frames) * 3)  # 1.5 s > 1 s
    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "frames" in exc.value.details


def test_session_decoders_are_bounded_and_expire():
    codec = OpusCodec(idle_s=0.0, max_sessions=2)
    frames = codec.encode(tone(seconds=0.1).tobytes(), 48000, 1, {}).frames
    for sid in ("a", "b", "c"):
        codec.decode(frames, {"session_id": sid})
    assert codec.sessions() <= 2


def test_vad_segmenter_rules_on_known_probabilities():
    """The online segmenter alone (no model): hysteresis, minimum silence, padding, gap splitting."""
    from inferd.engines.audio.vad import WINDOW, Segmenter, VadConfig

    def run(probs, **cfg):
        seg = Segmenter(VadConfig(**cfg))
        out = [r for p in probs for r in seg.push(p)]
        return out + seg.finish(len(probs) * WINDOW)

    speech, quiet = [0.9] * 20, [0.05] * 20  # 20 windows = 640 ms
    # a 64 ms dip (2 windows) is shorter than min_silence 100 ms: one segment, padded 30 ms (480 samples)
    assert run(quiet + speech + [0.05] * 2 + speech + quiet) == [(20 * WINDOW - 480, 62 * WINDOW + 480)]
    # between thresholds (0.35..0.5) keeps speech going (hysteresis)
    assert len(run(quiet + speech + [0.4] * 10 + speech + quiet)) == 1
    # a long gap splits; a gap shorter than two pads is shared between the two segments
    two = run(quiet + speech + [0.05] * 5 + speech + quiet, min_silence_ms=50, speech_pad_ms=100)
    assert len(two) == 2 and two[0][1] == two[1][0]  # 160 ms gap < 2 x 100 ms: split in the middle
    # too short to be speech
    assert run(quiet + [0.9] * 5 + quiet) == []
    # max_speech_s cuts a long run into bounded pieces
    pieces = run(quiet + [0.9] * 200 + quiet, max_speech_s=1.0, speech_pad_ms=0)
    assert len(pieces) >= 6 and all(e - s <= 16000 for s, e in pieces)
