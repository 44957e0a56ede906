"""Quantization type names -> llama.cpp's ``llama_ftype`` and ``ggml_type`` numbers.

Numbers, not ``llama_cpp`` attributes, so the server validates a request without importing
llama.cpp; ``tests/test_model_ops_units.py`` checks them against llama-cpp-python's
constants (and those were checked against the vendored ``llama.h``/``ggml.h``).

The IQ1/IQ2/IQ3_XXS types are left out on purpose: llama.cpp refuses them without an
importance matrix ("this quantization requires an imatrix"), which this API has no field for.
"""

from __future__ import annotations

from inferd.errors import InvalidArgument

#: ``quantization_type`` -> ``llama_ftype`` (include/llama.h).
FTYPES: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30, "bf16": 32,
    "tq1_0": 36, "tq2_0": 37,
}
#: Aliases llama-quantize also accepts.
ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m"}

#: Tensor types for ``output_tensor_type`` / ``token_embedding_type`` (ggml/include/ggml.h).
GGML_TYPES: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10,
    "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14, "iq4_nl": 20, "iq4_xs": 23, "bf16": 30,
}


def parse_ftype(name: str, field: str = "quantization_type") -> tuple[str, int]:
    """The canonical name and ftype of ``name`` (case-insensitive); unknown -> InvalidArgument."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FTYPES:
        valid = ", ".join(FTYPES)
        raise InvalidArgument(f"unknown quantization type {name!r}; valid: {valid}", field)
    return key, FTYPES[key]


def parse_ggml_type(name: str, field: str) -> int:
    key = name.strip().lower()
    if key not in GGML_TYPES:
        raise InvalidArgument(f"unknown tensor type {name!r}; valid: {', '.join(GGML_TYPES)}", field)
    return GGML_TYPES[key]
