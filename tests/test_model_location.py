"""The one model-location rule (inferd.paths.resolve_model_location) and its confinement.

Before issue 10 the rule was written twice with opposite precedence (llama-cpp tried
``Model`` as a path before ``ModelPath/Model``; sentence-embeddings the other way round).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inferd.errors import InvalidArgument
from inferd.paths import resolve_model_location


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"a")
    (models / "b.gguf").write_bytes(b"b")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "b.gguf").write_bytes(b"cwd-b")  # same name as models/b.gguf, other directory
    monkeypatch.chdir(cwd)
    return models


def test_nothing_named_is_not_requested():
    loc = resolve_model_location("", "", "/somewhere")
    assert loc.path is None and not loc.requested


def test_model_file_wins(tree: Path):
    loc = resolve_model_location("b.gguf", str(tree / "a.gguf"), str(tree))
    assert loc.path == tree / "a.gguf"


def test_model_path_and_model_beat_model_as_a_path(tree: Path):
    # b.gguf exists both in the working directory and in ModelPath: ModelPath/Model wins.
    loc = resolve_model_location("b.gguf", "", str(tree))
    assert loc.path == tree / "b.gguf"


def test_missing_model_file_falls_through_and_is_reported(tree: Path):
    loc = resolve_model_location("a.gguf", str(tree / "gone.gguf"), str(tree))
    assert loc.path == tree / "a.gguf"
    assert "ModelFile" in loc.tried[0] and "gone.gguf" in loc.tried[0]


def test_model_as_a_path(tree: Path):
    assert resolve_model_location("b.gguf").path == Path("b.gguf")
    assert resolve_model_location(str(tree / "a.gguf"), "", "/elsewhere").path == tree / "a.gguf"


def test_nothing_exists_lists_every_candidate(tree: Path):
    loc = resolve_model_location("nope.gguf", "/no/file.gguf", str(tree))
    assert loc.path is None and loc.requested
    reason = loc.reason()
    assert "ModelFile" in reason and "ModelPath/Model" in reason and "Model '" in reason


def test_models_dir_relative_names_resolve_inside_it(tree: Path):
    loc = resolve_model_location("a.gguf", "", "", models_dir=str(tree))
    assert loc.path == Path(os.path.realpath(tree / "a.gguf"))


@pytest.mark.parametrize("field,kwargs", [
    ("ModelFile", {"model_file": "../cwd/b.gguf"}),
    ("ModelFile", {"model_file": "/etc/passwd"}),
    ("Model", {"model": "/etc/passwd"}),
    ("ModelPath/Model", {"model": "b.gguf", "model_path": "/etc"}),
])
def test_models_dir_refuses_escapes_naming_the_field(tree: Path, field: str, kwargs: dict):
    with pytest.raises(InvalidArgument) as err:
        resolve_model_location(models_dir=str(tree), **kwargs)
    assert err.value.field == field
    assert "outside INFERD_MODELS_DIR" in err.value.message


def test_models_dir_refuses_a_symlink_out(tree: Path, tmp_path: Path):
    (tree / "link.gguf").symlink_to(tmp_path / "cwd" / "b.gguf")
    with pytest.raises(InvalidArgument, match="outside INFERD_MODELS_DIR"):
        resolve_model_location("link.gguf", models_dir=str(tree))


def test_escape_is_refused_even_if_a_later_candidate_matches(tree: Path):
    with pytest.raises(InvalidArgument) as err:
        resolve_model_location("a.gguf", "/etc/passwd", "", models_dir=str(tree))
    assert err.value.field == "ModelFile"
