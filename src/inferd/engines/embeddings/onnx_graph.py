"""Build the ONNX graph of a BERT encoder straight from its safetensors weights, no torch.

Why not ``torch.onnx.export``: the packaged model ships no ``.onnx`` file, and an export
needs torch (about 1.5 GB) at least once on every machine. A BERT encoder is a small,
fixed graph (embeddings, N x [self-attention, feed-forward], LayerNorm), so we write it
with ``onnx.helper`` and put the safetensors tensors in as initializers. The result
matches sentence-transformers' torch forward to float32 rounding (cosine > 0.99999,
see docs/embeddings.md and tests/test_embeddings_torch.py).

The graph outputs ``last_hidden_state`` [batch, seq, hidden]; pooling and normalization
follow the model's sentence-transformers config in numpy (``encoder.pool``).

Built graphs are cached under ``~/.cache/inferd/embeddings/`` (``INFERD_CACHE_DIR``
overrides the root), keyed by the model's path, weight size and mtime and by
``GRAPH_VERSION``, so a changed model or builder rebuilds and an unchanged one loads in
milliseconds. ``python -m inferd.engines.embeddings.onnx_graph [MODEL_DIR]`` builds it
ahead of time (optional: the first load builds it too).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from inferd.engines.embeddings.model_files import ModelSpec, read_safetensors, read_spec, resolve_model_dir

#: Bump when the emitted graph changes, so stale cached files are not reused.
GRAPH_VERSION = "bert-1"
OPSET = 17  # LayerNormalization is a standard op from 17; ORT supports it everywhere we run


class UnsupportedArchitecture(Exception):
    """The model is not a BERT-style encoder this builder knows how to write."""


def cache_dir() -> Path:
    root = os.environ.get("INFERD_CACHE_DIR") or os.path.join(Path.home(), ".cache", "inferd")
    return Path(root) / "embeddings"


def cached_graph_path(spec: ModelSpec) -> Path:
    key = hashlib.sha256(f"{GRAPH_VERSION}|{spec.fingerprint()}".encode()).hexdigest()[:20]
    return cache_dir() / f"{spec.path.name}-{key}.onnx"


def check_supported(spec: ModelSpec) -> None:
    cfg = spec.config
    model_type = cfg.get("model_type")
    if model_type not in ("bert",):
        raise UnsupportedArchitecture(f"model_type {model_type!r} (the ONNX builder writes BERT encoders)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitecture(f"position_embedding_type {cfg.get('position_embedding_type')!r}")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedArchitecture(f"hidden_act {cfg.get('hidden_act')!r}")
    if spec.weights_file is None:
        raise UnsupportedArchitecture(f"{spec.path} has no model.safetensors")


def ensure_graph(spec: ModelSpec) -> Path:
    """Return the path of the model's ONNX graph, building and caching it if needed."""
    check_supported(spec)
    target = cached_graph_path(spec)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = build_bert_graph(spec)
    # Write to a temporary name and rename: concurrent builders never see half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        import onnx

        onnx.save_model(model, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like the model
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    assert spec.weights_file is not None
    tensors = read_safetensors(spec.weights_file)
    # Task models (BertForSequenceClassification, ...) prefix the encoder with "bert.".
    if "embeddings.word_embeddings.weight" not in tensors:
        tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("bert.")}
    if "embeddings.word_embeddings.weight" not in tensors:
        raise UnsupportedArchitecture("no embeddings.word_embeddings.weight in the weights")
    return tensors


