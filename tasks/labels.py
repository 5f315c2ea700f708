"""Labels: the rows whose given label looks wrong, found before anything trains on them.

Confident learning (Northcutt et al. 2021, the `cleanlab` library) compares each row's given
label with out-of-sample predicted probabilities and flags the rows where a class's
confident predictions disagree more than that class's estimated noise rate allows. The
probabilities come from the TF-IDF + LR baseline (lmops/baseline.py): cheap, and a model
that has not seen the row. On train they are out of fold (stratified K-fold); on val and
test they come from the baseline fitted on all of train, which has not seen them either.

`data.label_issues: drop_train` then removes the flagged rows from the rows fine-tuning
learns from (data/labels/train.parquet); val and test are never changed, so the headline
figures stay on every row. A split that cannot be checked (too few rows of a class for
cross-validation, a single label, a label train lacks) is reported with the reason, and
nothing of it is dropped; under drop_train an unchecked train split fails the stage.
"""

from __future__ import annotations

import logging
import time
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from lmops.artifacts import LabelIssue, LabelIssuesReport, SplitLabelCheck
from lmops.atomic import atomic_dir
from lmops.baseline import baseline_proba
from lmops.config import DataConfig, EvaluateConfig
from lmops.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FOLDS = 5
TOP_PER_SPLIT = 20  # issues of each split kept in reports/labels.json and on the page
TRAIN_FILE = "train.parquet"  # the rows fine-tuning, distillation and the baseline learn from
ISSUES_FILE = "issues.parquet"  # every flagged row of every split
COLUMNS = ["split", "row", "text", "label", "suggested", "confidence", "quality"]
METHOD = (
    "confident learning (cleanlab find_label_issues, prune_by_noise_rate) over out-of-sample "
    f"TF-IDF + LR probabilities: {FOLDS}-fold on train, fitted on train for val and test"
)


class Unchecked(Exception):
    """A split confident learning cannot judge; the message says why."""


def _out_of_fold(
    cfg: EvaluateConfig, train: pd.DataFrame, labels: list[str]
) -> tuple[np.ndarray, int]:
    from sklearn.model_selection import StratifiedKFold

    counts = train["label"].value_counts()
    if counts.min() < 2:
        raise Unchecked(
            f"class {counts.idxmin()!r} has {counts.min()} row in train; cross-validation "
            "needs at least 2 of each class"
        )
    folds = int(min(FOLDS, counts.min()))
    probs = np.zeros((len(train), len(labels)))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    for fit_rows, held_rows in splitter.split(train["text"], train["label"]):
        held = train.iloc[held_rows]["text"].tolist()
        probs[held_rows] = baseline_proba(cfg, train.iloc[fit_rows], held, labels)
    return probs, folds


def find_issues(
    cfg: EvaluateConfig, split: str, frame: pd.DataFrame, train: pd.DataFrame, labels: list[str]
) -> tuple[SplitLabelCheck, pd.DataFrame]:
    """One split's check and its flagged rows (most confident first)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    by_class = {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
    check = {"split": split, "rows": len(frame), "rows_by_class": by_class}
    notes = [
        f"class {name!r} has only {n} rows: its issues rest on few examples"
        for name, n in by_class.items()
        if n < 2 * FOLDS
    ]
    try:
        if len(by_class) < 2:
            (only,) = by_class or {"": 0}
            raise Unchecked(
                f"every row of {split} has the label {only!r}: confident learning needs two "
                "or more classes"
            )
        unknown = sorted(set(by_class) - set(train["label"].astype(str)))
        if unknown:
            raise Unchecked(f"label(s) {unknown} of {split} never occur in train")
        if split == "train":
            probs, folds = _out_of_fold(cfg, frame, labels)
        else:
            probs, folds = baseline_proba(cfg, train, frame["text"].tolist(), labels), None
    except Unchecked as why:
        unchecked = SplitLabelCheck(**check, checked=False, why_unchecked=str(why), notes=notes)
        return unchecked, pd.DataFrame(columns=COLUMNS)
    given = frame["label"].astype(str).map(labels.index).to_numpy()
    flagged = find_label_issues(given, probs, filter_by="prune_by_noise_rate")
    quality = get_label_quality_scores(given, probs, method="self_confidence")
    # The suggestion is the likeliest label other than the given one.
    others = probs.copy()
    others[np.arange(len(given)), given] = -1.0
    suggested = others.argmax(1)
    rows = np.flatnonzero(flagged)
    issues = pd.DataFrame(
        {
            "split": split,
            "row": rows,
            "text": frame["text"].to_numpy()[rows],
            "label": [labels[i] for i in given[rows]],
            "suggested": [labels[i] for i in suggested[rows]],
            "confidence": probs[rows, suggested[rows]].round(5),
            "quality": quality[rows].round(5),
        }
    ).sort_values(["quality", "row"], kind="stable")
    flagged_by_class = {str(k): int(v) for k, v in issues["label"].value_counts().items()}
    return (
        SplitLabelCheck(
            **check,
            checked=True,
            folds=folds,
            flagged=len(issues),
            flagged_by_class=flagged_by_class,
            notes=notes,
        ),
        issues.reset_index(drop=True),
    )


def _page(report: LabelIssuesReport) -> str:
    """A static page beside the Data Docs: counts per split and class, the top issues."""
    counts = "".join(
        f"<tr><td>{escape(s.split)}</td><td>{escape(label)}</td><td class=n>{n:,}</td>"
        f"<td class=n>{s.flagged_by_class.get(label, 0) if s.checked else '—'}</td>"
        f"<td>{escape(s.why_unchecked or '; '.join(s.notes))}</td></tr>"
        for s in report.splits
        for label, n in s.rows_by_class.items()
    )
    top = "".join(
        f"<tr><td>{escape(i.split)}</td><td class=n>{i.row}</td><td>{escape(i.text)}</td>"
        f"<td>{escape(i.label)}</td><td>{escape(i.suggested)}</td>"
        f"<td class=n>{i.confidence:.3f}</td></tr>"
        for i in report.top
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmops — label issues</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border-bottom:1px solid #ddd;
padding:.3em .6em;text-align:left;vertical-align:top}}.n{{text-align:right}}</style></head>
<body><h1>Label issues</h1>
<p>{escape(report.method)}. Policy <code>data.label_issues: {report.policy}</code>:
{report.dropped_train_rows:,} training rows dropped; fine-tuning learns from
{report.train_rows:,} rows. Val and test keep every row. Every flagged row:
<code>lmops labels --export FILE.csv</code>.</p>
<h2>Flagged rows by split and given label</h2>
<table><tr><th>split</th><th>label</th><th class=n>rows</th><th class=n>flagged</th>
<th>note</th></tr>{counts}</table>
<h2>The most confident issues</h2>
<table><tr><th>split</th><th class=n>row</th><th>text</th><th>given</th><th>suggested</th>
<th class=n>confidence</th></tr>{top}</table></body></html>
"""


