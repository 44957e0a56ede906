"""PCM s16le <-> raw Opus frames, the codec of LocalAI's realtime (WebRTC) API.

Matches LocalAI's ``backend/go/opus/opus.go``: encoding resamples the PCM to the codec
rate (48 kHz by default) and cuts it into 20 ms frames (960 samples), one Opus packet per
frame, no container; decoding returns s16le at 48 kHz. A decoder named by the
``session_id`` option is kept between calls (Opus predicts across packets, and LocalAI's
realtime loop decodes one session's packets in batches every 300 ms); idle ones are
dropped after ``SESSION_IDLE_S`` and at most ``MAX_SESSIONS`` are kept.

Differences, on purpose: the last partial frame is zero-padded and encoded rather than
dropped (no audio is lost; the decoded length is within one frame of the input), and
every knob is an option (see ``EncodeOptions``/``DecodeOptions``).

libopus runs through PyAV's bundled FFmpeg (``libopus`` codec), so nothing is compiled.
Everything here is thread-safe: each call builds its own encoder, and a session's
decoder is used under its own lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inferd.engines.audio.pcm import check_rate, resample_int16, s16le_to_int16
from inferd.errors import InvalidArgument, ResourceExhausted

#: Rates libopus encodes natively.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
#: Frame durations libopus accepts, in ms.
FRAME_MS = (2.5, 5.0, 10.0, 20.0, 40.0, 60.0)
APPLICATIONS = ("audio", "voip", "lowdelay")
DEFAULT_RATE = 48000
DEFAULT_FRAME_MS = 20.0
DEFAULT_BITRATE = 64000  # LocalAI's opus backend
SESSION_IDLE_S = 60.0
MAX_SESSIONS = 256
#: Most audio one AudioDecode returns: a few bytes per packet can stand for 120 ms each, so
#: the output, not the request, is what must be bounded (10 min of 48 kHz stereo is 110 MB).
MAX_DECODE_SECONDS = 600


@dataclass(frozen=True)
class EncodeOptions:
    sample_rate: int = DEFAULT_RATE
    frame_ms: float = DEFAULT_FRAME_MS
    bitrate: int = DEFAULT_BITRATE
    complexity: int = 10
    application: str = "audio"

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate * self.frame_ms / 1000)


@dataclass(frozen=True)
class DecodeOptions:
    sample_rate: int = DEFAULT_RATE
    channels: int = 1
    session_id: str = ""


@dataclass(frozen=True)
class Encoded:
    frames: list[bytes]
    sample_rate: int
    samples_per_frame: int


@dataclass(frozen=True)
class Decoded:
    pcm: bytes
    sample_rate: int
    samples_per_frame: int


def _int_option(options: Mapping[str, str], key: str, default: int) -> int:
    raw = options.get(key, "")
    if raw == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise InvalidArgument(f"expects an integer, got {raw!r}", f"options[{key}]") from None


def parse_encode_options(options: Mapping[str, str]) -> EncodeOptions:
    """``sample_rate`` (codec rate), ``frame_ms`` or ``frame_size`` (samples), ``bitrate`` (bit/s),
    ``complexity`` (0-10), ``application`` (audio|voip|lowdelay); anything else is refused."""
    known = {"sample_rate", "frame_ms", "frame_size", "bitrate", "complexity", "application"}
    for key in options:
        if key not in known:
            raise InvalidArgument(f"unknown option; known: {', '.join(sorted(known))}", f"options[{key}]")
    rate = _int_option(options, "sample_rate", DEFAULT_RATE)
    if rate not in OPUS_RATES:
        raise InvalidArgument(f"Opus encodes at {', '.join(map(str, OPUS_RATES))} Hz, got {rate}",
                              "options[sample_rate]")
    if "frame_size" in options and "frame_ms" in options:
        raise InvalidArgument("give frame_size or frame_ms, not both", "options[frame_size]")
    if "frame_size" in options:
        size = _int_option(options, "frame_size", 0)
        frame_ms = size * 1000 / rate
        field = "options[frame_size]"
    else:
        raw = options.get("frame_ms", "") or str(DEFAULT_FRAME_MS)
        try:
            frame_ms = float(raw)
        except ValueError:
            raise InvalidArgument(f"expects a number, got {raw!r}", "options[frame_ms]") from None
        field = "options[frame_ms]"
    if frame_ms not in FRAME_MS:
        sizes = ", ".join(f"{int(rate * ms / 1000)}" for ms in FRAME_MS)
        raise InvalidArgument(f"Opus frames last {', '.join(f'{m:g}' for m in FRAME_MS)} ms "
                              f"({sizes} samples at {rate} Hz), got {frame_ms:g} ms", field)
    bitrate = _int_option(options, "bitrate", DEFAULT_BITRATE)
    if not 6000 <= bitrate <= 510000:
        raise InvalidArgument(f"must be between 6000 and 510000 bit/s, got {bitrate}", "options[bitrate]")
    complexity = _int_option(options, "complexity", 10)
    if not 0 <= complexity <= 10:
        raise InvalidArgument(f"must be between 0 and 10, got {complexity}", "options[complexity]")
    application = options.get("application", "audio").strip().lower() or "audio"
    if application not in APPLICATIONS:
        raise InvalidArgument(f"must be one of {', '.join(APPLICATIONS)}, got {application!r}",
                              "options[application]")
    return EncodeOptions(rate, frame_ms, bitrate, complexity, application)


def parse_decode_options(options: Mapping[str, str]) -> DecodeOptions:
    """``sample_rate`` (of the PCM returned), ``channels`` (1|2), ``session_id`` (keep the decoder)."""
    known = {"sample_rate", "channels", "session_id"}
    for key in options:
        if key not in known:
            raise InvalidArgument(f"unknown option; known: {', '.join(sorted(known))}", f"options[{key}]")
    rate = check_rate(_int_option(options, "sample_rate", DEFAULT_RATE), "options[sample_rate]")
    channels = _int_option(options, "channels", 1)
    if channels not in (1, 2):
        raise InvalidArgument(f"must be 1 or 2, got {channels}", "options[channels]")
    session = options.get("session_id", "")
    if len(session) > 256:
        raise InvalidArgument("longer than 256 characters", "options[session_id]")
    return DecodeOptions(rate, channels, session)


def _layout(channels: int) -> str:
    return "mono" if channels == 1 else "stereo"


def encode(pcm_data: bytes, sample_rate: int, channels: int, opts: EncodeOptions) -> Encoded:
    """Encode interleaved s16le PCM (``sample_rate`` Hz, ``channels``) into Opus frames."""
    import av

    channels = channels or 1
    if channels not in (1, 2):
        raise InvalidArgument(f"Opus takes 1 or 2 channels, got {channels}", "channels")
    rate = check_rate(sample_rate, "sample_rate") if sample_rate else opts.sample_rate
    pcm = s16le_to_int16(pcm_data, "pcm_data", channels)
    size = opts.frame_size
    if pcm.shape[0] == 0:
        return Encoded([], opts.sample_rate, size)
    pcm = resample_int16(pcm, rate, opts.sample_rate, channels)
    pad = (-pcm.shape[0]) % size
    if pad:
        pcm = np.concatenate([pcm, np.zeros((pad, channels), dtype=np.int16)])
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate = opts.sample_rate
    enc.layout = _layout(channels)
    enc.format = "s16"
    enc.bit_rate = opts.bitrate
    enc.options = {"frame_duration": f"{opts.frame_ms:g}", "application": opts.application,
                   "compression_level": str(opts.complexity)}
    enc.open()
    frames: list[bytes] = []
    for start in range(0, pcm.shape[0], size):
        block = np.ascontiguousarray(pcm[start:start + size].reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(block, format="s16", layout=_layout(channels))
        frame.sample_rate = opts.sample_rate
        frame.pts = start
        frames.extend(bytes(p) for p in enc.encode(frame))
    # No flush: like libopus called directly (LocalAI), one packet per input frame; the
    # encoder's look-ahead stays in the decoder's output delay instead of an extra packet.
    return Encoded(frames, opts.sample_rate, size)


class _Decoder:
    """One libopus decoder (48 kHz, as libopus decodes in FFmpeg) plus its output resampler."""

    def __init__(self, channels: int) -> None:
        import av

        self.channels = channels
        self.ctx = av.CodecContext.create("libopus", "r")
        self.ctx.sample_rate = DEFAULT_RATE
        self.ctx.layout = _layout(channels)
        self.lock = threading.Lock()
        self.last_used = time.monotonic()

    def decode(self, frames: Sequence[bytes], rate: int) -> tuple[np.ndarray, int]:
        import av

        outs: list[np.ndarray] = []
        per_frame = 0
        total, limit = 0, MAX_DECODE_SECONDS * DEFAULT_RATE
        resampler = av.AudioResampler(format="s16", layout=_layout(self.channels), rate=rate)
        for i, data in enumerate(frames):
            if not data:
                raise InvalidArgument("is empty (an Opus packet has at least one byte)", f"frames[{i}]")
            try:
                decoded = self.ctx.decode(av.Packet(bytes(data)))
            except av.error.FFmpegError as exc:
                raise InvalidArgument(f"is not a valid Opus packet ({getattr(exc, 'strerror', exc)})",
                                      f"frames[{i}]") from None
            for frame in decoded:
                if not per_frame:
                    per_frame = frame.samples
                total += frame.samples
                if total > limit:
                    raise ResourceExhausted(f"frames: the decoded audio passes {MAX_DECODE_SECONDS} s at "
                                            f"frame {i}; send fewer frames per call")
                frame.pts = None
                outs.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        outs.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
        pcm = np.concatenate(outs) if outs else np.zeros(0, dtype=np.int16)
        if rate != DEFAULT_RATE and per_frame:
            per_frame = int(round(per_frame * rate / DEFAULT_RATE))
        return pcm, per_frame


class OpusCodec:
    """Encode/decode with per-session decoders; one instance per backend."""

    def __init__(self, idle_s: float = SESSION_IDLE_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[tuple[str, int], _Decoder] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, pcm_data: bytes, sample_rate: int, channels: int, options: Mapping[str, str]) -> Encoded:
        return encode(pcm_data, sample_rate, channels, parse_encode_options(options))

    def decode(self, frames: Sequence[bytes], options: Mapping[str, str]) -> Decoded:
        opts = parse_decode_options(options)
        if not frames:
            return Decoded(b"", opts.sample_rate, int(opts.sample_rate * DEFAULT_FRAME_MS / 1000))
        decoder = self._session(opts) if opts.session_id else _Decoder(opts.channels)
        with decoder.lock:
            pcm, per_frame = decoder.decode(frames, opts.sample_rate)
            decoder.last_used = time.monotonic()
        return Decoded(pcm.astype("<i2").tobytes(), opts.sample_rate, per_frame)

    def sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()

    def _session(self, opts: DecodeOptions) -> _Decoder:
        key = (opts.session_id, opts.channels)
        now = time.monotonic()
        with self._lock:
            for k in [k for k, d in self._sessions.items() if now - d.last_used > self.idle_s]:
                del self._sessions[k]
            decoder = self._sessions.get(key)
            if decoder is None:
                decoder = _Decoder(opts.channels)
                self._sessions[key] = decoder
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(key)
            decoder.last_used = now
            return decoder
