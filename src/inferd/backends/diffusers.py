"""``diffusers``: GenerateImage with Stable-Diffusion-family pipelines (HF diffusers, CPU).

Translation only; the engine is ``inferd.engines.diffusion`` (user view: docs/diffusers.md).
No image-generation weights ship in any package we can install, and nothing is downloaded:
the model is a path the user supplies.

LoadModel
    ``ModelFile`` / ``ModelPath``+``Model`` / ``Model``: a diffusers directory
    (``model_index.json``) or one ``.safetensors``/``.ckpt`` checkpoint. A name that is not
    an existing path is refused (no hub access). ``PipelineType`` (LocalAI's names,
    e.g. StableDiffusionPipeline, StableDiffusionXLPipeline; empty: model_index.json
    decides), ``IMG2IMG``, ``SchedulerType`` (LocalAI's names: euler_a, dpmpp_2m,
    k_dpmpp_2m, ddim, ...), ``CFGScale`` (guidance, default 7), ``CLIPSkip``, ``Threads``
    (torch threads), ``CUDA`` (only when torch sees a GPU). ``Options`` (``key:value``):
    ``steps`` (default for calls with step 0; 25), ``strength`` (img2img, 0.75),
    ``config`` (a local diffusers directory giving a single checkpoint's configs).
    ``LoraAdapter`` is refused: LoRA loading is not implemented here.

GenerateImage
    ``positive_prompt`` (required), ``negative_prompt``, ``width``/``height`` (multiples of
    8 up to 2048; 0: the model's native size), ``step``, ``seed`` (> 0 reproducible;
    <= 0 random, reported in the reply), ``src`` (image-to-image: a path, base64 or data:
    URI; the result keeps the source's size unless width and height are both set),
    ``CLIPSkip``, ``EnableParameters`` (LocalAI: which arguments to pass), ``dst`` (the PNG
    written; required; its directory must exist). ``ref_images`` is UNIMPLEMENTED.

GenerateVideo
    UNIMPLEMENTED: it needs a video diffusion model (e.g. a StableVideoDiffusionPipeline
    directory) that no installable package ships.
"""

from __future__ import annotations

from typing import Any, ClassVar

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.backends.options import option_float, option_int, split_options
from inferd.errors import LoadError, NoModelLoaded, Unsupported
from inferd.limits import finite_float, thread_count
from inferd.paths import confine, resolve_model_location, writable_file
from inferd.proto import backend_pb2 as pb

VIDEO_MISSING = ("GenerateVideo needs a video diffusion model (e.g. a StableVideoDiffusionPipeline or "
                 "text-to-video directory); none ships in any package inferd can install and none can be "
                 "downloaded here, so this backend serves GenerateImage only")


def parse_options(items: Any, models_dir: str | None) -> dict[str, Any]:
    raw = {"steps": "25", "strength": "0.75", "config": ""}
    for key, value, _ in split_options(items):
        if key in raw:
            raw[key] = value
    steps = option_int("steps", raw["steps"], minimum=1)
    if steps > 500:
        raise LoadError(f"Options: steps must be <= 500, got {steps}")
    strength = option_float("strength", raw["strength"])
    if not 0.0 < strength <= 1.0:
        raise LoadError(f"Options: strength must be within (0, 1], got {strength}")
    config = None
    if raw["config"].strip():
        config = confine(raw["config"].strip(), models_dir, "Options.config")
        if not (config / "model_index.json").is_file():
            raise LoadError(f"Options: config {str(config)!r} is not a diffusers directory (no model_index.json)")
    return {"steps": steps, "strength": strength, "config": config}


