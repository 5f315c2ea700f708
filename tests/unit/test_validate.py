"""The Great Expectations suites: real data passes; each broken contract fails, is
quarantined with GX's result, and leaves the last good validated data as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from lmops import pii
from lmops.artifacts import DataManifest, SourceSummary
from lmops.errors import ValidationFailed
from lmops.sources import content_sha256
from lmops.tasks import ingest, validate
from tests.conftest import params_with, tree_digest

pytestmark = pytest.mark.data

# The Chinese reviews: the PII and label tests below are written for them.
TINY = {
    "data__source": "builtin:zh-reviews",
    "data__corpus": "builtin:zh-news",
    "data__max_rows": 1500,
    "data__corpus_max_docs": 300,
    "validation__min_rows__train": 500,
    "validation__min_rows__val": 50,
    "validation__min_rows__test": 50,
    "validation__min_rows__corpus": 100,
}


@pytest.fixture(scope="session")
def ingested(repo_params_raw: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ingest")
    ingest.run(params_with(repo_params_raw, **TINY).data, root, root / "ingested", root / "m.json")
    return root / "ingested"


def _run(repo_params_raw: dict, ingested_dir: Path, root: Path, **overrides: object) -> dict:
    cfg = params_with(repo_params_raw, **{**TINY, **overrides}).validation
    return validate.run(
        cfg, ingested_dir, root / "validated", root / "docs", root / "quarantine", root / "v.json"
    )


def test_real_data_passes_and_publishes_data_docs(
    repo_params_raw: dict, ingested: Path, tmp_path: Path
) -> None:
    summary = _run(repo_params_raw, ingested, tmp_path)
    assert summary["success"]
    assert set(summary["batches"]) == {"train", "val", "test", "corpus", "splits_disjoint"}
    assert all(b["failed"] == 0 for b in summary["batches"].values())
    assert summary["batches"]["train"]["expectations"] >= 10
    assert (tmp_path / "docs" / "index.html").is_file()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))
    for name in ("train", "val", "test", "corpus"):
        # Published as ingested, but for personal data (validation.pii: redact by default).
        published = pd.read_parquet(tmp_path / "validated" / f"{name}.parquet")
        expected = pd.read_parquet(ingested / f"{name}.parquet")
        expected["text"] = [pii.redact(text)[0] for text in expected["text"]]
        assert published.equals(expected)
    assert json.loads((tmp_path / "v.json").read_text("utf-8"))["success"] is True
    assert not (tmp_path / "quarantine").exists()


def _leak_test_text_into_train(tables: dict[str, pd.DataFrame]) -> None:
    tables["train"].loc[0, "text"] = tables["test"].loc[0, "text"]


def _replacement_character(tables: dict[str, pd.DataFrame]) -> None:
    tables["val"].loc[3, "text"] = "乱码\ufffd文本"


def _unbalanced(tables: dict[str, pd.DataFrame]) -> None:
    train = tables["train"]
    tables["train"] = pd.concat(
        [train[train["label"] == "positive"], train[train["label"] == "negative"].head(40)]
    )


def _unknown_label(tables: dict[str, pd.DataFrame]) -> None:
    tables["test"].loc[1, "label"] = "neutral"


def _too_few_corpus_docs(tables: dict[str, pd.DataFrame]) -> None:
    tables["corpus"] = tables["corpus"].head(10)


def _blank_text(tables: dict[str, pd.DataFrame]) -> None:
    tables["corpus"].loc[2, "text"] = "   "


BROKEN: list[tuple[str, Callable[[dict[str, pd.DataFrame]], None], list[str]]] = [
    (
        "leakage",
        _leak_test_text_into_train,
        ["splits_disjoint: expect_column_values_to_be_unique", "[test]"],
    ),
    ("U+FFFD", _replacement_character, ["val: expect_column_values_to_not_match_regex", "乱码"]),
    (
        "class balance",
        _unbalanced,
        ["train: expect_table_row_count_to_be_between", "labelled 'negative'", "observed 40"],
    ),
    ("label set", _unknown_label, ["test: expect_column_distinct_values_to_equal_set"]),
    ("row count", _too_few_corpus_docs, ["corpus: expect_table_row_count_to_be_between"]),
    ("blank text", _blank_text, ["corpus: expect_column_values_to_not_match_regex"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corrupt", "expected"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_broken_contract_is_quarantined_and_keeps_last_good_data(
    repo_params_raw: dict,
    ingested: Path,
    tmp_path: Path,
    corrupt: Callable[[dict[str, pd.DataFrame]], None],
    expected: list[str],
) -> None:
    _run(repo_params_raw, ingested, tmp_path)
    good = {name: tree_digest(tmp_path / name) for name in ("validated", "docs")}
    bad_dir = tmp_path / "bad"
    shutil.copytree(ingested, bad_dir)
    tables = {t: pd.read_parquet(bad_dir / f"{t}.parquet") for t in validate.TABLES}
    corrupt(tables)
    for name, table in tables.items():
        table.to_parquet(bad_dir / f"{name}.parquet", index=False)

    with pytest.raises(ValidationFailed) as failure:
        _run(repo_params_raw, bad_dir, tmp_path)

    message = str(failure.value)
    for fragment in expected:
        assert fragment in message
    assert {name: tree_digest(tmp_path / name) for name in ("validated", "docs")} == good
    (quarantined,) = (tmp_path / "quarantine").iterdir()
    assert tree_digest(quarantined / "batch") == tree_digest(bad_dir)
    assert (quarantined / "data_docs" / "index.html").is_file()
    gx_result = json.loads((quarantined / "gx_result.json").read_text("utf-8"))
    assert any(not batch["success"] for batch in gx_result.values())


PHONE, ID = "13812345678", "11010519491231002X"


@pytest.mark.slow
def test_personal_data_is_refused_redacted_or_kept_as_the_policy_says(
    repo_params_raw: dict, ingested: Path, tmp_path: Path
) -> None:
    """Seeded personal data: `fail` quarantines the batch naming kinds and rows (never the
    data), `redact` publishes placeholders and the matching hashes, `warn` keeps it; the
    manifest counts it under both."""
    seeded = tmp_path / "seeded"
    shutil.copytree(ingested, seeded)
    tables = {t: pd.read_parquet(seeded / f"{t}.parquet") for t in validate.TABLES}
    before = {t: pii.count(table["text"]) for t, table in tables.items()}
    tables["train"].loc[0, "text"] += f" 快递电话{PHONE}"
    tables["corpus"].loc[2, "text"] += f" 身份证{ID}"
    for name, table in tables.items():
        table.to_parquet(seeded / f"{name}.parquet", index=False)

    _run(repo_params_raw, ingested, tmp_path)  # a last good version to keep
    good = tree_digest(tmp_path / "validated")
    with pytest.raises(ValidationFailed) as failure:
        _run(repo_params_raw, seeded, tmp_path, validation__pii="fail")
    message = str(failure.value)
    assert "personal data (validation.pii: fail" in message
    assert f"{before['train']['PHONE'] + 1} PHONE in rows 0" in message
    assert PHONE not in message and ID not in message
    assert tree_digest(tmp_path / "validated") == good
    assert len(list((tmp_path / "quarantine").iterdir())) == 1

    _run(repo_params_raw, seeded, tmp_path, validation__pii="redact")
    manifest = DataManifest.of(tmp_path / "validated")
    found = manifest.personal_data.found
    assert manifest.personal_data.redacted is True
    assert found["train"]["PHONE"] == before["train"]["PHONE"] + 1
    assert found["corpus"]["ID"] == before["corpus"]["ID"] + 1
    train = pd.read_parquet(tmp_path / "validated" / "train.parquet")
    assert train.loc[0, "text"].endswith("快递电话[PHONE]")
    for name in validate.TABLES:
        published = pd.read_parquet(tmp_path / "validated" / f"{name}.parquet")
        assert not pii.count(published["text"])  # nothing left to find
        assert manifest.content_sha256[name] == content_sha256(published)

    _run(repo_params_raw, seeded, tmp_path, validation__pii="warn")
    manifest = DataManifest.of(tmp_path / "validated")
    assert manifest.personal_data.redacted is False
    assert manifest.personal_data.found["train"]["PHONE"] == before["train"]["PHONE"] + 1
    train = pd.read_parquet(tmp_path / "validated" / "train.parquet")
    assert train.loc[0, "text"].endswith(f"快递电话{PHONE}")


def test_label_contract_follows_the_source(repo_params_raw: dict) -> None:
    cfg = params_with(repo_params_raw, **TINY).validation
    assert cfg.labels == "auto"
    previous = SourceSummary(
        spec="reviews.csv", files={}, rows_read=2, dropped={}, labels=["bad", "good"]
    )
    # A builtin source knows its labels; a new file source pins what it holds.
    assert validate.label_contract(cfg, "builtin:zh-reviews", ["x", "y"], None) == (
        ["negative", "positive"],
        None,
    )
    assert validate.label_contract(cfg, "other.csv", ["0", "1"], previous) == (["0", "1"], None)
    assert validate.label_contract(cfg, "reviews.csv", ["bad", "good"], previous)[1] is None
    pinned, refused = validate.label_contract(cfg, "reviews.csv", ["bad", "great"], previous)
    assert pinned == ["bad", "good"]
    assert "['bad', 'good']" in refused and "['bad', 'great']" in refused
    assert "validation.labels" in refused
    listed = params_with(repo_params_raw, **TINY, validation__labels=["a", "b"]).validation
    assert validate.label_contract(listed, "x.csv", ["c"], previous) == (["a", "b"], None)


def _as_file_source(ingested: Path, target: Path, names: dict[str, str]) -> Path:
    """The ingested tables as if they came from `reviews.csv` with other label names."""
    shutil.copytree(ingested, target)
    for table in ("train", "val", "test"):
        frame = pd.read_parquet(target / f"{table}.parquet")
        frame["label"] = frame["label"].map(names)
        frame.to_parquet(target / f"{table}.parquet", index=False)
    manifest = json.loads((target / "manifest.json").read_text("utf-8"))
    manifest["labelled"].update(spec="reviews.csv", labels=sorted(names.values()))
    (target / "manifest.json").write_text(json.dumps(manifest), "utf-8")
    return target


@pytest.mark.slow
def test_file_source_labels_pass_then_a_changed_set_is_refused(
    repo_params_raw: dict, ingested: Path, tmp_path: Path
) -> None:
    first = _as_file_source(ingested, tmp_path / "v1", {"negative": "bad", "positive": "good"})
    assert _run(repo_params_raw, first, tmp_path)["success"]
    good = tree_digest(tmp_path / "validated")
    second = _as_file_source(ingested, tmp_path / "v2", {"negative": "bad", "positive": "great"})
    with pytest.raises(ValidationFailed) as failure:
        _run(repo_params_raw, second, tmp_path)
    message = str(failure.value)
    assert "labels changed between versions of data.source=reviews.csv" in message
    assert "['bad', 'good']" in message and "['bad', 'great']" in message
    assert tree_digest(tmp_path / "validated") == good
    # Saying so in params accepts the new set.
    assert _run(repo_params_raw, second, tmp_path, validation__labels=["bad", "great"])["success"]
