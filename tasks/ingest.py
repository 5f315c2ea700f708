"""Ingest: read the sources, clean the texts, and write deterministic stratified splits.

Every problem a user's file can have is a `DataError` that names it; nothing is written
unless the whole stage succeeds.
"""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path
from typing import Any

import pandas as pd

from lmops.artifacts import DataManifest
from lmops.atomic import atomic_dir, write_json
from lmops.config import DataConfig
from lmops.errors import DataError
from lmops.sources import FEEDBACK_COLUMNS, content_sha256, read_corpus, read_labelled

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _rows(index: pd.Index, limit: int = 5) -> str:
    """1-based data row numbers, as a user counts them in a file."""
    shown = ", ".join(str(i + 1) for i in index[:limit])
    return shown + (f" … ({len(index)} in all)" if len(index) > limit else "")


def _clean_texts(texts: pd.Series, key: str, cfg: DataConfig) -> pd.Series:
    missing = texts.index[texts.isna()]
    if len(missing):
        raise DataError(f"{key}: {len(missing)} row(s) have no text (rows {_rows(missing)})")
    not_str = texts.index[~texts.map(lambda v: isinstance(v, str))]
    if len(not_str):
        example = texts[not_str[0]]
        raise DataError(
            f"{key}: text must be strings; row {not_str[0] + 1} holds "
            f"{type(example).__name__} {example!r}"
        )
    if cfg.normalization != "none":
        texts = texts.map(lambda t: unicodedata.normalize(cfg.normalization, t))
    texts = texts.str.strip()
    empty = texts.index[texts.str.len() == 0]
    if len(empty):
        raise DataError(
            f"{key}: {len(empty)} text(s) are empty after stripping whitespace "
            f"(rows {_rows(empty)})"
        )
    lengths = texts.str.len()
    too_long = lengths.index[lengths > cfg.max_text_chars]
    if len(too_long):
        first = too_long[0]
        raise DataError(
            f"{key}: row {first + 1} has a text of {lengths[first]:,} characters, over "
            f"data.max_text_chars={cfg.max_text_chars:,} ({len(too_long)} such row(s))"
        )
    return texts


def _clean_labels(labels: pd.Series, key: str) -> pd.Series:
    missing = labels.index[labels.isna()]
    if len(missing):
        raise DataError(f"{key}: {len(missing)} row(s) have no label (rows {_rows(missing)})")
    floats = labels.index[labels.map(lambda v: isinstance(v, float))]
    if len(floats):
        raise DataError(
            f"{key}: labels must be strings or integers; row {floats[0] + 1} holds the float "
            f"{float(labels[floats[0]])} (cast class ids to int; lmops has no regression task)"
        )
    others = labels.index[
        ~labels.map(lambda v: isinstance(v, str | int) and not isinstance(v, bool))
    ]
    if len(others):
        value = labels[others[0]]
        raise DataError(
            f"{key}: labels must be strings or integers; row {others[0] + 1} holds "
            f"{type(value).__name__} {value!r}"
        )
    labels = labels.map(lambda v: str(v).strip())
    blank = labels.index[labels.str.len() == 0]
    if len(blank):
        raise DataError(f"{key}: {len(blank)} label(s) are blank (rows {_rows(blank)})")
    return labels