class DiffusersBackend(Backend):
    """One diffusers pipeline; GenerateImage calls are serialized (pipelines are not thread-safe)."""

    name = "diffusers"
    parallel = False
    explained_missing: ClassVar[dict[str, str]] = {"GenerateVideo": VIDEO_MISSING}

    def __init__(self, settings: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.generator: Any = None

    def _images_dir(self) -> str | None:
        return getattr(self.settings, "images_dir", None) or None

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        models_dir = getattr(self.settings, "models_dir", None) or None
        opts = parse_options(options.Options, models_dir)
        if options.LoraAdapter or len(options.LoraAdapters):
            raise LoadError("diffusers: LoRA adapters are not supported by this backend (load a merged model)")
        location = resolve_model_location(options.Model, options.ModelFile, options.ModelPath, models_dir)
        if location.path is None:
            named = options.ModelFile or options.Model
            raise LoadError(
                f"diffusers: {location.reason() if location.requested else 'no model given'}; the model must be a "
                f"local diffusers directory or checkpoint file ({named!r} is not a path, and there is no model hub "
                "access to download it)" if named else "diffusers: no model given and none ships: give the path "
                "of a diffusers directory or checkpoint file")
        guidance = finite_float(options.CFGScale, "CFGScale", 0.0, 100.0) if options.CFGScale else 7.0
        threads = thread_count(options.Threads, default=0)
        try:
            import torch

            from inferd.engines.diffusion import (
                ImageGenerator,
                PipelineLoadError,
                load_pipeline,
                make_scheduler,
                pipeline_source,
            )
        except ImportError as exc:
            raise LoadError(f"diffusers: needs torch and diffusers (pip install 'inferd[diffusion]'): {exc}") from None
        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if options.CUDA and torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" and options.F16Memory else torch.float32
        try:
            source = pipeline_source(location.path)
            pipe = load_pipeline(source, pipeline_type=options.PipelineType, img2img=options.IMG2IMG,
                                 config_dir=opts["config"], dtype=dtype)
        except PipelineLoadError as exc:
            raise LoadError(f"diffusers: {exc}") from None
        scheduler = type(pipe.scheduler).__name__
        if options.SchedulerType:
            try:
                pipe.scheduler = make_scheduler(options.SchedulerType, pipe.scheduler.config)
            except ValueError as exc:
                raise LoadError(f"diffusers: SchedulerType: {exc}") from None
            scheduler = f"{options.SchedulerType} ({type(pipe.scheduler).__name__})"
        pipe = pipe.to(device)
        generator = ImageGenerator(pipe, guidance_scale=guidance, default_steps=opts["steps"],
                                   strength=opts["strength"], clip_skip=max(options.CLIPSkip, 0), device=device)
        if options.CLIPSkip and generator.text_layers and not 0 <= options.CLIPSkip < generator.text_layers:
            raise LoadError(f"diffusers: CLIPSkip must be below the text encoder's {generator.text_layers} layers, "
                            f"got {options.CLIPSkip}")
        self.generator = generator
        return (f"loaded {type(pipe).__name__} from {location.path} on {device}, {str(dtype).removeprefix('torch.')} "
                f"({scheduler}, guidance {guidance:g}, native size {generator.native_size})")

    def unload(self) -> None:
        generator, self.generator = self.generator, None
        if generator is not None:
            generator.close()

    def generate_image(self, request: pb.GenerateImageRequest, ctx: CallContext) -> pb.Result:
        from inferd.engines.diffusion import ImageJob
        from inferd.engines.images import read_image

        generator = self.generator
        if generator is None:
            raise NoModelLoaded(self.name, "GenerateImage")
        if len(request.ref_images):
            raise Unsupported(self.name, "GenerateImage", "ref_images need a reference-image pipeline "
                              "(e.g. Flux Kontext), which this backend does not run")
        dst = writable_file(request.dst, self._images_dir(), "dst", "INFERD_IMAGES_DIR")
        source = read_image(request.src, "src", self._images_dir()) if request.src else None
        job = generator.prepare(ImageJob(
            prompt=request.positive_prompt, negative_prompt=request.negative_prompt, width=request.width,
            height=request.height, steps=request.step, seed=request.seed, source=source,
            clip_skip=request.CLIPSkip, enable_parameters=request.EnableParameters))
        ctx.check()
        out = generator.generate(job, dst, cancelled=ctx.cancelled)
        mode = "image-to-image" if source is not None else "text-to-image"
        return pb.Result(success=True, message=f"{mode}: wrote {out.width}x{out.height} PNG to {out.path} "
                                               f"(seed {out.seed}, {out.steps} steps)")
