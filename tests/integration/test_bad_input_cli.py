"""Every bad input named in the contract, through the real CLI: one readable line, a
non-zero exit, and nothing already ingested or validated touched."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from lmops.config import apply_overrides
from tests.conftest import REPO_ROOT, tool_env, tree_digest


def _empty(path: Path) -> str:
    path.with_suffix(".csv").write_bytes(b"")
    return "data.csv"


def _missing_label(path: Path) -> str:
    pd.DataFrame({"text": ["a", "b"], "stars": [1, 2]}).to_csv(
        path.with_suffix(".csv"), index=False
    )
    return "data.csv"


def _not_utf8(path: Path) -> str:
    path.with_suffix(".csv").write_bytes("text,label\n好评,1\n".encode("gb18030"))
    return "data.csv"


def _null_texts(path: Path) -> str:
    path.with_suffix(".jsonl").write_text(
        '{"text": "fine", "label": "a"}\n{"text": null, "label": "b"}\n', "utf-8"
    )
    return "data.jsonl"


def _huge_text(path: Path) -> str:
    frame = pd.DataFrame({"text": ["short", "x" * 50 * 1024 * 1024], "label": ["a", "b"]})
    frame.to_parquet(path.with_suffix(".parquet"), index=False)
    return "data.parquet"


def _broken_csv_quotes(path: Path) -> str:
    path.with_suffix(".csv").write_text('text,label\n"never closed,1\nok,0\n', "utf-8")
    return "data.csv"


def _single_class(path: Path) -> str:
    pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": "only"}).to_csv(
        path.with_suffix(".csv"), index=False
    )
    return "data.csv"


def _float_labels(path: Path) -> str:
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0.5, 1.0, 0.0]}).to_csv(
        path.with_suffix(".csv"), index=False
    )
    return "data.csv"


def _no_such_path(path: Path) -> str:
    return "does/not/exist.csv"


def _unknown_builtin(path: Path) -> str:
    return "builtin:en-tweets"


def _corpus_as_source(path: Path) -> str:
    return "builtin:zh-news"


CASES: list[tuple[str, Callable[[Path], str], str]] = [
    ("empty file", _empty, "data.csv is empty"),
    ("missing label column", _missing_label, "lacks column(s) label (found: text, stars)"),
    ("non-UTF-8 bytes", _not_utf8, "not valid UTF-8"),
    ("null texts", _null_texts, "1 row(s) have no text (rows 2)"),
    ("50 MB single text", _huge_text, "52,428,800 characters, over data.max_text_chars"),
    ("unclosed CSV quote", _broken_csv_quotes, "cannot parse"),
    ("single class", _single_class, "only one class ('only')"),
    ("float labels", _float_labels, "holds the float 0.5"),
    ("path that does not exist", _no_such_path, "no such file"),
    ("unknown builtin", _unknown_builtin, "unknown builtin 'builtin:en-tweets'"),
    ("corpus given as labelled data", _corpus_as_source, "is an unlabelled corpus"),
]


def _ingest(workspace: Path) -> subprocess.CompletedProcess:
    return _stage(workspace, "ingest")


def _stage(workspace: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmops", "stage", name],
        cwd=workspace,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text("utf-8"), "utf-8")
    (tmp_path / "corpus.txt").write_text("some corpus text\n", "utf-8")
    for done in ("ingested", "validated"):
        (tmp_path / "data" / done).mkdir(parents=True)
        (tmp_path / "data" / done / "train.parquet").write_bytes(f"good {done}".encode())
    return tmp_path


@pytest.mark.parametrize(
    ("make_source", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_source_gets_one_clear_line(
    workspace: Path, make_source: Callable[[Path], str], expected: str
) -> None:
    source = make_source(workspace / "data")  # makers write workspace/data.<suffix>
    apply_overrides(workspace, {"data.source": source, "data.corpus": "corpus.txt"})
    before = tree_digest(workspace / "data")
    result = _ingest(workspace)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: data.source" in result.stderr
    assert expected in result.stderr
    assert tree_digest(workspace / "data") == before


def test_unknown_param_key_at_the_cli(workspace: Path) -> None:
    text = (
        (workspace / "params.yaml")
        .read_text("utf-8")
        .replace("  normalization:", "  normalisation:")
    )
    (workspace / "params.yaml").write_text(text, "utf-8")
    result = _ingest(workspace)
    assert result.returncode == 1
    assert "data.normalisation: unknown key" in result.stderr
    assert "data.normalization: missing key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_failed_data_contract_prints_only_lmops_error(tmp_path: Path) -> None:
    """GX's own logs (a Data Docs renderer's KeyError traceback) stay out of the output."""
    from lmops.config import resolve_overrides

    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text("utf-8"), "utf-8")
    shutil.copytree(REPO_ROOT / "profiles", tmp_path / "profiles")
    apply_overrides(tmp_path, resolve_overrides(tmp_path, "tiny", []))
    assert _stage(tmp_path, "ingest").returncode == 0
    train = tmp_path / "data" / "ingested" / "train.parquet"
    frame = pd.read_parquet(train)
    frame.loc[frame.index[:40], "label"] = "weird"
    frame.to_parquet(train)
    result = _stage(tmp_path, "validate")
    assert result.returncode == 1
    assert "error: 1 expectation(s) failed; batch quarantined" in result.stderr
    assert "values 'weird'" in result.stderr
    for noise in ("Traceback", "KeyError", "ephemeral docs site"):
        assert noise not in result.stderr, result.stderr


def test_an_unknown_builtin_base_is_one_line_before_any_run(workspace: Path) -> None:
    before = (workspace / "params.yaml").read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "lmops", "run", "--set", "model.init_from=builtin:bert-huge"],
        cwd=workspace,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "unknown builtin base 'builtin:bert-huge' (known: builtin:all-minilm-l6-v2)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert (workspace / "params.yaml").read_bytes() == before
