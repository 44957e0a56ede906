"""PCM helpers shared by every audio engine: conversions, validation, WAV, resampling.

Requests carry audio in two shapes: float32 samples (``VADRequest.audio``) and 16-bit
little-endian PCM bytes (``AudioEncodeRequest.pcm_data``, TTS output). Validation lives
here once so every rpc refuses the same hostile input (empty, NaN/inf, a byte count that
is not whole samples) with the same ``InvalidArgument`` naming the field.

Resampling uses libswresample through PyAV (the same FFmpeg build that decodes files and
runs libopus), so there is one resampler and no hand-written filter.
"""

from __future__ import annotations

import errno
import io
import wave
from pathlib import Path

import numpy as np

from inferd.errors import InvalidArgument, ResourceExhausted

#: Rates a request may name (PCM in, codec or output rates): telephony to studio.
MIN_RATE = 8000
MAX_RATE = 192000


def check_rate(rate: int, field: str) -> int:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidArgument(f"sample rate must be between {MIN_RATE} and {MAX_RATE} Hz, got {rate}", field)
    return int(rate)


def check_samples(samples: np.ndarray, field: str) -> np.ndarray:
    """Refuse empty or non-finite float samples; return them as a contiguous float32 array."""
    arr = np.ascontiguousarray(samples, dtype=np.float32)
    if arr.size == 0:
        raise InvalidArgument("no audio samples", field)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise InvalidArgument(f"sample {bad} is {arr[bad]} (samples must be finite)", field)
    return arr


def s16le_to_int16(data: bytes, field: str, channels: int = 1) -> np.ndarray:
    """Bytes of interleaved s16le -> int16 array of shape (frames, channels)."""
    width = 2 * channels
    if len(data) % width:
        raise InvalidArgument(
            f"{len(data)} bytes is not a whole number of {channels}-channel 16-bit samples "
            f"(must be a multiple of {width})", field)
    return np.frombuffer(data, dtype="<i2").reshape(-1, channels)


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] (clipped) -> int16."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def wav_bytes(pcm: np.ndarray, rate: int) -> bytes:
    """A complete mono 16-bit WAV file holding ``pcm`` (int16)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())
    return buf.getvalue()


def write_wav(path: Path, pcm: np.ndarray, rate: int, field: str = "dst") -> None:
    """Write ``pcm`` (int16 mono) to ``path`` atomically (a temp file renamed in place).

    An existing target that is not a regular file (``/dev/null``, a FIFO, a device) is refused:
    renaming over it would replace the device node, and writing into a device is never what a
    TTS request means. Failures are errors the caller can act on, naming ``field``.
    """
    if path.exists() and not path.is_file():
        raise InvalidArgument(f"{str(path)!r} exists and is not a regular file", field)
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_bytes(wav_bytes(pcm, rate))
        tmp.replace(path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"{field}: no space left to write {str(path)!r}") from None
        raise InvalidArgument(f"cannot write {str(path)!r}: {exc.strerror or exc}", field) from None
    finally:
        tmp.unlink(missing_ok=True)


def resample_int16(pcm: np.ndarray, src_rate: int, dst_rate: int, channels: int = 1) -> np.ndarray:
    """Resample interleaved int16 ``(frames, channels)`` from ``src_rate`` to ``dst_rate`` (libswresample)."""
    if src_rate == dst_rate or pcm.size == 0:
        return pcm
    import av

    layout = "mono" if channels == 1 else "stereo"
    resampler = av.AudioResampler(format="s16", layout=layout, rate=dst_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm.reshape(1, -1)), format="s16", layout=layout)
    frame.sample_rate = src_rate
    out = [f.to_ndarray().reshape(-1, channels) for f in (*resampler.resample(frame), *resampler.resample(None))]
    return np.concatenate(out) if out else np.zeros((0, channels), dtype=np.int16)

