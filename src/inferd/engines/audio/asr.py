"""Whisper transcription with faster-whisper (CTranslate2), segment by segment.

``WhisperAsr.transcribe`` takes float32 16 kHz mono samples (``files.load_audio`` decodes
and resamples any file) and returns the detected language, the duration and a lazy
iterator of ``Segment``s: faster-whisper decodes 30 s windows on demand, so a stream can
send each segment's text as soon as it is decoded, and cancellation is checked between
segments.

Threads: CTranslate2 fixes its CPU thread count when a model is built. A request that asks
for another count (``TranscriptRequest.threads``, which LocalAI sends on every call) gets a
second instance of the same model built with that count, kept for later calls (at most
``MAX_THREAD_VARIANTS`` besides the default), so the request is honoured rather than ignored.

Times are seconds here; the backend converts them to LocalAI's unit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inferd.errors import Cancelled, InvalidArgument, LoadError

SAMPLE_RATE = 16000
MAX_THREAD_VARIANTS = 2
GRANULARITIES = ("segment", "word")


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    words: list[Word] = field(default_factory=list)


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings fixed at load (``Options``); a request adds language, prompt, temperature."""

    beam_size: int = 5
    vad_filter: bool = False
    condition_on_previous_text: bool = True


@dataclass
class Transcription:
    language: str
    duration: float
    segments: Iterator[Segment]


class WhisperAsr:
    """A loaded faster-whisper model directory (model.bin, config.json, tokenizer.json...)."""

    def __init__(self, model_dir: Path, threads: int = 1, compute_type: str = "int8",
                 options: DecodeOptions | None = None) -> None:
        if model_dir.is_file():
            model_dir = model_dir.parent
        if not (model_dir / "model.bin").is_file():
            raise LoadError(f"whisper: {model_dir} has no model.bin (a faster-whisper/CTranslate2 model directory)")
        self.model_dir = model_dir
        self.threads = threads
        self.compute_type = compute_type
        self.options = options or DecodeOptions()
        self._lock = threading.Lock()
        self._variants: OrderedDict[int, Any] = OrderedDict()
        self.model = self._build(threads)
        self.multilingual = bool(self.model.model.is_multilingual)

    def _build(self, threads: int) -> Any:
        from faster_whisper import WhisperModel

        try:
            return WhisperModel(str(self.model_dir), device="cpu", compute_type=self.compute_type,
                                cpu_threads=threads, num_workers=1, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - CTranslate2 raises RuntimeError/ValueError for bad files
            raise LoadError(f"whisper: cannot load {self.model_dir}: {type(exc).__name__}: {exc}") from None

    def model_for(self, threads: int) -> Any:
        """The model built with ``threads`` CPU threads (0: the loaded default)."""
        if threads <= 0 or threads == self.threads:
            return self.model
        with self._lock:
            model = self._variants.get(threads)
            if model is None:
                model = self._build(threads)
                self._variants[threads] = model
                while len(self._variants) > MAX_THREAD_VARIANTS:
                    self._variants.popitem(last=False)
            self._variants.move_to_end(threads)
            return model

    def check_language(self, language: str) -> str | None:
        """Normalize ``language`` ("" = detect); refuse what this model cannot do."""
        lang = language.strip().lower().replace("_", "-").split("-")[0]
        if not lang:
            return None
        if not self.multilingual and lang not in ("en", "english"):
            raise InvalidArgument(f"this model ({self.model_dir.name}) is English-only, got {language!r}",
                                  "language")
        if self.multilingual:
            from faster_whisper.tokenizer import _LANGUAGE_CODES

            if lang not in _LANGUAGE_CODES:
                raise InvalidArgument(f"unknown language code {language!r}", "language")
        return "en" if lang == "english" else lang

    def transcribe(self, audio: np.ndarray, *, language: str = "", translate: bool = False, prompt: str = "",
                   temperature: float = 0.0, word_timestamps: bool = False, threads: int = 0,
                   cancelled: Callable[[], bool] = lambda: False) -> Transcription:
        lang = self.check_language(language)
        model = self.model_for(threads)
        temps: float | tuple[float, ...] = temperature if temperature > 0 else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
        opts = self.options
        raw, info = model.transcribe(
            audio, language=lang, task="translate" if translate else "transcribe", beam_size=opts.beam_size,
            temperature=temps, initial_prompt=prompt or None, word_timestamps=word_timestamps,
            vad_filter=opts.vad_filter, condition_on_previous_text=opts.condition_on_previous_text)
        duration = float(info.duration)
        return Transcription(info.language, duration, _segments(raw, duration, cancelled))


def _segments(raw: Any, duration: float, cancelled: Callable[[], bool]) -> Iterator[Segment]:
    """Convert lazily; check cancellation before each window is decoded.

    Whisper predicts timestamps as tokens and may overshoot the end of the audio (a last
    ``<|2.00|>`` on 1.3 s of speech): times are clamped to the audio's duration.
    """
    it = iter(raw)
    for i in range(1 << 62):
        if cancelled():
            raise Cancelled("transcription cancelled")
        s = next(it, None)
        if s is None:
            return
        words = [Word(min(float(w.start), duration), min(float(w.end), duration), w.word) for w in (s.words or [])]
        yield Segment(i, min(float(s.start), duration), min(float(s.end), duration), s.text,
                      [int(t) for t in s.tokens], words)
