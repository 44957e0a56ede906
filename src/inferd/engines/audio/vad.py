"""Silero VAD on onnxruntime (no torch): float32 16 kHz mono -> speech segments in seconds.

Two exports of the same model are understood (told apart by their inputs):

* the **sequence** model (``silero_vad_16k_sequence.onnx``, the packaged default): one ONNX
  call per block of up to ``BLOCK_FRAMES`` windows (512 x 32 ms = 16.4 s), bit-exact with the
  streaming model; the whole block runs inside onnxruntime with the GIL released, so a long
  input is processed in chunks at C speed (see the wheel's ``sequence_vad.py``);
* the classic **streaming** model (``silero_vad.onnx``, what LocalAI's silero-vad backend
  loads): one call per 512-sample window plus 64 samples of context, a (2, 1, 128) state
  carried in Python.

Either way each window's speech probability goes to ``Segmenter``, an online version of
silero's ``get_speech_timestamps`` (threshold with hysteresis, minimum speech/silence
durations, padding, a maximum segment length) that keeps only the current segment and the
one before it. Memory beyond the input stays constant however long it is (one block of
windows, no probability history), and cancellation is checked between blocks.

State is per call, so one ``SileroVad`` serves concurrent calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferd.errors import Cancelled, InvalidArgument, LoadError

SAMPLE_RATE = 16000
WINDOW = 512
CONTEXT = 64
_CHECK_EVERY = 64  # windows (~2 s of audio) between cancellation checks (streaming model)
BLOCK_FRAMES = 512  # windows per ONNX call of the sequence model (16.4 s)


@dataclass(frozen=True)
class VadConfig:
    """Tuning, in silero's units; the defaults are LocalAI's silero-vad backend's."""

    threshold: float = 0.5
    neg_threshold: float | None = None  # default: threshold - 0.15 (silero)
    min_speech_ms: float = 250.0
    min_silence_ms: float = 100.0
    speech_pad_ms: float = 30.0
    max_speech_s: float = math.inf

    def validate(self) -> VadConfig:
        if not 0.0 < self.threshold < 1.0:
            raise LoadError(f"Options: threshold must be within (0, 1), got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 < self.neg_threshold <= self.threshold:
            raise LoadError(f"Options: neg_threshold must be within (0, threshold], got {self.neg_threshold}")
        for name in ("min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            value = getattr(self, name)
            if not 0.0 <= value <= 60_000:
                raise LoadError(f"Options: {name} must be within 0..60000 ms, got {value}")
        if not self.max_speech_s > 0:
            raise LoadError(f"Options: max_speech_s must be > 0, got {self.max_speech_s}")
        return self


class Segmenter:
    """Turns per-window speech probabilities into (start, end) sample ranges, online.

    ``push(prob)`` per window, ``finish(total_samples)`` at the end; both return the
    segments that became final. A closed segment is held back until the next one starts
    (or the input ends) because its end padding depends on the gap to the next one.
    """

    def __init__(self, cfg: VadConfig, rate: int = SAMPLE_RATE, window: int = WINDOW) -> None:
        self.cfg = cfg
        self.window = window
        self.threshold = cfg.threshold
        self.neg_threshold = cfg.neg_threshold if cfg.neg_threshold is not None else max(cfg.threshold - 0.15, 0.01)
        self.min_speech = rate * cfg.min_speech_ms / 1000
        self.min_silence = rate * cfg.min_silence_ms / 1000
        self.pad = int(rate * cfg.speech_pad_ms / 1000)
        self.max_speech = rate * cfg.max_speech_s - window - 2 * self.pad
        self.index = 0
        self.start: int | None = None  # start of the segment in progress
        self.temp_end = 0  # where a possible end (silence) began
        self.pending: tuple[int, int] | None = None  # closed, not yet padded on the right

    def push(self, prob: float) -> list[tuple[int, int]]:
        cur = self.window * self.index
        self.index += 1
        out: list[tuple[int, int]] = []
        if prob >= self.threshold:
            self.temp_end = 0
            if self.start is None:
                self.start = cur
                return out
        if self.start is None:
            return out
        if cur - self.start > self.max_speech:
            end = self.temp_end or cur
            out += self._close(self.start, end)
            self.start = cur if prob >= self.threshold else None
            self.temp_end = 0
            return out
        if prob < self.neg_threshold:
            if not self.temp_end:
                self.temp_end = cur
            if cur - self.temp_end >= self.min_silence:
                out += self._close(self.start, self.temp_end)
                self.start = None
                self.temp_end = 0
        return out

    def finish(self, total: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        if self.start is not None:
            out += self._close(self.start, total)
            self.start = None
        if self.pending is not None:
            s, e = self.pending
            out.append((s, min(total, e + self.pad)))
            self.pending = None
        return out

    def _close(self, start: int, end: int) -> list[tuple[int, int]]:
        if end - start <= self.min_speech:
            return []
        out: list[tuple[int, int]] = []
        left = max(0, start - self.pad)
        if self.pending is not None:
            ps, pe = self.pending
            gap = start - pe
            if gap < 2 * self.pad:  # split a short gap between the two (silero's rule)
                pe += gap // 2
                left = max(0, start - gap // 2)
            else:
                pe += self.pad
            out.append((ps, pe))
            left = max(left, pe)
        self.pending = (left, end)
        return out


class SileroVad:
    """A loaded Silero VAD ONNX model."""

    def __init__(self, model_path: Path, threads: int = 1, config: VadConfig | None = None) -> None:
        import onnxruntime as ort

        if not model_path.is_file():  # a directory, a FIFO or a device would fail or block
            raise LoadError(f"silero-vad: {model_path} is not a regular file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise LoadError(f"silero-vad: cannot load {model_path}: {exc}") from None
        names = {i.name for i in self.session.get_inputs()}
        if {"input", "h", "c"} <= names:
            self.kind = "sequence"
        elif {"input", "state", "sr"} <= names:
            self.kind = "streaming"
        else:
            raise LoadError(f"silero-vad: {model_path} is not a Silero VAD v5+ model (inputs {sorted(names)})")
        self.model_path = model_path
        self.threads = threads
        self.config = (config or VadConfig()).validate()
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def probabilities(self, samples: np.ndarray, cancelled: Callable[[], bool] = lambda: False) -> Iterator[float]:
        """Speech probability of each 512-sample window (the last one zero-padded)."""
        if self.kind == "sequence":
            return self._sequence_probabilities(samples, cancelled)
        return self._streaming_probabilities(samples, cancelled)

    def _sequence_probabilities(self, samples: np.ndarray, cancelled: Callable[[], bool]) -> Iterator[float]:
        hidden = np.zeros((1, 1, 128), dtype=np.float32)
        cell = np.zeros((1, 1, 128), dtype=np.float32)
        context = np.zeros(CONTEXT, dtype=np.float32)
        windows = -(-samples.shape[0] // WINDOW)
        for first in range(0, windows, BLOCK_FRAMES):
            if cancelled():
                raise Cancelled("VAD cancelled")
            count = min(BLOCK_FRAMES, windows - first)
            chunk = samples[first * WINDOW:(first + count) * WINDOW]
            frames = np.zeros((count, WINDOW), dtype=np.float32)
            frames.reshape(-1)[:chunk.shape[0]] = chunk  # the last window zero-padded
            block = np.empty((count, CONTEXT + WINDOW), dtype=np.float32)
            block[:, CONTEXT:] = frames
            block[0, :CONTEXT] = context  # each window sees the previous one's last 64 samples
            block[1:, :CONTEXT] = frames[:-1, -CONTEXT:]
            context = frames[-1, -CONTEXT:].copy()
            probs, hidden, cell = self.session.run(["speech_probs", "hn", "cn"],
                                                   {"input": block, "h": hidden, "c": cell})
            yield from (float(p) for p in np.asarray(probs).reshape(-1))

    def _streaming_probabilities(self, samples: np.ndarray, cancelled: Callable[[], bool]) -> Iterator[float]:
        state = np.zeros((2, 1, 128), dtype=np.float32)
        context = np.zeros(CONTEXT, dtype=np.float32)
        buf = np.empty((1, CONTEXT + WINDOW), dtype=np.float32)
        for n, start in enumerate(range(0, samples.shape[0], WINDOW)):
            if n % _CHECK_EVERY == 0 and cancelled():
                raise Cancelled("VAD cancelled")
            chunk = samples[start:start + WINDOW]
            buf[0, :CONTEXT] = context
            buf[0, CONTEXT:CONTEXT + chunk.shape[0]] = chunk
            if chunk.shape[0] < WINDOW:
                buf[0, CONTEXT + chunk.shape[0]:] = 0.0
            out, state = self.session.run(None, {"input": buf, "state": state, "sr": self._sr})
            context = buf[0, -CONTEXT:].copy()
            yield float(out.reshape(-1)[0])

    def segments(self, samples: np.ndarray, cancelled: Callable[[], bool] = lambda: False,
                 config: VadConfig | None = None) -> list[tuple[float, float]]:
        """Speech segments of ``samples`` (float32, 16 kHz mono) as (start, end) in seconds."""
        if samples.ndim != 1:
            raise InvalidArgument("audio must be one channel", "audio")
        seg = Segmenter(config or self.config)
        ranges: list[tuple[int, int]] = []
        for prob in self.probabilities(samples, cancelled):
            ranges += seg.push(prob)
        ranges += seg.finish(samples.shape[0])
        return [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in ranges]
