"""``ImageGenerator``: text-to-image and image-to-image with one loaded diffusers pipeline.

One set of weights serves both: the image-to-image pipeline is made from the loaded one
with ``AutoPipelineForImage2Image.from_pipe`` (components shared, no second copy), and
the other way round when an image-to-image model was loaded. Calls are serialized by the
backend (diffusers pipelines are not thread-safe); a cancelled call stops between
denoising steps (the step callback sets the pipeline's interrupt flag).

Determinism: ``seed > 0`` seeds a CPU ``torch.Generator``, so the same seed, prompt,
size, steps and scheduler give the same PNG on the same machine; ``seed <= 0`` draws a
random seed (LocalAI's convention) and reports it, so any image can be made again.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferd.errors import Cancelled, InvalidArgument

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("inferd.engines.diffusion")

MAX_SIDE = 2048
MAX_STEPS = 500
MAX_PROMPT_CHARS = 16384
#: Arguments LocalAI's ``EnableParameters`` may name (which call arguments are passed).
KNOWN_PARAMETERS = ("negative_prompt", "num_inference_steps", "width", "height", "clip_skip", "image")


@dataclass(frozen=True)
class ImageJob:
    """One GenerateImage call in plain terms (validated by ``ImageGenerator.prepare``)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 0  # 0: the model's native size (img2img: the source's size)
    height: int = 0
    steps: int = 0  # 0: the generator's default
    seed: int = 0  # <= 0: random
    source: Image.Image | None = None  # img2img when set
    clip_skip: int = 0
    enable_parameters: str = ""  # LocalAI: comma list of the arguments to pass; "none"; "" = all


@dataclass(frozen=True)
class GeneratedImage:
    path: Path
    width: int
    height: int
    seed: int
    steps: int


