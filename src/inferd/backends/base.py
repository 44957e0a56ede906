"""The ``Backend`` base class (seed 001's ``Base``/``SingleThread``).

A backend is the adapter between the protocol's messages and one engine. Every
capability is a method named after its rpc in snake_case (``predict_stream`` for
``PredictStream``); the base implementation raises ``Unsupported`` so the server
answers UNIMPLEMENTED naming the backend and the rpc. A backend overrides only what
its engine can do.

Capability methods receive the request message and a ``CallContext`` and return the
reply message (or yield replies for streaming rpcs). They may be plain functions or
generators, which the runtime runs in a worker thread, or ``async`` functions /
async generators, which it awaits on the event loop (use those only for work that
never blocks, e.g. handing a request to an engine's own scheduler thread).

Concurrency: by default calls are serialized (``parallel = False``, the Go
``SingleThread``): the runtime holds ``self.call_lock`` around each serialized call,
and ``busy()`` reports whether one is in progress. Thread-safe backends set
``parallel = True`` and the runtime only counts calls in flight. Either way every model
call holds a lease on ``self.lifecycle`` until its work has stopped, and ``unload()`` /
``load()`` run only after every lease is back (``inferd.lifecycle``): a backend never
needs its own guard against Free racing its calls, provided its calls do not leave
work running in the engine after they return (an engine thread such as a scheduler must
be stopped and joined by ``unload()`` before native memory is freed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from inferd.backends.context import CallContext
from inferd.backends.memory import memory_usage, release_memory
from inferd.errors import Unsupported
from inferd.lifecycle import LifecycleGate
from inferd.proto import backend_pb2 as pb
from inferd.protocol import RPCS

State = pb.StatusResponse.State


class Backend:
    """Base class for all backends; see the module docstring for the contract."""

    #: Name used in error messages, ``--backend`` and the registry.
    name: ClassVar[str] = "base"
    #: False: calls are serialized with a lock (not thread-safe engines).
    parallel: ClassVar[bool] = False
    #: True for backends whose engine offers the async text API (``generate``) that fronts
    #: such as LLMService and seed 002's service call directly; see ``text_engine``.
    has_text_engine: ClassVar[bool] = False
    #: rpcs this backend cannot serve for a stated reason (e.g. no model for them ships): the
    #: runtime answers UNIMPLEMENTED with the reason, before any model check, and they are
    #: not listed as capabilities.
    explained_missing: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self.call_lock = asyncio.Lock()
        #: LoadModel/Free against model calls (inferd.lifecycle); on the backend, not the
        #: runtime, so the server and an embedded client over one backend share it.
        self.lifecycle = LifecycleGate()
        self._loaded = False
        self._load_error: str | None = None
        self.model_name: str = ""

    # ---- lifecycle -------------------------------------------------------------
    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        """Load the model described by ``options``; return a human success message.

        Raise ``LoadError`` (or any exception) to report ``Result(success=False)``.
        """
        raise Unsupported(self.name, "LoadModel")

    def unload(self) -> None:
        """Drop the engine's model; the base class then releases process memory."""

    # Called by the runtime; subclasses override load()/unload(), not these.
    def _mark_loaded(self, name: str) -> None:
        self._loaded = True
        self._load_error = None
        self.model_name = name

    def _mark_load_failed(self, reason: str) -> None:
        self._loaded = False
        self._load_error = reason

    def _free(self) -> bool:
        was_loaded = self._loaded
        self.unload()
        self._loaded = False
        self._load_error = None
        self.model_name = ""
        release_memory()
        return was_loaded

    @property
    def loaded(self) -> bool:
        return self._loaded

    def text_engine(self) -> Any:
        """The loaded text engine for fronts that call it directly, or None when no model is loaded.

        Only meaningful when ``has_text_engine`` is True; a declared capability rather than an
        attribute probe, so an audio or rerank backend's own ``engine`` is never mistaken for one.
        """
        return None

    # ---- busy accounting (used by Status, the watchdog and the supervisor) --------
    def busy(self) -> bool:
        """True while a model call is in progress (Status/Health do not count).

        The calls in progress are the lifecycle gate's leases: a worker still running after
        its caller left counts until it ends.
        """
        return self.lifecycle.in_flight() > 0

    def state(self) -> int:
        if self._load_error is not None:
            return State.ERROR
        if self.busy():
            return State.BUSY
        if self._loaded:
            return State.READY
        return State.UNINITIALIZED

    def memory(self) -> tuple[int, dict[str, int]]:
        """Total and breakdown for ``Status``; engines may extend the breakdown."""
        return memory_usage()

    @classmethod
    def supports(cls, rpc_name: str) -> bool:
        """Whether this backend overrides the capability for ``rpc_name``."""
        method = RPCS[rpc_name].method
        return getattr(cls, method, None) is not getattr(Backend, method, None)

    @classmethod
    def capabilities(cls) -> list[str]:
        return [r for r in RPCS if r not in _ALWAYS_PROVIDED and r not in cls.explained_missing and cls.supports(r)]

    # ---- capabilities: unsupported unless a backend overrides them -----------------
    def _unsupported(self, rpc: str) -> Any:
        raise Unsupported(self.name, rpc)

    def predict(self, request: pb.PredictOptions, ctx: CallContext) -> pb.Reply:
        return self._unsupported("Predict")

    def predict_stream(
        self, request: pb.PredictOptions, ctx: CallContext
    ) -> Iterator[pb.Reply] | AsyncIterator[pb.Reply]:
        return self._unsupported("PredictStream")

    def embedding(self, request: pb.PredictOptions, ctx: CallContext) -> pb.EmbeddingResult:
        return self._unsupported("Embedding")

    def generate_image(self, request: pb.GenerateImageRequest, ctx: CallContext) -> pb.Result:
        return self._unsupported("GenerateImage")

    def generate_video(self, request: pb.GenerateVideoRequest, ctx: CallContext) -> pb.Result:
        return self._unsupported("GenerateVideo")

    def audio_transcription(
        self, request: pb.TranscriptRequest, ctx: CallContext
    ) -> pb.TranscriptResult:
        return self._unsupported("AudioTranscription")

    def audio_transcription_stream(
        self, request: pb.TranscriptRequest, ctx: CallContext
    ) -> Iterator[pb.TranscriptStreamResponse]:
        return self._unsupported("AudioTranscriptionStream")

    def tts(self, request: pb.TTSRequest, ctx: CallContext) -> pb.Result:
        return self._unsupported("TTS")

    def tts_stream(self, request: pb.TTSRequest, ctx: CallContext) -> Iterator[pb.Reply]:
        return self._unsupported("TTSStream")

    def sound_generation(self, request: pb.SoundGenerationRequest, ctx: CallContext) -> pb.Result:
        return self._unsupported("SoundGeneration")

    def tokenize_string(
        self, request: pb.PredictOptions, ctx: CallContext
    ) -> pb.TokenizationResponse:
        return self._unsupported("TokenizeString")

    def detect(self, request: pb.DetectOptions, ctx: CallContext) -> pb.DetectResponse:
        return self._unsupported("Detect")

    def stores_set(self, request: pb.StoresSetOptions, ctx: CallContext) -> pb.Result:
        return self._unsupported("StoresSet")

    def stores_delete(self, request: pb.StoresDeleteOptions, ctx: CallContext) -> pb.Result:
        return self._unsupported("StoresDelete")

    def stores_get(self, request: pb.StoresGetOptions, ctx: CallContext) -> pb.StoresGetResult:
        return self._unsupported("StoresGet")

    def stores_find(self, request: pb.StoresFindOptions, ctx: CallContext) -> pb.StoresFindResult:
        return self._unsupported("StoresFind")

    def rerank(self, request: pb.RerankRequest, ctx: CallContext) -> pb.RerankResult:
        return self._unsupported("Rerank")

    def get_metrics(self, request: pb.MetricsRequest, ctx: CallContext) -> pb.MetricsResponse:
        return self._unsupported("GetMetrics")

    def vad(self, request: pb.VADRequest, ctx: CallContext) -> pb.VADResponse:
        return self._unsupported("VAD")

    def audio_encode(self, request: pb.AudioEncodeRequest, ctx: CallContext) -> pb.AudioEncodeResult:
        return self._unsupported("AudioEncode")

    def audio_decode(self, request: pb.AudioDecodeRequest, ctx: CallContext) -> pb.AudioDecodeResult:
        return self._unsupported("AudioDecode")

    def model_metadata(
        self, request: pb.ModelOptions, ctx: CallContext
    ) -> pb.ModelMetadataResponse:
        return self._unsupported("ModelMetadata")

    def start_fine_tune(self, request: pb.FineTuneRequest, ctx: CallContext) -> pb.FineTuneJobResult:
        return self._unsupported("StartFineTune")

    def fine_tune_progress(
        self, request: pb.FineTuneProgressRequest, ctx: CallContext
    ) -> Iterator[pb.FineTuneProgressUpdate]:
        return self._unsupported("FineTuneProgress")

    def stop_fine_tune(self, request: pb.FineTuneStopRequest, ctx: CallContext) -> pb.Result:
        return self._unsupported("StopFineTune")

    def list_checkpoints(
        self, request: pb.ListCheckpointsRequest, ctx: CallContext
    ) -> pb.ListCheckpointsResponse:
        return self._unsupported("ListCheckpoints")

    def export_model(self, request: pb.ExportModelRequest, ctx: CallContext) -> pb.Result:
        return self._unsupported("ExportModel")

    def start_quantization(
        self, request: pb.QuantizationRequest, ctx: CallContext
    ) -> pb.QuantizationJobResult:
        return self._unsupported("StartQuantization")

    def quantization_progress(
        self, request: pb.QuantizationProgressRequest, ctx: CallContext
    ) -> Iterator[pb.QuantizationProgressUpdate]:
        return self._unsupported("QuantizationProgress")

    def stop_quantization(self, request: pb.QuantizationStopRequest, ctx: CallContext) -> pb.Result:
        return self._unsupported("StopQuantization")


# rpcs the runtime answers itself for every backend (not capabilities of an engine).
_ALWAYS_PROVIDED = frozenset({"Health", "LoadModel", "Free", "Status"})