def run(
    data_cfg: DataConfig,
    evaluate_cfg: EvaluateConfig,
    validated_dir: Path,
    out_dir: Path,
    report_path: Path,
    page_dir: Path,
) -> LabelIssuesReport:
    started = time.perf_counter()
    frames = {split: pd.read_parquet(validated_dir / f"{split}.parquet") for split in SPLITS}
    train = frames["train"]
    labels = sorted(set(train["label"].astype(str)))
    checks, found = [], []
    for split, frame in frames.items():
        check, issues = find_issues(evaluate_cfg, split, frame, train, labels)
        checks.append(check)
        found.append(issues)
        log.info(
            "labels: %s: %s",
            split,
            f"{check.flagged:,} of {check.rows:,} rows flagged"
            if check.checked
            else f"not checked ({check.why_unchecked})",
        )
    train_check = checks[0]
    dropped = found[0]["row"].to_numpy() if data_cfg.label_issues == "drop_train" else []
    if data_cfg.label_issues == "drop_train" and not train_check.checked:
        raise DataError(
            f"data.label_issues is drop_train but train cannot be checked: "
            f"{train_check.why_unchecked}; set data.label_issues: report to learn from every row"
        )
    kept = train.drop(index=train.index[dropped])
    emptied = sorted(set(train["label"].astype(str)) - set(kept["label"].astype(str)))
    if emptied:
        raise DataError(
            f"dropping the flagged training rows would leave no row of {emptied}; "
            "set data.label_issues: report and look at these labels (lmops labels)"
        )
    flagged = [frame for frame in found if len(frame)]
    issues = pd.concat(flagged, ignore_index=True) if flagged else pd.DataFrame(columns=COLUMNS)
    report = LabelIssuesReport(
        policy=data_cfg.label_issues,
        method=METHOD,
        labels=labels,
        splits=checks,
        top=[LabelIssue(**row) for f in found for row in f.head(TOP_PER_SPLIT).to_dict("records")],
        train_rows=len(kept),
        dropped_train_rows=len(dropped),
        seconds=round(time.perf_counter() - started, 2),
    )
    with atomic_dir(out_dir) as scratch:
        kept.reset_index(drop=True).to_parquet(scratch / TRAIN_FILE, index=False)
        issues.to_parquet(scratch / ISSUES_FILE, index=False)
    with atomic_dir(page_dir) as scratch:
        (scratch / "index.html").write_text(_page(report), encoding="utf-8")
    report.write(report_path)
    log.info("labels: %s", report.line().removeprefix("- label issues: "))
    return report


def review_table(validated_dir: Path, labels_dir: Path, every_row: bool) -> pd.DataFrame:
    """The flagged rows for a person to correct (their `label` column still the given
    label), most confident first; with `every_row`, every validated row after them, so that
    pointing data.source at the corrected file retrains on all the data."""
    issues = pd.read_parquet(labels_dir / ISSUES_FILE).sort_values("quality", kind="stable")
    flagged = pd.DataFrame(
        {
            "text": issues["text"],
            "label": issues["label"],
            "given_label": issues["label"],
            "suggested_label": issues["suggested"],
            "confidence": issues["confidence"],
            "split": issues["split"],
            "row": issues["row"],
        }
    )
    if not every_row:
        return flagged.reset_index(drop=True)
    flagged_keys = set(zip(issues["split"], issues["row"], strict=True))
    others = []
    for split in SPLITS:
        frame = pd.read_parquet(validated_dir / f"{split}.parquet")
        rows = [row for row in range(len(frame)) if (split, row) not in flagged_keys]
        others.append(
            pd.DataFrame(
                {
                    "text": frame["text"].to_numpy()[rows],
                    "label": frame["label"].to_numpy()[rows],
                    "split": split,
                    "row": rows,
                }
            )
        )
    return pd.concat([flagged, *others], ignore_index=True)
