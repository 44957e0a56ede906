"""Decode an audio file (WAV, FLAC, MP3, OGG/Opus/Vorbis, M4A...) to float32 mono at one rate.

FFmpeg (bundled in PyAV's wheels) reads the container, decodes the codec, downmixes and
resamples in one pass, streaming frame by frame, so a long file never exists twice in
memory. Every failure a user can cause is a precise error naming the request field:
a missing file is ``NotFound``; a directory, a device or FIFO, a text file, a video without
sound, a file with no samples or one longer than ``MAX_SECONDS`` is ``InvalidArgument``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferd.errors import InvalidArgument, NotFound

#: Longest audio decoded for one request (3 h at 16 kHz float32 is ~690 MB).
MAX_SECONDS = 3 * 3600


def load_audio(path: Path, rate: int, field: str = "dst", max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Return the file's first audio stream as float32 mono samples at ``rate`` Hz."""
    import av

    if not path.exists():
        raise NotFound(f"{field}: audio file {str(path)!r} does not exist")
    if path.is_dir():
        raise InvalidArgument(f"{str(path)!r} is a directory, not an audio file", field)
    if not path.is_file():  # a FIFO would block the decoder forever, /dev/urandom never ends
        raise InvalidArgument(f"{str(path)!r} is not a regular file", field)
    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as exc:
        raise InvalidArgument(f"{str(path)!r} is not a readable audio file ({_reason(exc)})", field) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{str(path)!r} cannot be read ({exc})", field) from None
    limit = int(max_seconds * rate)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        streams = container.streams.audio
        if not streams:
            raise InvalidArgument(f"{str(path)!r} has no audio stream", field)
        stream = streams[0]
        stream.thread_count = 1  # decoding audio is cheap; keep FFmpeg off the other cores
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunk = out.to_ndarray().reshape(-1)
                total += chunk.size
                if total > limit:
                    raise InvalidArgument(f"{str(path)!r} is longer than the limit of {max_seconds:g} s", field)
                chunks.append(chunk)
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise InvalidArgument(f"{str(path)!r} could not be decoded ({_reason(exc)})", field) from None
    finally:
        container.close()
    if not chunks or sum(c.size for c in chunks) == 0:
        raise InvalidArgument(f"{str(path)!r} contains no audio samples", field)
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise InvalidArgument(f"{str(path)!r} holds non-finite samples (NaN or inf)", field)
    return samples


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)
