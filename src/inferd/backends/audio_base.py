"""What every audio backend shares: the Opus codec rpcs, path confinement, model location.

``silero-vad``, ``piper`` and ``whisper`` subclass ``AudioBackend``; each adds only the
translation of its own rpcs. Shared here, once:

* ``AudioEncode``/``AudioDecode`` through ``inferd.engines.audio.opus`` (LocalAI's
  realtime API calls them on whichever backend it is given). They need no model, so an
  audio backend sets ``needs_model = False`` and its model rpcs check ``self.audio_engine``
  themselves (``engine_for``), answering FAILED_PRECONDITION before LoadModel.
* Paths from requests (``TTSRequest.dst``, ``TranscriptRequest.dst``) through
  ``inferd.paths.confine`` with ``INFERD_AUDIO_DIR``: outside it -> INVALID_ARGUMENT; a
  missing input file or output directory -> NOT_FOUND naming the field.
* Model location (``inferd.paths.resolve_model_location`` under ``INFERD_MODELS_DIR``),
  falling back to the packaged model when nothing is named or an alias is named.
* Thread counts from ``ModelOptions.Threads``, bounded by ``inferd.limits``.
* ``SoundGeneration`` answers UNIMPLEMENTED saying what is missing (no packaged
  sound-generation model exists); the method is defined only to carry that message and is
  left out of ``capabilities()``.

Calls run in parallel (``parallel = True``): the engines are thread-safe and a long
transcription must not hold up a 20 ms codec call. Each call takes the engine reference
once, so Free/LoadModel replacing ``self.audio_engine`` never pulls a model out from under a
call in flight (the old engine is released when its last call ends).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.backends.options import option_bool, option_float, option_int, split_options
from inferd.engines.audio.opus import OpusCodec
from inferd.errors import InvalidArgument, LoadError, NoModelLoaded, NotFound
from inferd.limits import thread_count
from inferd.paths import confine, resolve_model_location
from inferd.proto import backend_pb2 as pb

#: Default engine threads: the machine's cores, but not more than 4 (small models stop
#: scaling there and several audio backends often share one host).
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))

SOUND_GENERATION_MISSING = (
    "no sound/music generation model is packaged for inferd (none installs from the package "
    "registries it uses); serve one with --backend your.module:YourBackend implementing "
    "sound_generation (docs/audio.md, 'SoundGeneration')")


class AudioBackend(Backend):
    """Base of the audio backends; see the module docstring."""

    parallel = True
    #: AudioEncode/AudioDecode work without a model; model rpcs check ``engine_for``.
    needs_model = False
    #: rpcs whose method exists only to explain why it is missing (not capabilities).
    explained_missing: ClassVar[dict[str, str]] = {"SoundGeneration": SOUND_GENERATION_MISSING}

    def __init__(self, settings: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.codec = OpusCodec()
        #: The loaded engine (LLMService only uses backends that declare ``has_text_engine``).
        self.audio_engine: Any = None

    def unload(self) -> None:
        self.audio_engine = None
        self.codec.close()

    def engine_for(self, rpc: str) -> Any:
        engine = self.audio_engine
        if engine is None:
            raise NoModelLoaded(self.name, rpc)
        return engine

    # ---- settings-derived helpers ---------------------------------------------------
    def _setting(self, name: str) -> str:
        return str(getattr(self.settings, name, "") or "")

    def threads(self, options: pb.ModelOptions) -> int:
        return thread_count(options.Threads, "Threads", default=DEFAULT_THREADS)

    def locate_model(self, options: pb.ModelOptions, aliases: Iterable[str], packaged: Callable[[], Path]) -> Path:
        """The model LoadModel names, or the packaged one when nothing (or an alias) is named."""
        location = resolve_model_location(options.Model, options.ModelFile, options.ModelPath,
                                          self._setting("models_dir") or None)
        if location.path is not None:
            return location.path
        if not location.requested or options.Model in aliases:
            return packaged()
        raise LoadError(f"{self.name}: model not found: {location.reason()} "
                        f"(leave Model empty or name one of {', '.join(sorted(aliases))} for the packaged model)")

    def input_path(self, raw: str, field: str) -> Path:
        """An audio file to read, confined to INFERD_AUDIO_DIR when set."""
        if not raw:
            raise InvalidArgument("no audio file given", field)
        path = confine(raw, self._setting("audio_dir") or None, field, root_name="INFERD_AUDIO_DIR")
        if not path.exists():
            raise NotFound(f"{field}: audio file {str(path)!r} does not exist")
        return path

    def output_path(self, raw: str, field: str) -> Path:
        """A file to write, confined to INFERD_AUDIO_DIR when set; its directory must exist."""
        if not raw:
            raise InvalidArgument("no output path given", field)
        path = confine(raw, self._setting("audio_dir") or None, field, root_name="INFERD_AUDIO_DIR")
        if path.is_dir():
            raise InvalidArgument(f"{str(path)!r} is a directory; name a file to write", field)
        if not path.parent.is_dir():
            raise NotFound(f"{field}: directory {str(path.parent)!r} does not exist")
        return path

    # ---- the codec rpcs, shared by every audio backend ------------------------------
    def audio_encode(self, request: pb.AudioEncodeRequest, ctx: CallContext) -> pb.AudioEncodeResult:
        out = self.codec.encode(request.pcm_data, request.sample_rate, request.channels, dict(request.options))
        return pb.AudioEncodeResult(frames=out.frames, sample_rate=out.sample_rate,
                                    samples_per_frame=out.samples_per_frame)

    def audio_decode(self, request: pb.AudioDecodeRequest, ctx: CallContext) -> pb.AudioDecodeResult:
        out = self.codec.decode(list(request.frames), dict(request.options))
        return pb.AudioDecodeResult(pcm_data=out.pcm, sample_rate=out.sample_rate,
                                    samples_per_frame=out.samples_per_frame)


def load_options(options: pb.ModelOptions, spec: dict[str, type]) -> dict[str, Any]:
    """The ``Options`` entries named in ``spec`` (key -> bool/int/float/str), converted; others ignored."""
    out: dict[str, Any] = {}
    for key, value, _raw in split_options(options.Options):
        kind = spec.get(key)
        if kind is bool:
            out[key] = option_bool(key, value, empty=True)
        elif kind is int:
            out[key] = option_int(key, value)
        elif kind is float:
            number = option_float(key, value)
            if not math.isfinite(number):
                raise LoadError(f"Options: {key} must be a finite number, got {value!r}")
            out[key] = number
        elif kind is str:
            out[key] = value.strip()
    return out