class ImageGenerator:
    """A loaded pipeline plus the defaults of this model (guidance, steps, strength)."""

    def __init__(self, pipeline: Any, *, guidance_scale: float = 7.0, default_steps: int = 25,
                 strength: float = 0.75, clip_skip: int = 0, device: str = "cpu") -> None:
        self.pipeline = pipeline
        self.guidance_scale = guidance_scale
        self.default_steps = default_steps
        self.strength = strength
        self.clip_skip = clip_skip
        self.device = device
        self._img2img: Any = None
        self._txt2img: Any = None
        pipeline.set_progress_bar_config(disable=True)
        self.vae_scale = int(getattr(pipeline, "vae_scale_factor", 8) or 8)
        unet = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        sample = getattr(getattr(unet, "config", None), "sample_size", None)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        self.native_size = int(sample) * self.vae_scale if isinstance(sample, int) else 512
        encoder = getattr(pipeline, "text_encoder", None)
        self.text_layers = int(getattr(getattr(encoder, "config", None), "num_hidden_layers", 0) or 0)
        _clip_skip_compat(encoder)

    # ---- validation --------------------------------------------------------------------
    def _side(self, value: int, field: str) -> int:
        if value < 0 or value > MAX_SIDE:
            raise InvalidArgument(f"must be between {self.vae_scale} and {MAX_SIDE} pixels, got {value}", field)
        if value and (value < self.vae_scale or value % self.vae_scale):
            raise InvalidArgument(f"must be a multiple of {self.vae_scale} (the VAE's scale factor), got {value}",
                                  field)
        return value

    def prepare(self, job: ImageJob) -> ImageJob:
        """Check every field; raise ``InvalidArgument`` naming the protocol field."""
        if not job.prompt.strip():
            raise InvalidArgument("must not be empty", "positive_prompt")
        for text, field in ((job.prompt, "positive_prompt"), (job.negative_prompt, "negative_prompt")):
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidArgument(f"{len(text)} characters; the limit is {MAX_PROMPT_CHARS}", field)
        self._side(job.width, "width")
        self._side(job.height, "height")
        if job.steps < 0 or job.steps > MAX_STEPS:
            raise InvalidArgument(f"must be between 1 and {MAX_STEPS} (0: default {self.default_steps}), "
                                  f"got {job.steps}", "step")
        if job.clip_skip < 0 or (self.text_layers and job.clip_skip >= self.text_layers):
            raise InvalidArgument(f"must be between 0 and {max(self.text_layers - 1, 0)} (the text encoder has "
                                  f"{self.text_layers} layers), got {job.clip_skip}", "CLIPSkip")
        if job.enable_parameters and job.enable_parameters.strip().lower() != "none":
            unknown = [p for p in _split(job.enable_parameters) if p not in KNOWN_PARAMETERS]
            if unknown:
                raise InvalidArgument(f"unknown parameters {unknown}; known: {', '.join(KNOWN_PARAMETERS)}",
                                      "EnableParameters")
        return job

    # ---- pipelines -----------------------------------------------------------------------
    def _pipe_for(self, img2img: bool) -> Any:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

        base_is_img2img = "Img2Img" in type(self.pipeline).__name__
        if img2img == base_is_img2img:
            return self.pipeline
        if img2img:
            if self._img2img is None:
                self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipeline)
                self._img2img.set_progress_bar_config(disable=True)
            return self._img2img
        if self._txt2img is None:
            self._txt2img = AutoPipelineForText2Image.from_pipe(self.pipeline)
            self._txt2img.set_progress_bar_config(disable=True)
        return self._txt2img

    # ---- generation ------------------------------------------------------------------------
    def generate(self, job: ImageJob, dst: Path, cancelled: Any = None) -> GeneratedImage:
        """Run the pipeline for ``job`` and write a PNG at ``dst``; ``cancelled()`` stops it."""
        import torch

        job = self.prepare(job)
        seed = job.seed if job.seed > 0 else secrets.randbelow(2**31 - 1) + 1
        steps = job.steps or self.default_steps
        source = job.source
        if source is not None:
            width, height = source.size
            if job.width and job.height:
                width, height = job.width, job.height
            target: tuple[int, int] | None = (width, height)
            # the model works on multiples of the VAE scale; the result is resized back
            work = (max(self.vae_scale, width // self.vae_scale * self.vae_scale),
                    max(self.vae_scale, height // self.vae_scale * self.vae_scale))
            options: dict[str, Any] = {"image": source.resize(work) if source.size != work else source,
                                       "strength": self.strength}
        else:
            width = job.width or self.native_size
            height = job.height or self.native_size
            target = (width, height)
            options = {"width": width, "height": height}
        options.update({"negative_prompt": job.negative_prompt or None, "num_inference_steps": steps})
        clip_skip = job.clip_skip or self.clip_skip
        if clip_skip:
            options["clip_skip"] = clip_skip
        if job.enable_parameters:
            chosen = set() if job.enable_parameters.strip().lower() == "none" else set(_split(job.enable_parameters))
            options = {k: v for k, v in options.items() if k in chosen or k not in KNOWN_PARAMETERS}
            if source is not None:
                options["image"] = options.get("image") or source
            elif "width" not in options or "height" not in options:
                target = None  # the size was not passed: the pipeline's own default stands
        pipe = self._pipe_for(source is not None)
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def on_step_end(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if cancelled is not None and cancelled():
                p._interrupt = True
            return kwargs

        with torch.inference_mode():
            result = pipe(prompt=job.prompt, guidance_scale=self.guidance_scale, generator=generator,
                          callback_on_step_end=on_step_end, **options)
        if cancelled is not None and cancelled():
            raise Cancelled("GenerateImage cancelled between denoising steps")
        image = result.images[0]
        if target is not None and image.size != target:
            image = image.resize(target)
        image.save(dst, format="PNG")
        return GeneratedImage(dst, image.size[0], image.size[1], seed, steps)

    def close(self) -> None:
        self.pipeline = self._img2img = self._txt2img = None


def _clip_skip_compat(encoder: Any) -> None:
    """Let diffusers' ``clip_skip`` path find the final LayerNorm under transformers 5.

    diffusers 0.42.1's SD pipelines apply ``text_encoder.text_model.final_layer_norm`` after
    skipping layers: the transformers 4 layout. transformers 5 flattened ``CLIPTextModel``
    (``final_layer_norm`` is on the model itself), so every request with CLIPSkip failed
    with AttributeError. The alias is a plain instance attribute, not a registered
    submodule, so state_dict/.to() never see a cycle.
    """
    if encoder is None or "text_model" in vars(encoder):
        return
    try:
        encoder.text_model  # noqa: B018 - the transformers 4 layout has it
    except AttributeError:
        if hasattr(encoder, "final_layer_norm"):
            object.__setattr__(encoder, "text_model", encoder)


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]
