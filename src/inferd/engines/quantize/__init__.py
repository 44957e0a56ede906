"""GGUF quantization through llama.cpp's quantizer, as a job (see ``inferd.engines.jobs``)."""

from inferd.engines.quantize.plan import (
           OPTIONS,
           QuantizePlan,
           plan_quantization,
           prepare_output_dir,
           resolve_input,
)
from inferd.engines.quantize.types import FTYPES, GGML_TYPES, parse_ftype

#: The child-process entry point of a quantization job.
TASK = "inferd.engines.quantize.task:run"

__all__ = ["FTYPES", "GGML_TYPES", "OPTIONS", "TASK", "QuantizePlan", "parse_ftype", "plan_quantization",
           "prepare_output_dir", "resolve_input"]
