"""Loading a Stable-Diffusion-family pipeline from a path, never from a model hub.

Two forms, as LocalAI's diffusers backend accepts them:

* a diffusers directory (``model_index.json`` + one folder per component), loaded with
  ``DiffusionPipeline.from_pretrained`` (or the class ``PipelineType`` names);
* a single checkpoint file (``.safetensors`` / ``.ckpt``), loaded with the pipeline class's
  ``from_single_file``. diffusers then needs the model family's component configs: give a
  local diffusers directory of the same family as ``config`` (Options ``config:DIR``);
  without one it looks in the Hugging Face cache and fails here, where nothing downloads.

Everything is loaded with ``local_files_only=True``: a name that is not a path is refused
before diffusers could try the hub. Video pipelines are refused (GenerateVideo is not
served: no video model ships and none can be downloaded here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Image pipelines ``PipelineType`` may name (LocalAI's names). Empty: model_index.json decides.
IMAGE_PIPELINES = frozenset({
    "DiffusionPipeline", "AutoPipelineForText2Image", "AutoPipelineForImage2Image",
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
})
VIDEO_PIPELINES = frozenset({"StableVideoDiffusionPipeline", "VideoDiffusionPipeline", "WanPipeline",
                             "LTXPipeline", "CogVideoXPipeline"})
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class PipelineLoadError(Exception):
    """The pipeline could not be loaded; the message says what to fix."""


@dataclass(frozen=True)
class PipelineSource:
    path: Path
    single_file: bool


def pipeline_source(path: Path) -> PipelineSource:
    """What kind of model ``path`` is: a diffusers directory or one checkpoint file."""
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PipelineLoadError(f"{str(path)!r} has no model_index.json: not a diffusers pipeline directory")
        return PipelineSource(path, False)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return PipelineSource(path, True)
    raise PipelineLoadError(f"{str(path)!r} is neither a diffusers directory nor a checkpoint file "
                            f"({', '.join(SINGLE_FILE_SUFFIXES)})")


def load_pipeline(source: PipelineSource, *, pipeline_type: str = "", img2img: bool = False,
                  config_dir: Path | None = None, dtype: Any = None) -> Any:
    """The pipeline at ``source``, on CPU, float32 unless ``dtype`` says otherwise."""
    import diffusers
    import torch

    kind = pipeline_type or ("AutoPipelineForImage2Image" if img2img else "")
    if kind in VIDEO_PIPELINES:
        raise PipelineLoadError(f"PipelineType {kind} is a video pipeline; this backend serves GenerateImage only")
    if kind and kind not in IMAGE_PIPELINES:
        raise PipelineLoadError(f"PipelineType {kind!r} is not one of {', '.join(sorted(IMAGE_PIPELINES))}")
    dtype = dtype or torch.float32
    try:
        if source.single_file:
            cls = getattr(diffusers, kind) if kind and kind not in ("DiffusionPipeline", "AutoPipelineForText2Image") \
                else diffusers.StableDiffusionPipeline
            if not hasattr(cls, "from_single_file"):
                raise PipelineLoadError(f"{cls.__name__} cannot load a single checkpoint file")
            kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
            if config_dir is not None:
                kwargs["config"] = str(config_dir)
            return cls.from_single_file(str(source.path), **kwargs)
        cls = getattr(diffusers, kind) if kind else diffusers.DiffusionPipeline
        return cls.from_pretrained(str(source.path), dtype=dtype, local_files_only=True)
    except PipelineLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        hint = ""
        if source.single_file and config_dir is None:
            hint = (" (a single checkpoint file needs its family's configs: set Options config:DIR to a local "
                    "diffusers directory of the same family; nothing can be downloaded here)")
        raise PipelineLoadError(f"cannot load {str(source.path)!r}: {type(exc).__name__}: {exc}{hint}") from None
