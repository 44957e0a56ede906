"""Piper text-to-speech: ONNX voices with espeak-ng phonemes (``piper-tts``, no torch).

``PiperTts`` is loaded with one voice file; every ``*.onnx`` voice with its ``.onnx.json``
beside it in the same directory can be picked per request by name (``voice``), or by
``language`` when no voice is named. Other voices load on first use and stay cached
(at most ``MAX_VOICES``). Voices are only ever chosen from that directory listing, so a
request cannot make the engine open another path.

Synthesis yields one chunk per sentence (espeak-ng splits sentences while phonemizing),
so a stream can send the first sentence while the rest is still being synthesized;
cancellation is checked between sentences. Output is float32 mono at the voice's rate;
piper normalizes each sentence's peak.

piper-tts bundles espeak-ng and its data (no Debian package needed) and guards its
phonemizer with a lock; onnxruntime sessions are thread-safe, so one engine serves
concurrent calls. The ONNX session is built here (not by ``PiperVoice.load``) so its
thread count is bounded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.errors import Cancelled, InvalidArgument, LoadError

#: ~20 minutes of speech (a 53 MB WAV at 22 kHz); TTSStream has the same bound.
MAX_TEXT_CHARS = 20_000
MAX_VOICES = 4


@dataclass(frozen=True)
class SynthesisOptions:
    """Piper's synthesis knobs; None keeps the voice's own value from its .onnx.json."""

    length_scale: float | None = None  # > 1 speaks slower
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    speaker_id: int | None = None
    volume: float = 1.0


@dataclass(frozen=True)
class VoiceInfo:
    name: str  # file stem, e.g. en_US-joe-medium
    path: Path
    language: str  # normalized, e.g. en-us
    family: str  # e.g. en
    sample_rate: int


def normalize_language(code: str) -> str:
    return code.strip().lower().replace("_", "-")


def read_voice_info(path: Path) -> VoiceInfo:
    config = Path(f"{path}.json")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise LoadError(f"piper: voice {path} is not a regular file")
    if not config.is_file():
        raise LoadError(f"piper: voice config {config} not found (a voice is NAME.onnx + NAME.onnx.json)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        rate = int(data["audio"]["sample_rate"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"piper: {config} is not a piper voice config ({type(exc).__name__}: {exc})") from None
    lang = data.get("language") or {}
    code = normalize_language(str(lang.get("code") or data.get("espeak", {}).get("voice", "")))
    family = normalize_language(str(lang.get("family") or code.split("-")[0]))
    return VoiceInfo(path.name[: -len(".onnx")], path, code, family, rate)


def list_voices(directory: Path) -> dict[str, VoiceInfo]:
    voices: dict[str, VoiceInfo] = {}
    for path in sorted(directory.glob("*.onnx")):
        if Path(f"{path}.json").is_file():
            try:
                info = read_voice_info(path)
            except LoadError:
                continue
            voices[info.name] = info
    return voices


class PiperTts:
    """A loaded piper voice directory; synthesize with any voice in it."""

    def __init__(self, model_path: Path, threads: int = 1, options: SynthesisOptions | None = None) -> None:
        if model_path.is_dir():
            found = sorted(model_path.glob("*.onnx"))
            if not found:
                raise LoadError(f"piper: no *.onnx voice in {model_path}")
            model_path = found[0]
        self.default = read_voice_info(model_path)
        self.voices = list_voices(model_path.parent)
        self.voices.setdefault(self.default.name, self.default)
        self.threads = threads
        self.options = options or SynthesisOptions()
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        voice = self._voice(self.default)  # load the default voice now: LoadModel fails if it is broken
        speakers = max(1, voice.config.num_speakers)
        if self.options.speaker_id is not None and not 0 <= self.options.speaker_id < speakers:
            raise LoadError(f"Options: speaker_id must be within 0..{speakers - 1} for voice "
                            f"{self.default.name!r}, got {self.options.speaker_id}")

    # ---- voice selection --------------------------------------------------------------
    def select(self, voice: str = "", language: str = "") -> VoiceInfo:
        """The voice named ``voice`` (file stem or file name), else the first that speaks ``language``."""
        names = ", ".join(sorted(self.voices))
        lang = normalize_language(language)
        if voice:
            key = voice[: -len(".onnx")] if voice.endswith(".onnx") else voice
            info = self.voices.get(key)
            if info is None:
                raise InvalidArgument(f"unknown voice {voice!r}; available: {names}", "voice")
            if lang and lang not in (info.language, info.family):
                raise InvalidArgument(f"voice {info.name!r} speaks {info.language}, not {language!r}", "language")
            return info
        if not lang or lang in (self.default.language, self.default.family):
            return self.default
        for info in self.voices.values():
            if lang in (info.language, info.family):
                return info
        spoken = ", ".join(sorted({v.language for v in self.voices.values()}))
        raise InvalidArgument(f"no voice for language {language!r}; the voices here speak: {spoken}", "language")

    def _voice(self, info: VoiceInfo) -> Any:
        with self._lock:
            voice = self._loaded.get(info.name)
            if voice is None:
                voice = self._load_voice(info)
                if len(self._loaded) >= MAX_VOICES:
                    oldest = next(n for n in self._loaded if n != self.default.name)
                    del self._loaded[oldest]
                self._loaded[info.name] = voice
            return voice

    def _load_voice(self, info: VoiceInfo) -> Any:
        import onnxruntime as ort
        from piper.config import PiperConfig
        from piper.voice import PiperVoice

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            config = PiperConfig.from_dict(json.loads(Path(f"{info.path}.json").read_text(encoding="utf-8")))
            session = ort.InferenceSession(str(info.path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime/piper raise their own types
            raise LoadError(f"piper: cannot load voice {info.path}: {type(exc).__name__}: {exc}") from None
        return PiperVoice(session=session, config=config)

    # ---- synthesis --------------------------------------------------------------------
    def synthesize(self, text: str, voice: VoiceInfo | None = None, options: SynthesisOptions | None = None,
                   cancelled: Callable[[], bool] = lambda: False) -> Iterator[np.ndarray]:
        """Yield float32 mono audio (at ``voice.sample_rate``) sentence by sentence."""
        from piper.config import SynthesisConfig

        if not text.strip():
            raise InvalidArgument("no text to speak", "text")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"{len(text)} characters; the limit is {MAX_TEXT_CHARS}", "text")
        info = voice or self.default
        engine = self._voice(info)
        opts = options or self.options
        speaker = opts.speaker_id
        if speaker is not None and not 0 <= speaker < max(1, engine.config.num_speakers):
            raise InvalidArgument(f"voice {info.name!r} has {engine.config.num_speakers} speaker(s), got {speaker}",
                                  "speaker_id")
        config = SynthesisConfig(speaker_id=speaker, length_scale=opts.length_scale, noise_scale=opts.noise_scale,
                                 noise_w_scale=opts.noise_w_scale, volume=opts.volume)
        if cancelled():
            raise Cancelled("TTS cancelled")
        for chunk in engine.synthesize(text, config):
            yield chunk.audio_float_array
            if cancelled():
                raise Cancelled("TTS cancelled")

