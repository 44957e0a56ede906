"""``silero-vad``: voice activity detection on the packaged Silero ONNX model (no torch).

Translation only; the engine is ``inferd.engines.audio.vad`` (see docs/audio.md).

LoadModel
    The model is ``ModelFile``/``ModelPath``/``Model`` (inferd's one location rule), or the
    block ("sequence") ONNX export shipped in the ``silero-vad`` wheel when nothing is named or
    ``Model`` is ``silero-vad``; the classic one-window-per-call ``silero_vad.onnx`` (what
    LocalAI's silero-vad backend loads) works too and gives the same segments, ~3x slower. ``Threads`` (default 1: one 32 ms window at a time gains nothing
    from more). ``Options`` (``key:value``): ``threshold`` (0.5), ``neg_threshold``
    (threshold - 0.15), ``min_speech_ms`` (250), ``min_silence_ms`` (100),
    ``speech_pad_ms`` (30), ``max_speech_s`` (unbounded); LocalAI's silero-vad defaults.

VAD
    ``VADRequest.audio`` is float32 PCM, mono, 16 kHz: the convention of LocalAI's realtime
    API (``core/http/endpoints/openai/realtime.go``: ``runVAD`` converts its 16 kHz int16
    buffer to float32 in [-1, 1]). Segments are ``start``/``end`` in seconds. Empty audio or
    a NaN/inf sample -> INVALID_ARGUMENT naming ``audio``.
"""

from __future__ import annotations

import numpy as np

from inferd.backends.audio_base import AudioBackend, load_options
from inferd.backends.context import CallContext
from inferd.engines.audio import packaged
from inferd.engines.audio.pcm import check_samples
from inferd.engines.audio.vad import SAMPLE_RATE, SileroVad, VadConfig
from inferd.limits import thread_count
from inferd.proto import backend_pb2 as pb

ALIASES = ("silero-vad", "silero_vad")
OPTIONS = {"threshold": float, "neg_threshold": float, "min_speech_ms": float, "min_silence_ms": float,
           "speech_pad_ms": float, "max_speech_s": float}


class SileroVadBackend(AudioBackend):
    """Silero VAD: segments of speech in 16 kHz float audio."""

    name = "silero-vad"

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        config = VadConfig(**load_options(options, OPTIONS)).validate()
        path = self.locate_model(options, ALIASES, packaged.silero_vad_model)
        threads = thread_count(options.Threads, "Threads", default=1)
        self.audio_engine = SileroVad(path, threads, config)
        return (f"loaded {path} ({self.audio_engine.kind} model, {threads} thread(s); threshold {config.threshold}, min speech "
                f"{config.min_speech_ms:g} ms, min silence {config.min_silence_ms:g} ms, pad {config.speech_pad_ms:g} ms)")

    def vad(self, request: pb.VADRequest, ctx: CallContext) -> pb.VADResponse:
        engine: SileroVad = self.engine_for("VAD")
        samples = check_samples(np.asarray(request.audio, dtype=np.float32), "audio")
        segments = engine.segments(samples, ctx.cancelled)
        return pb.VADResponse(segments=[pb.VADSegment(start=s, end=e) for s, e in segments])


__all__ = ["SAMPLE_RATE", "SileroVadBackend"]