def _as_text(value: object) -> str:
    """A served label or key name as the source holds it: empty for none, and an integer
    that a CSV reader made a float (1.0, beside empty cells) written as the integer."""
    if pd.isna(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _feedback_rows(raw: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """The labelled traffic among the cleaned rows (`frame`, in `raw`'s order): those with a
    served label, with the key that wrote the label ("" for none). Taken before duplicates
    are dropped: the contract judges every label a key gave, trained on or not."""
    if "served_label" not in raw.columns:
        return pd.DataFrame({column: pd.Series(dtype=str) for column in FEEDBACK_COLUMNS})
    keys = raw["feedback_key"] if "feedback_key" in raw.columns else pd.Series("", raw.index)
    table = frame.assign(
        served_label=raw["served_label"].map(_as_text).to_numpy(),
        feedback_key=keys.map(_as_text).to_numpy(),
    )
    return table[table["served_label"] != ""][list(FEEDBACK_COLUMNS)].reset_index(drop=True)


def _deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Drop exact duplicates, then every text that carries more than one label."""
    unique = frame.drop_duplicates(["text", "label"])
    duplicates = len(frame) - len(unique)
    labels_per_text = unique.groupby("text")["label"].transform("nunique")
    consistent = unique[labels_per_text == 1]
    conflicting = int((frame["text"].isin(unique["text"][labels_per_text > 1])).sum())
    return consistent.reset_index(drop=True), duplicates, conflicting


def _stratified_split(frame: pd.DataFrame, cfg: DataConfig) -> dict[str, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    split = cfg.split
    smallest = frame["label"].value_counts()
    needed = 3
    if smallest.min() < needed:
        raise DataError(
            f"data.source: class {smallest.idxmin()!r} has {smallest.min()} row(s); a "
            f"stratified train/val/test split needs at least {needed} per class"
        )
    try:
        rest, test = train_test_split(
            frame,
            test_size=split.test_fraction,
            stratify=frame["label"],
            random_state=split.seed,
        )
        train, val = train_test_split(
            rest,
            test_size=split.val_fraction / (1 - split.test_fraction),
            stratify=rest["label"],
            random_state=split.seed,
        )
    except ValueError as err:
        raise DataError(f"data.source: cannot make a stratified split: {err}") from None
    return {
        name: part.reset_index(drop=True)
        for name, part in zip(SPLITS, (train, val, test), strict=True)
    }


def labelled_dataset(
    cfg: DataConfig, root: Path
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """The splits, the labelled traffic among the rows (`_feedback_rows`), and a summary."""
    raw = read_labelled(cfg.source, root)
    frame = pd.DataFrame(
        {
            "text": _clean_texts(raw.frame["text"], "data.source", cfg),
            "label": _clean_labels(raw.frame["label"], "data.source"),
        }
    )
    feedback = _feedback_rows(raw.frame, frame)
    frame, duplicates, conflicting = _deduplicate(frame)
    classes = sorted(frame["label"].unique())
    if len(classes) < 2:
        raise DataError(
            f"data.source: only one class ({', '.join(map(repr, classes))}) after cleaning; "
            "a classifier needs at least two"
        )
    sampled_out = 0
    if cfg.max_rows is not None and len(frame) > cfg.max_rows:
        from sklearn.model_selection import train_test_split

        kept, _ = train_test_split(
            frame, train_size=cfg.max_rows, stratify=frame["label"], random_state=cfg.split.seed
        )
        sampled_out = len(frame) - len(kept)
        frame = kept.reset_index(drop=True)
    splits = _stratified_split(frame, cfg)
    summary = {
        "spec": cfg.source,
        "files": raw.files,
        "rows_read": len(raw.frame),
        "dropped": {
            "duplicate": duplicates,
            "conflicting_label": conflicting,
            "sampled_out": sampled_out,
        },
        "labels": classes,
    }
    return splits, feedback, summary


def corpus_dataset(cfg: DataConfig, root: Path, eval_texts: set[str]) -> tuple[pd.DataFrame, dict]:
    raw = read_corpus(cfg.corpus, root)
    texts = _clean_texts(raw.frame["text"], "data.corpus", cfg)
    unique = texts.drop_duplicates()
    # A held-out text inside the pretraining corpus would leak it into the model.
    outside_eval = unique[~unique.isin(eval_texts)]
    kept = outside_eval
    if cfg.corpus_max_docs is not None:
        kept = outside_eval.iloc[: cfg.corpus_max_docs]
    summary = {
        "spec": cfg.corpus,
        "files": raw.files,
        "rows_read": len(raw.frame),
        "dropped": {
            "duplicate": len(texts) - len(unique),
            "in_eval_split": len(unique) - len(outside_eval),
            "over_max_docs": len(outside_eval) - len(kept),
        },
    }
    return pd.DataFrame({"text": kept.reset_index(drop=True)}), summary


def run(cfg: DataConfig, root: Path, out_dir: Path, metrics_path: Path) -> dict[str, Any]:
    """Read, clean and split; write `{train,val,test,corpus,feedback}.parquet` and
    `manifest.json`. The feedback table repeats the labelled-traffic rows (they are trained
    on like any other) with their served label and key, for the validate stage's contract."""
    splits, feedback, labelled = labelled_dataset(cfg, root)
    eval_texts = set(splits["val"]["text"]) | set(splits["test"]["text"])
    corpus, corpus_summary = corpus_dataset(cfg, root, eval_texts)
    tables = {**splits, "corpus": corpus, "feedback": feedback}
    manifest = DataManifest(
        normalization=cfg.normalization,
        split=cfg.split.model_dump(),
        labelled=labelled,
        corpus=corpus_summary,
        rows={name: len(table) for name, table in tables.items()},
        class_counts={
            name: {
                str(k): int(v) for k, v in splits[name]["label"].value_counts().sort_index().items()
            }
            for name in SPLITS
        },
        content_sha256={name: content_sha256(table) for name, table in tables.items()},
    )
    with atomic_dir(out_dir) as scratch:
        for name, table in tables.items():
            table.to_parquet(scratch / f"{name}.parquet", index=False)
        manifest.write(scratch / DataManifest.FILE)
    write_json(
        metrics_path,
        {
            "rows": manifest.rows,
            "dropped": {"labelled": labelled["dropped"], "corpus": corpus_summary["dropped"]},
        },
    )
    log.info(
        "ingest: read %s (%d rows) and %s (%d docs); wrote %s: %s",
        cfg.source,
        labelled["rows_read"],
        cfg.corpus,
        corpus_summary["rows_read"],
        out_dir,
        manifest.rows,
    )
    return manifest.dump()
