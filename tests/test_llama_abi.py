"""The llama-cpp-python bindings we call, checked against the C header they were built from.

llama-cpp-python declares each C function's signature by hand (ctypes ``argtypes`` /
``restype``). When its declaration and the vendored ``llama.h`` disagree, a call either
raises TypeError (issue 10: ``llama_sampler_init_penalties`` gained ``n_vocab`` in the
header, our call passed 4 arguments) or, worse, passes garbage to C. This test reads the
header the installed wheel ships (``site-packages/include/llama.h``, installed from
``vendor/llama.cpp/include``), finds every
``llama_cpp.llama_*`` function the engine references, and checks arity and the kind of
each parameter and of the return value (pointer, float, double, bool, integer width,
struct by value). ``test_every_sampler_binding_runs`` then calls every sampler
constructor the engine uses, with the engine's own argument lists, on a real model.
"""

from __future__ import annotations

import ast
import ctypes
import re
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

ENGINE_DIR = Path(__file__).resolve().parent.parent / "src" / "inferd" / "engines" / "llama"
# the wheel installs the vendored headers next to the package (CMAKE_INSTALL_INCLUDEDIR)
_PKG = Path(llama_cpp.__file__).resolve().parent
HEADER = next((p for p in (_PKG / "include" / "llama.h", _PKG.parent / "include" / "llama.h") if p.is_file()),
              _PKG / "include" / "llama.h")

_INT_TYPES = {
    "int": 4, "int32_t": 4, "uint32_t": 4, "llama_token": 4, "llama_pos": 4, "llama_seq_id": 4,
    "int64_t": 8, "uint64_t": 8, "size_t": 8, "int8_t": 1, "uint8_t": 1, "char": 1,
}
#: typedefs of llama.h that are pointers
_POINTER_TYPEDEFS = {"llama_memory_t", "llama_sampler_context_t"}


def engine_functions() -> set[str]:
    """Every ``llama_cpp.llama_*`` attribute the engine's modules reference that is a C function."""
    names: set[str] = set()
    for path in ENGINE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "llama_cpp" and node.attr.startswith("llama_")):
                names.add(node.attr)
    return {n for n in names if hasattr(getattr(llama_cpp, n, None), "argtypes")}


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def header_prototype(header: str, name: str) -> tuple[str, list[str]]:
    """(return type, parameter declarations) of ``name`` in the header."""
    match = re.search(r"LLAMA_API\s+([^;{}()]*?)\b" + re.escape(name) + r"\s*\(([^;]*?)\)\s*[;,]", header)
    assert match, f"{name} is not declared in {HEADER}"
    ret, params = match.group(1).strip(), match.group(2).strip()
    if params in ("", "void"):
        return ret, []
    return ret, [p.strip() for p in params.split(",")]


def c_kind(decl: str) -> str:
    """Classify a C declaration (parameter or return type) into a comparable kind."""
    decl = re.sub(r"\bconst\b", " ", decl).strip()
    words = decl.split()
    if "*" in decl or words[0] in _POINTER_TYPEDEFS:
        return "pointer"
    base = words[0] if words[0] not in ("struct", "enum") else words[0] + " " + words[1]
    if base == "float":
        return "float"
    if base == "double":
        return "double"
    if base == "bool":
        return "bool"
    if base == "void":
        return "void"
    if base.startswith("enum "):
        return "int4"
    if base.startswith("struct "):
        return "struct " + base.split()[1]
    if base in _INT_TYPES:
        return f"int{_INT_TYPES[base]}"
    raise AssertionError(f"unclassified C type in {decl!r}")


def ctypes_kind(t: object) -> str:
    if t is None:
        return "void"
    if t in (ctypes.c_void_p, ctypes.c_char_p) or (isinstance(t, type) and (
            issubclass(t, ctypes._Pointer) or issubclass(t, ctypes._CFuncPtr))):  # type: ignore[attr-defined]
        return "pointer"
    if t is ctypes.c_float:
        return "float"
    if t is ctypes.c_double:
        return "double"
    if t is ctypes.c_bool:
        return "bool"
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return "struct " + t.__name__
    if isinstance(t, type) and issubclass(t, ctypes._SimpleCData):  # type: ignore[attr-defined]
        return f"int{ctypes.sizeof(t)}"
    raise AssertionError(f"unclassified ctypes type {t!r}")


@pytest.fixture(scope="module")
def header() -> str:
    if not HEADER.is_file():
        pytest.skip(f"the installed llama_cpp ships no header at {HEADER}")
    return _strip_comments(HEADER.read_text())


def test_engine_uses_the_functions_we_expect() -> None:
    used = engine_functions()
    # sanity: the scan sees the hot path and the binding that broke (issue 10)
    assert {"llama_decode", "llama_sampler_sample", "llama_sampler_init_penalties",
            "llama_memory_seq_cp", "llama_memory_seq_rm"} <= used, sorted(used)


def test_every_binding_the_engine_calls_matches_llama_h(header: str) -> None:
    problems = []
    for name in sorted(engine_functions()):
        fn = getattr(llama_cpp, name)
        ret, params = header_prototype(header, name)
        argtypes = list(fn.argtypes or [])
        if len(params) != len(argtypes):
            problems.append(f"{name}: llama.h has {len(params)} parameters {params}, "
                            f"the binding declares {len(argtypes)}")
            continue
        for i, (decl, t) in enumerate(zip(params, argtypes, strict=True)):
            want, got = c_kind(decl), ctypes_kind(t)
            if want.startswith("struct ") and got.startswith("struct "):
                continue  # by-value structs: the names differ (llama_batch vs llama_batch)
            if want != got:
                problems.append(f"{name}: parameter {i} ({decl!r}) is {want} in llama.h, {got} in the binding")
        want_ret, got_ret = c_kind(ret), ctypes_kind(fn.restype)
        if not (want_ret == got_ret or (want_ret.startswith("struct") and got_ret.startswith("struct"))):
            problems.append(f"{name}: returns {want_ret} in llama.h, {got_ret} in the binding")
    assert not problems, "\n".join(problems)


def test_every_sampler_binding_runs() -> None:
    """Each sampler constructor the engine uses, called by the engine on a real model."""
    from inferd.engines.llama import LlamaModel, ModelConfig, SamplingParams, default_model_path
    from inferd.engines.llama.sampling import build_sampler, free_sampler

    model = LlamaModel(ModelConfig(path=default_model_path(), n_ctx=256, slots=1, threads=1))
    try:
        variants = [
            SamplingParams(temperature=0),
            SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.1, typical_p=0.8,
                           repeat_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5,
                           logit_bias={5: -1.0}, grammar='root ::= "a"', seed=3),
            SamplingParams(temperature=0.7, mirostat=1, seed=3),
            SamplingParams(temperature=0.7, mirostat=2, seed=3),
        ]
        for params in variants:
            chain = build_sampler(params, model.vocab, model.n_vocab, model.n_ctx, model.eog_tokens)
            assert chain
            free_sampler(chain)
    finally:
        model.close()