def build_bert_graph(spec: ModelSpec):  # -> onnx.ModelProto
    """Write BertModel's forward (inference mode) as an ONNX graph with dynamic batch/seq.

    Standard ONNX operators only. Writing the layers with onnxruntime's contrib operators
    (``Attention``, ``SkipLayerNormalization``, ``BiasGelu``) was measured and was not
    faster: onnxruntime's session optimizer already fuses LayerNorm/GELU, and at these
    sequence lengths the GEMMs dominate (docs/embeddings.md).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = spec.config
    w = _weights(spec)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    head_dim = hidden // heads

    nodes: list = []
    inits: list = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    f32 = np.float32
    init("c_head_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    init("c_hidden_shape", np.array([0, 0, hidden], dtype=np.int64))
    init("c_zero_1d", np.array([0], dtype=np.int64))
    init("c_one", np.array(1.0, dtype=f32))
    init("c_half", np.array(0.5, dtype=f32))
    init("c_mask_min", np.array(-10000.0, dtype=f32))  # exp() of it underflows to exactly 0
    init("c_scale", np.array(1.0 / math.sqrt(head_dim), dtype=f32))
    init("c_inv_sqrt2", np.array(1.0 / math.sqrt(2.0), dtype=f32))
    init("c_axes_12", np.array([1, 2], dtype=np.int64))

    def layer_norm(inp: str, prefix: str, out: str, stem: str | None = None) -> str:
        """BERT's LayerNorm over the last axis; weights ``prefix.weight``/``prefix.bias``."""
        stem = stem or out
        gamma = init(f"{stem}_g", w[f"{prefix}.weight"])
        beta = init(f"{stem}_b", w[f"{prefix}.bias"])
        return node("LayerNormalization", [inp, gamma, beta], out, axis=-1, epsilon=eps)

    # ---- embeddings ----------------------------------------------------------------
    word = node("Gather", [init("word_emb", w["embeddings.word_embeddings.weight"]), "input_ids"], "e_word")
    # positions 0..seq-1 as a Slice of the table with 1-D bounds (a Range + Gather with
    # scalar bounds trips one of onnxruntime's embedding fusions)
    seq = node("Shape", ["input_ids"], "e_seq", start=1, end=2)
    pos_table = init("pos_emb", w["embeddings.position_embeddings.weight"])
    pos = node("Slice", [pos_table, "c_zero_1d", seq, "c_zero_1d"], "e_pos")
    typ = node(
        "Gather", [init("type_emb", w["embeddings.token_type_embeddings.weight"]), "token_type_ids"], "e_type"
    )
    x = node("Add", [node("Add", [word, typ], "e_sum1"), pos], "e_sum2")
    x = layer_norm(x, "embeddings.LayerNorm", "e_out", stem="e_ln")

    # additive mask [batch, 1, 1, seq]: 0 for tokens, -10000 for padding
    maskf = node("Cast", ["attention_mask"], "m_f", to=TensorProto.FLOAT)
    inv = node("Sub", ["c_one", maskf], "m_inv")
    bias = node("Mul", [inv, "c_mask_min"], "m_bias2d")
    mask_bias = node("Unsqueeze", [bias, "c_axes_12"], "m_bias")

    def linear(inp: str, prefix: str, out: str) -> str:
        wt = init(f"{out}_w", w[f"{prefix}.weight"].T)  # torch Linear stores [out, in]
        mm = node("MatMul", [inp, wt], f"{out}_mm")
        return node("Add", [mm, init(f"{out}_b", w[f"{prefix}.bias"])], out)

    for i in range(layers):
        p = f"encoder.layer.{i}"
        L = f"l{i}"
        q = linear(x, f"{p}.attention.self.query", f"{L}_q")
        k = linear(x, f"{p}.attention.self.key", f"{L}_k")
        v = linear(x, f"{p}.attention.self.value", f"{L}_v")
        qh = node("Transpose", [node("Reshape", [q, "c_head_shape"], f"{L}_qr")], f"{L}_qt", perm=[0, 2, 1, 3])
        kh = node("Transpose", [node("Reshape", [k, "c_head_shape"], f"{L}_kr")], f"{L}_kt", perm=[0, 2, 3, 1])
        vh = node("Transpose", [node("Reshape", [v, "c_head_shape"], f"{L}_vr")], f"{L}_vt", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [qh, kh], f"{L}_qk"), "c_scale"], f"{L}_scaled")
        probs = node("Softmax", [node("Add", [scores, mask_bias], f"{L}_masked")], f"{L}_probs", axis=-1)
        ctx = node("MatMul", [probs, vh], f"{L}_ctx")
        ctx = node("Transpose", [ctx], f"{L}_ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "c_hidden_shape"], f"{L}_ctx_r")
        attn = linear(ctx, f"{p}.attention.output.dense", f"{L}_ao")
        x = layer_norm(node("Add", [attn, x], f"{L}_res1"), f"{p}.attention.output.LayerNorm", f"{L}_ln1")
        h = linear(x, f"{p}.intermediate.dense", f"{L}_ff1")
        # exact (erf) GELU, as BERT's "gelu"; ORT fuses this pattern into one kernel
        erf = node("Erf", [node("Mul", [h, "c_inv_sqrt2"], f"{L}_g_div")], f"{L}_g_erf")
        gate = node("Mul", [node("Add", [erf, "c_one"], f"{L}_g_add"), "c_half"], f"{L}_g_half")
        h = node("Mul", [h, gate], f"{L}_gelu")
        h = linear(h, f"{p}.output.dense", f"{L}_ff2")
        x = layer_norm(node("Add", [h, x], f"{L}_res2"), f"{p}.output.LayerNorm", f"{L}_ln2")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))

    ids_type = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "bert_encoder",
        [
            ids_type("input_ids", TensorProto.INT64, ["batch", "seq"]),
            ids_type("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            ids_type("token_type_ids", TensorProto.INT64, ["batch", "seq"]),
        ],
        [ids_type("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="inferd",
        producer_version=GRAPH_VERSION,
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the cached graph for a model directory; print its path."""
    args = sys.argv[1:] if argv is None else argv
    spec = read_spec(resolve_model_dir(args[0] if args else ""))
    print(ensure_graph(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
