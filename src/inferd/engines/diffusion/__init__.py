"""Image generation with Hugging Face diffusers on CPU (plain Python; no gRPC here).

* ``loading``: a pipeline from a local diffusers directory or a single checkpoint file,
  never from a hub.
* ``schedulers``: LocalAI's scheduler names -> diffusers schedulers.
* ``generator``: ``ImageGenerator``, text-to-image and image-to-image to a PNG file.

torch and diffusers are imported only when a pipeline is loaded (the ``diffusion`` extra).
"""

from inferd.engines.diffusion.generator import GeneratedImage, ImageGenerator, ImageJob
from inferd.engines.diffusion.loading import PipelineLoadError, PipelineSource, load_pipeline, pipeline_source
from inferd.engines.diffusion.schedulers import make_scheduler, scheduler_names

__all__ = [
    "GeneratedImage",
    "ImageGenerator",
    "ImageJob",
    "PipelineLoadError",
    "PipelineSource",
    "load_pipeline",
    "make_scheduler",
    "pipeline_source",
    "scheduler_names",
]
