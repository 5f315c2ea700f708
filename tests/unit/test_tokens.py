"""Token files (lmops/tokens.py): the windows pretraining reads are the in-memory packing's
rows, shards never leak into each other, and a torn shard, a stale tokenizer, a vocabulary
too big for the dtype or a failed write are each refused or leave nothing behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmops.errors import DataError
from lmops.modeling import load_tokenizer
from lmops.tasks import tokenizer as tokenizer_stage
from lmops.tokens import Windows, dtype_for, parquet_texts, write
from tests.conftest import params_with, tiny_raw

SEQ_LEN = 32
SHA = "tokenizer-digest"


@pytest.fixture(scope="module")
def tokenizer(repo_params_raw: dict, tiny_validated: Path, tmp_path_factory: Any) -> Any:
    params = params_with(tiny_raw(repo_params_raw))
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tokenizer_stage.run(params.tokenizer, params.model, tiny_validated, out, out.parent / "t.json")
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def texts(tiny_validated: Path) -> list[str]:
    return [t for chunk in parquet_texts([tiny_validated / "train.parquet"]) for t in chunk]


def _packed(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """The packing pretraining did in memory before token files: one stream, cut in rows."""
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream = [t for e in encoded for t in (*e.ids, tokenizer.sep_token_id)]
    body = SEQ_LEN - 2
    rows = np.array(stream[: len(stream) // body * body]).reshape(-1, body)
    cls = np.full((len(rows), 1), tokenizer.cls_token_id)
    sep = np.full((len(rows), 1), tokenizer.sep_token_id)
    return np.hstack([cls, rows, sep])


def _windows(tokenizer: Any, folder: Path) -> Windows:
    return Windows(folder, SEQ_LEN, tokenizer.cls_token_id, tokenizer.sep_token_id, SHA)


def _chunks(texts: list[str], size: int = 100) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


def test_one_shard_gives_the_in_memory_packing(
    tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    manifest = write(_chunks(texts), tokenizer, tmp_path / "t", SHA)
    assert manifest.dtype == "uint16" and len(manifest.shards) == 1
    assert manifest.documents == len(texts)
    windows = _windows(tokenizer, tmp_path / "t")
    expected = _packed(tokenizer, texts)
    assert len(windows) == len(expected)
    picked = [0, 7, len(expected) - 1]
    assert np.array_equal(windows.rows(picked).numpy(), expected[picked])


def test_windows_stay_inside_their_shard(tokenizer: Any, texts: list[str], tmp_path: Path) -> None:
    manifest = write(_chunks(texts), tokenizer, tmp_path / "t", SHA, shard_tokens=1000)
    assert len(manifest.shards) > 3
    assert sum(s.tokens for s in manifest.shards) == manifest.tokens
    assert all(s.tokens == 1000 for s in manifest.shards[:-1])
    windows = _windows(tokenizer, tmp_path / "t")
    body = SEQ_LEN - 2
    assert len(windows) == sum(s.tokens // body for s in manifest.shards)
    first_of_second = 1000 // body  # row numbering goes on in the next shard at its start
    second = np.fromfile(tmp_path / "t" / manifest.shards[1].file, dtype=np.uint16)
    assert windows.rows([first_of_second]).numpy()[0, 1:-1].tolist() == second[:body].tolist()
    every = windows.rows(range(len(windows))).numpy()[:, 1:-1]
    counts = np.bincount(every.ravel(), minlength=len(tokenizer))
    assert np.array_equal(windows.token_counts(len(tokenizer)), counts)


def test_a_torn_or_stale_token_file_is_refused(
    tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    folder = tmp_path / "t"
    manifest = write(_chunks(texts), tokenizer, folder, SHA, shard_tokens=1000)
    with pytest.raises(DataError, match="another tokenizer"):
        Windows(folder, SEQ_LEN, 2, 3, "a-newer-tokenizer")
    shard = folder / manifest.shards[2].file
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match=rf"{shard.name}: a torn token shard \(1,997 bytes"):
        _windows(tokenizer, folder)
    shard.unlink()
    with pytest.raises(DataError, match="torn token shard .missing"):
        _windows(tokenizer, folder)


def test_a_vocabulary_that_outgrows_the_dtype(
    tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    assert (dtype_for(65_536), dtype_for(65_537)) == ("uint16", "uint32")
    with pytest.raises(DataError, match="does not fit uint32"):
        dtype_for(2**32 + 1)
    folder = tmp_path / "t"
    write(_chunks(texts[:50]), tokenizer, folder, SHA)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 70_000}))
    with pytest.raises(DataError, match="70,000 tokens outgrows uint16"):
        _windows(tokenizer, folder)


def test_a_failed_write_leaves_the_last_files(
    tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    folder = tmp_path / "t"
    write(_chunks(texts[:50]), tokenizer, folder, SHA)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def failing() -> Iterator[list[str]]:
        yield texts[:100]
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write(failing(), tokenizer, folder, SHA, shard_tokens=500)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no scratch folder left
