"""The evaluation's pictures: PNG images beside the plot data, for people and pages.

`dvc plots show` draws the JSON plots with Vega, which it loads from a CDN; these images
need nothing but a file viewer or an <img> tag, so they show offline, in the model card
and on any page that links them. matplotlib draws them headless (the Agg backend).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from lmops.artifacts import ClassificationMetrics

DPI = 110
MODEL_COLOUR, BASELINE_COLOUR = "#1f77b4", "#ff7f0e"


def _figure(width: float = 5.0, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=DPI)


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def confusion(targets: np.ndarray, predicted: np.ndarray, labels: list[str], path: Path) -> Path:
    """Counts, actual labels down and predicted across."""
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(counts, (targets, predicted), 1)
    figure, axes = _figure(1.6 + 1.1 * len(labels), 1.2 + 1.0 * len(labels))
    axes.imshow(counts, cmap="Blues")
    for (row, column), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        axes.text(
            column, row, f"{count:,}", ha="center", va="center", color="white" if dark else "black"
        )
    axes.set_xticks(range(len(labels)), labels)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(f"Confusion matrix (test, {len(targets):,} texts)")
    return _save(figure, path)


def roc(rows: list[dict[str, Any]], auc: float, path: Path) -> Path:
    """The ROC curve per class from the rows of roc.json."""
    figure, axes = _figure()
    for name in dict.fromkeys(row["class"] for row in rows):
        curve = [row for row in rows if row["class"] == name]
        axes.plot([r["fpr"] for r in curve], [r["tpr"] for r in curve], label=name)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(f"ROC (test), AUC {auc:.4f}")
    axes.legend(loc="lower right")
    return _save(figure, path)


def reliability(curves: dict[str, list[dict[str, Any]]], ece: dict[str, float], path: Path) -> Path:
    """Accuracy against confidence per bin, one line per curve; the diagonal is perfect."""
    figure, axes = _figure()
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect")
    for name, rows in curves.items():
        axes.plot(
            [r["confidence"] for r in rows],
            [r["accuracy"] for r in rows],
            marker="o",
            label=f"{name} (ECE {ece[name]:.3f})",
        )
    axes.set_xlabel("confidence (mean score of the predicted label)")
    axes.set_ylabel("accuracy")
    axes.set_title("Reliability (test)")
    axes.legend(loc="upper left")
    return _save(figure, path)


def slices(model: ClassificationMetrics, baseline: ClassificationMetrics, path: Path) -> Path:
    """Accuracy by text length, the served model and the baseline side by side."""
    names = list(model.slices_by_chars)
    figure, axes = _figure(1.5 + 1.0 * len(names), 4.0)
    positions = np.arange(len(names))
    for offset, (who, metrics, colour) in enumerate(
        (("model", model, MODEL_COLOUR), ("TF-IDF + LR", baseline, BASELINE_COLOUR))
    ):
        values = [metrics.slices_by_chars[n].accuracy or 0.0 for n in names]
        axes.bar(positions + (offset - 0.5) * 0.4, values, width=0.4, label=who, color=colour)
    axes.set_xticks(positions, [f"{n}\n({model.slices_by_chars[n].n:,})" for n in names])
    axes.set_ylim(0, 1.18)  # room for the legend above the bars
    axes.set_yticks(np.linspace(0, 1, 6))
    axes.set_xlabel("characters (texts)")
    axes.set_ylabel("accuracy")
    axes.set_title("Accuracy by text length (test)")
    axes.legend(loc="upper center", ncols=2)
    return _save(figure, path)


def _series(tsv: Path) -> tuple[list[float], list[float]]:
    with tsv.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    name = tsv.stem
    return [float(r["step"]) for r in rows], [float(r[name]) for r in rows]


def curves(live_dir: Path, title: str, path: Path) -> Path | None:
    """Training loss (and validation, where logged) from a DVCLive folder; None when the
    stage logged nothing or was skipped (whatever curves an earlier run left there)."""
    metrics = live_dir / "plots" / "metrics"
    train = metrics / "train" / "loss.tsv"
    if not train.is_file() or (live_dir / "skipped.json").is_file():
        return None
    figure, axes = _figure(6.0, 3.6)
    steps, losses = _series(train)
    axes.plot(steps, losses, label="train loss", linewidth=0.8)
    validation = metrics / "val" / "loss.tsv"
    if validation.is_file():
        val_steps, val_losses = _series(validation)
        axes.plot(val_steps, val_losses, marker="o", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend(loc="upper right")
    return _save(figure, path)
