"""Loaders, cleaning and splitting, on the real builtin data and on user files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lmops.errors import DataError
from lmops.sources import _strip_segmentation_tags, read_corpus
from lmops.tasks import ingest
from tests.conftest import params_with

pytestmark = pytest.mark.data


def _write_labelled(path: Path, frame: pd.DataFrame) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def _labelled_frame(n_per_class: int = 40) -> pd.DataFrame:
    rows = [(f"good product number {i}", 1) for i in range(n_per_class)]
    rows += [(f"bad product number {i}", 0) for i in range(n_per_class)]
    return pd.DataFrame(rows, columns=["text", "label"])


@pytest.fixture
def corpus_txt(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("first document\n\n  second document  \nfirst document\n", "utf-8")
    return path


def test_builtin_reviews_deduplicate_to_about_17k(repo_params_raw: dict, tmp_path: Path) -> None:
    cfg = params_with(
        repo_params_raw,
        data__source="builtin:zh-reviews",
        data__corpus="builtin:zh-news",
        data__corpus_max_docs=50,
    ).data
    manifest = ingest.run(cfg, tmp_path, tmp_path / "out", tmp_path / "m.json")
    unique = sum(manifest["rows"][s] for s in ("train", "val", "test"))
    assert 17_000 <= unique <= 17_800
    assert manifest["labelled"]["rows_read"] == 35_123
    assert manifest["labelled"]["dropped"]["duplicate"] > 15_000
    assert manifest["labelled"]["dropped"]["conflicting_label"] > 0
    assert manifest["labelled"]["labels"] == ["negative", "positive"]
    assert manifest["rows"]["corpus"] == 50
    written = json.loads((tmp_path / "out" / "manifest.json").read_text("utf-8"))
    assert written["content_sha256"] == manifest["content_sha256"]


def test_news_corpus_has_its_segmentation_tags_stripped(repo_params_raw: dict) -> None:
    assert _strip_segmentation_tags("迈/b 向/e 新/s //s") == "迈向新/"
    docs = read_corpus("builtin:zh-news", Path(".")).frame["text"]
    assert docs.iloc[0].startswith("迈向充满希望的新世纪")
    assert not docs.str.contains("/b ").any()
    assert len(docs) == 19_484


def test_csv_jsonl_and_parquet_give_the_same_dataset(
    repo_params_raw: dict, tmp_path: Path, corpus_txt: Path
) -> None:
    hashes = set()
    for suffix in (".csv", ".jsonl", ".parquet"):
        source = _write_labelled(tmp_path / f"data{suffix}", _labelled_frame())
        cfg = params_with(
            repo_params_raw, data__source=str(source), data__corpus=str(corpus_txt)
        ).data
        splits, _, summary = ingest.labelled_dataset(cfg, tmp_path)
        assert summary["labels"] == ["0", "1"]
        hashes.add(tuple(ingest.content_sha256(splits[s]) for s in ingest.SPLITS))
    assert len(hashes) == 1


def test_split_is_deterministic_stratified_and_disjoint(
    repo_params_raw: dict, tmp_path: Path, corpus_txt: Path
) -> None:
    source = _write_labelled(tmp_path / "d.csv", _labelled_frame(100))

    def splits_for(seed: int) -> dict[str, pd.DataFrame]:
        cfg = params_with(
            repo_params_raw,
            data__source=str(source),
            data__corpus=str(corpus_txt),
            data__split__seed=seed,
        ).data
        return ingest.labelled_dataset(cfg, tmp_path)[0]

    first, again, other = splits_for(0), splits_for(0), splits_for(1)
    assert all(first[s].equals(again[s]) for s in ingest.SPLITS)
    assert not first["test"].equals(other["test"])
    assert [len(first[s]) for s in ingest.SPLITS] == [160, 20, 20]
    for split in ingest.SPLITS:
        assert first[split]["label"].value_counts().to_dict() == {
            "0": len(first[split]) // 2,
            "1": len(first[split]) // 2,
        }
    texts = [set(first[s]["text"]) for s in ingest.SPLITS]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_normalisation_duplicates_and_conflicts_are_counted(
    repo_params_raw: dict, tmp_path: Path, corpus_txt: Path
) -> None:
    frame = _labelled_frame(20)
    extra = pd.DataFrame(
        [
            ("ｆｕｌｌ　width １２３", 1),
            ("full width 123", 1),  # same text once NFKC-folded
            ("  ambiguous  ", 1),
            ("ambiguous", 0),
        ],
        columns=["text", "label"],
    )
    source = _write_labelled(tmp_path / "d.jsonl", pd.concat([frame, extra]))
    cfg = params_with(repo_params_raw, data__source=str(source), data__corpus=str(corpus_txt)).data
    splits, _, summary = ingest.labelled_dataset(cfg, tmp_path)
    everything = pd.concat(splits.values())
    assert "full width 123" in set(everything["text"])
    assert "ambiguous" not in set(everything["text"])
    assert summary["dropped"] == {"duplicate": 1, "conflicting_label": 2, "sampled_out": 0}


def test_corpus_is_deduplicated_and_keeps_no_held_out_text(
    repo_params_raw: dict, tmp_path: Path, corpus_txt: Path
) -> None:
    cfg = params_with(repo_params_raw, data__corpus=str(corpus_txt)).data
    corpus, summary = ingest.corpus_dataset(cfg, tmp_path, eval_texts={"second document"})
    assert corpus["text"].tolist() == ["first document"]
    assert summary["dropped"] == {"duplicate": 1, "in_eval_split": 1, "over_max_docs": 0}


def test_max_rows_takes_a_stratified_sample(
    repo_params_raw: dict, tmp_path: Path, corpus_txt: Path
) -> None:
    source = _write_labelled(tmp_path / "d.csv", _labelled_frame(100))
    cfg = params_with(
        repo_params_raw, data__source=str(source), data__corpus=str(corpus_txt), data__max_rows=60
    ).data
    splits, _, summary = ingest.labelled_dataset(cfg, tmp_path)
    assert sum(len(s) for s in splits.values()) == 60
    assert summary["dropped"]["sampled_out"] == 140
    assert splits["train"]["label"].value_counts().nunique() == 1


def test_csv_with_embedded_newlines_and_quotes_parses_whole(
    repo_params_raw: dict, tmp_path: Path, corpus_txt: Path
) -> None:
    tricky = 'He said "great", then\nwrote a second line, with commas'
    frame = pd.concat([_labelled_frame(10), pd.DataFrame([(tricky, 1)], columns=["text", "label"])])
    source = _write_labelled(tmp_path / "d.csv", frame)
    assert '""great""' in source.read_text("utf-8")
    cfg = params_with(repo_params_raw, data__source=str(source), data__corpus=str(corpus_txt)).data
    splits, _, _ = ingest.labelled_dataset(cfg, tmp_path)
    assert tricky in set(pd.concat(splits.values())["text"])


def test_a_class_too_small_to_stratify_is_refused(
    repo_params_raw: dict, tmp_path: Path, corpus_txt: Path
) -> None:
    frame = pd.concat(
        [_labelled_frame(10), pd.DataFrame([("rare one", 2)], columns=["text", "label"])]
    )
    source = _write_labelled(tmp_path / "d.csv", frame)
    cfg = params_with(repo_params_raw, data__source=str(source), data__corpus=str(corpus_txt)).data
    with pytest.raises(DataError, match=r"class '2' has 1 row\(s\)"):
        ingest.labelled_dataset(cfg, tmp_path)


def test_a_failed_ingest_writes_nothing(repo_params_raw: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"previous")
    cfg = params_with(repo_params_raw, data__source="missing.csv").data
    with pytest.raises(DataError, match="no such file"):
        ingest.run(cfg, tmp_path, out, tmp_path / "m.json")
    assert (out / "train.parquet").read_bytes() == b"previous"
    assert not (tmp_path / "m.json").exists()


def test_labelled_traffic_rows_become_the_feedback_table(
    repo_params_raw: dict, tmp_path: Path, corpus_txt: Path
) -> None:
    """An export's rows with a served label (`lmops feedback --export --with-source`): CSV
    reads integer labels beside empty cells as floats, and a missing key as empty."""
    frame = _labelled_frame(20).assign(served_label=None, feedback_key=None, feedback_at=None)
    traffic = pd.DataFrame(
        {
            "text": ["  served once ", "served twice", "served thrice"],
            "label": [1, 0, 0],
            "served_label": [1, 1, 0],
            "feedback_key": ["alice", None, "alice"],
            "feedback_at": ["2026-01-01T00:00:00+00:00"] * 3,
        }
    )
    source = _write_labelled(tmp_path / "d.csv", pd.concat([frame, traffic]))
    cfg = params_with(repo_params_raw, data__source=str(source), data__corpus=str(corpus_txt)).data
    splits, feedback, _ = ingest.labelled_dataset(cfg, tmp_path)
    assert feedback.to_dict("records") == [
        {"text": "served once", "label": "1", "served_label": "1", "feedback_key": "alice"},
        {"text": "served twice", "label": "0", "served_label": "1", "feedback_key": ""},
        {"text": "served thrice", "label": "0", "served_label": "0", "feedback_key": "alice"},
    ]
    assert sum(len(split) for split in splits.values()) == 43  # trained on like any row
    assert list(splits["train"].columns) == ["text", "label"]
    plain = _write_labelled(tmp_path / "plain.csv", _labelled_frame(20))
    cfg = params_with(repo_params_raw, data__source=str(plain), data__corpus=str(corpus_txt)).data
    assert ingest.labelled_dataset(cfg, tmp_path)[1].empty
