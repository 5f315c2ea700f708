"""Evaluate: the fine-tuned classifier on the test split, beside a TF-IDF + logistic
regression baseline trained on the same train split in the same run.

Writes `reports/metrics.json` (DVC metrics, with the gates' verdict), plot data for
`dvc plots` (confusion matrix, ROC) and a markdown model card.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmops.artifacts import (
    AblationMetrics,
    BaselineGate,
    BaseManifest,
    Calibration,
    ClassificationMetrics,
    DataManifest,
    DistillReport,
    Gates,
    LabelIssuesOnTest,
    LabelIssuesReport,
    Metrics,
    PairedComparison,
    SliceMetrics,
    StageCost,
    StageRun,
    ThresholdGate,
    TrainingCost,
)
from lmops.atomic import write_json
from lmops.baseline import baseline_proba
from lmops.batching import predict_proba
from lmops.calibration import apply_temperature, expected_calibration_error, reliability_rows
from lmops.config import EvaluateConfig, FinetuneConfig, ModelConfig
from lmops.modeling import load_tokenizer

log = logging.getLogger(__name__)

# The pictures every evaluation draws (tasks/plots.py), by file in reports/plots/.
PICTURES = [
    ("confusion.png", "Confusion matrix"),
    ("roc.png", "ROC"),
    ("reliability.png", "Reliability before and after calibration"),
    ("slices.png", "Accuracy by text length, model and baseline"),
    ("curves_finetune.png", "Fine-tuning loss"),
]


@dataclass(frozen=True)
class BehaviouralSuite:
    """Made-With-ML's families for one builtin sentiment label set: a harmless suffix must
    not flip the label, a negative sentence appended must not raise the positive score, and
    the obvious one-liners must be right."""

    positive: str
    invariant_suffixes: tuple[str, ...]
    negative_suffix: str
    obvious_cases: tuple[tuple[str, str], ...]


BEHAVIOURAL_SUITES = {
    ("negative", "positive"): BehaviouralSuite(
        positive="positive",
        invariant_suffixes=("。", "!"),
        negative_suffix="非常失望。",
        obvious_cases=(
            ("非常好，推荐购买！", "positive"),
            ("质量很好，很满意。", "positive"),
            ("这本书写得太精彩了", "positive"),
            ("太差了，非常失望。", "negative"),
            ("质量很差，不推荐。", "negative"),
            ("浪费钱，后悔买了", "negative"),
        ),
    ),
    ("fresh", "rotten"): BehaviouralSuite(
        positive="fresh",
        invariant_suffixes=(".", "!"),
        negative_suffix=" A total waste of time.",
        obvious_cases=(
            ("A wonderful, moving film.", "fresh"),
            ("One of the best movies of the year.", "fresh"),
            ("Brilliant acting and a smart, funny script.", "fresh"),
            ("A boring, tedious mess.", "rotten"),
            ("The worst film I have seen in years.", "rotten"),
            ("Dull, lifeless and far too long.", "rotten"),
        ),
    ),
}


def _slice_names(buckets: list[int]) -> list[str]:
    lows = [1, *(b + 1 for b in buckets)]
    return [f"{low}-{high}" for low, high in zip(lows, buckets, strict=False)] + [f">{buckets[-1]}"]


def length_slice(lengths: np.ndarray, buckets: list[int]) -> np.ndarray:
    return np.searchsorted(np.array(sorted(buckets)), lengths, side="left")


def classification_metrics(
    targets: np.ndarray, probs: np.ndarray, cfg: EvaluateConfig, lengths: np.ndarray
) -> ClassificationMetrics:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    predicted = probs.argmax(1)
    if probs.shape[1] == 2:
        auc = roc_auc_score(targets, probs[:, 1])
    else:
        auc = roc_auc_score(targets, probs, multi_class="ovr", average="macro")
    slices = {}
    slice_of = length_slice(lengths, cfg.length_buckets)
    for index, name in enumerate(_slice_names(sorted(cfg.length_buckets))):
        inside = slice_of == index
        slices[name] = SliceMetrics(
            n=int(inside.sum()),
            accuracy=round(float((predicted[inside] == targets[inside]).mean()), 5)
            if inside.any()
            else None,
        )
    return ClassificationMetrics(
        accuracy=round(float(accuracy_score(targets, predicted)), 5),
        macro_f1=round(float(f1_score(targets, predicted, average="macro")), 5),
        roc_auc=round(float(auc), 5),
        ece=round(expected_calibration_error(targets, probs, cfg.calibration_bins), 5),
        slices_by_chars=slices,
    )


def behavioural_checks(predict: Any, texts: list[str], labels: list[str]) -> dict[str, Any] | None:
    """Invariance, directional and minimum-functionality pass rates; for the builtin
    sentiment label sets only (BEHAVIOURAL_SUITES)."""
    suite = BEHAVIOURAL_SUITES.get(tuple(labels))
    if suite is None:
        return None
    positive = labels.index(suite.positive)
    base = predict(texts)
    invariant = np.mean(
        [
            (predict([t + s for t in texts]).argmax(1) == base.argmax(1)).mean()
            for s in suite.invariant_suffixes
        ]
    )
    negated = predict([t + suite.negative_suffix for t in texts])
    directional = (negated[:, positive] <= base[:, positive] + 1e-6).mean()
    obvious = predict([t for t, _ in suite.obvious_cases]).argmax(1)
    minimum = np.mean(
        [labels[p] == want for p, (_, want) in zip(obvious, suite.obvious_cases, strict=True)]
    )
    return {
        "invariance_punctuation": round(float(invariant), 4),
        "directional_negative_suffix": round(float(directional), 4),
        "minimum_functionality": round(float(minimum), 4),
    }


def gates_verdict(
    cfg: EvaluateConfig,
    model: ClassificationMetrics,
    baseline: ClassificationMetrics,
    behavioural: dict[str, float] | None,
    targets: np.ndarray,
    model_predicted: np.ndarray,
    baseline_predicted: np.ndarray,
) -> Gates:
    """Minimum accuracy; the baseline gate: the point estimate ahead by at least
    `min_margin_over_baseline` and the paired comparison on the same texts passing its rule;
    and each behavioural check's minimum pass rate."""
    from lmops.stats import compare

    gates = cfg.gates
    margin = model.accuracy - baseline.accuracy
    paired = PairedComparison(
        **compare(
            targets,
            model_predicted,
            baseline_predicted,
            "accuracy",
            gates.baseline_test.rule,
            gates.baseline_test.margin,
            gates.confidence,
            gates.bootstrap_samples,
        )
    )
    accuracy_ok = model.accuracy >= gates.min_accuracy
    baseline_ok = margin >= gates.min_margin_over_baseline and paired.passed
    checks = None
    if behavioural is not None:
        minimums = gates.behavioural.model_dump()
        checks = {
            name: ThresholdGate(threshold=minimums[name], value=rate, passed=rate >= minimums[name])
            for name, rate in behavioural.items()
        }
    return Gates(
        min_accuracy=ThresholdGate(
            threshold=gates.min_accuracy, value=model.accuracy, passed=accuracy_ok
        ),
        beats_baseline=BaselineGate(
            threshold=gates.min_margin_over_baseline,
            margin=round(margin, 5),
            paired=paired,
            passed=baseline_ok,
            relaxed=gates.relax_baseline,
        ),
        behavioural=checks,
        passed=accuracy_ok
        and (baseline_ok or gates.relax_baseline)
        and all(check.passed for check in (checks or {}).values()),
    )


def _roc_rows(targets: np.ndarray, probs: np.ndarray, labels: list[str]) -> list[dict]:
    from sklearn.metrics import roc_curve

    classes = [1] if len(labels) == 2 else range(len(labels))
    rows = []
    for index in classes:
        fpr, tpr, _ = roc_curve(targets == index, probs[:, index])
        step = max(1, len(fpr) // 200)  # a readable curve, not every threshold
        keep = sorted(set(range(0, len(fpr), step)) | {len(fpr) - 1})
        rows += [
            {"class": labels[index], "fpr": round(float(fpr[i]), 5), "tpr": round(float(tpr[i]), 5)}
            for i in keep
        ]
    return rows


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _training_cost(cost_paths: dict[str, Path]) -> TrainingCost:
    """The recorded stages and their total. A stage run outside `lmops stage` (its outputs
    copied in, as some tests do) has no record: named as unrecorded, not guessed."""
    stages = {stage: StageCost.read(path) for stage, path in cost_paths.items() if path.is_file()}
    return TrainingCost(
        stages=stages,
        total=StageCost.total(list(stages.values())),
        unrecorded=[stage for stage, path in cost_paths.items() if not path.is_file()],
    )


def _cost_section(cost: TrainingCost | None) -> list[str]:
    if cost is None:
        return []
    return [
        "## Cost",
        "What each stage up to fine-tuning cost on this run (`reports/cost/`; energy is an "
        f"estimate: {cost.total.energy_method}).",
        "",
        *cost.table(),
        "",
        *(
            [f"Not recorded (run outside `lmops stage`): {', '.join(cost.unrecorded)}.", ""]
            if cost.unrecorded
            else []
        ),
    ]


def _model_card(
    metrics: Metrics,
    manifest: DataManifest,
    model_cfg: ModelConfig,
    labels: list[str],
    pretrained: bool,
    training: dict[str, StageRun],
    base: BaseManifest | None = None,
    distilled: DistillReport | None = None,
) -> str:
    beats = metrics.gates.beats_baseline
    calibration = metrics.calibration
    assert calibration is not None
    relaxed = beats.relaxed and not beats.passed
    if metrics.transformer_only is not None:
        w = metrics.transformer_weight or 0.0
        served = (
            f"The served model is one ONNX graph combining two models on the same tokens: the "
            f"transformer (weight {w:.1f}) and a TF-IDF + logistic regression over hashed "
            f"token n-grams (weight {1 - w:.1f}), as a weighted sum of log-probabilities. The "
            "weight was chosen on the validation split. The columns below show the served "
            "model, the transformer alone and the separate TF-IDF + LR baseline."
        )
    else:
        served = "The served model is the transformer alone."
    imported = base is not None and base.kind != "none"
    if imported:
        shape = f"{base.layers} layers, hidden {base.hidden_size}"
        pretraining = training.get("pretraining")
        continued = pretraining is not None and bool(pretraining.steps)
        how = (
            f"from the pretrained base {base.origin}, "
            + ("its masked-LM pretraining continued here, " if continued else "")
            + "then fine-tuned."
        )
    else:
        shape = (
            f"{model_cfg.layers} layers, hidden {model_cfg.hidden_size}, {model_cfg.heads} heads"
        )
        how = (
            "pretrained from scratch with masked-LM, then fine-tuned."
            if pretrained
            else "fine-tuned from random weights (no pretraining)."
        )
    lines = [
        "# Model card",
        "",
        f"A {(base.architecture if imported else model_cfg.architecture).upper()} classifier "
        f"({shape}, {model_cfg.max_length} tokens"
        + (
            f", hashed {model_cfg.input_ngram_order}-gram input embeddings"
            if model_cfg.input_ngram_order
            else ""
        )
        + "), "
        + how,
        "",
        served,
        "",
        "## Intended use",
        f"Classifying short texts like the labelled data below into {', '.join(labels)}, "
        "served by `lmops serve` (ONNX Runtime). Not for decisions about people, and not for "
        "text unlike the training data without monitoring (`lmops monitor`).",
        "",
        "## Data",
        f"- labelled: `{manifest.labelled.spec}`; labels {', '.join(labels)}; "
        f"train {manifest.rows['train']:,} / val {manifest.rows['val']:,} / "
        f"test {manifest.rows['test']:,}",
        f"- corpus: `{manifest.corpus.spec}`, {manifest.rows['corpus']:,} documents",
        "- content sha256 (`data/validated/manifest.json`): "
        + ", ".join(f"{name} `{digest[:16]}`" for name, digest in manifest.content_sha256.items()),
        *([f"- {manifest.personal_data.line()}"] if manifest.personal_data else []),
        "",
        "## Training",
        *([base.line()] if base is not None else []),
        *(run.line(stage) for stage, run in training.items()),
        *([distilled.line()] if distilled is not None else []),
        *([metrics.label_issues.line()] if metrics.label_issues is not None else []),
        "",
        *_cost_section(metrics.cost),
        "## Test metrics",
        metrics.verdict(),
        "",
        *metrics.table(),
        "",
        f"Gates: {metrics.gates.text()}"
        + (
            " — **the baseline gate was relaxed by this profile: the model does not beat the "
            "baseline**"
            if relaxed
            else ""
        )
        + ".",
        "",
        f"Calibration: the served scores are softmax(logits / {calibration.temperature:.3f}), "
        "the temperature fitted on the validation split; expected calibration error on test "
        f"{calibration.test_ece_before:.4f} before, {calibration.test_ece_after:.4f} after "
        "(the `ece` row above is after). Labels do not change.",
        "",
        "## Limits",
        "- Trained only on the data above; accuracy on other domains (e.g. news, other "
        "product types) is unknown and should be monitored.",
        "- Texts longer than the model's sequence length are truncated.",
        "- Behavioural checks (negation, invariance) are in `reports/metrics.json`.",
        "",
        "## Accuracy by text length (test)",
        "| characters | texts | model | TF-IDF + LR baseline |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {part.n:,} | {_accuracy(part.accuracy)} | "
            f"{_accuracy(metrics.baseline.slices_by_chars[name].accuracy)} |"
            for name, part in metrics.model.slices_by_chars.items()
            if name in metrics.baseline.slices_by_chars
        ),
        "",
        "## Plots",
        "",
        *(f"![{title}](plots/{name})" for name, title in PICTURES),
    ]
    return "\n".join(lines) + "\n"


def _pictures(
    plots_dir: Path,
    targets: np.ndarray,
    predicted: np.ndarray,
    labels: list[str],
    roc_rows: list[dict[str, Any]],
    reliability: dict[str, list[dict[str, Any]]],
    metrics: Metrics,
    live_dirs: dict[str, Path],
) -> None:
    """PNG images beside the plot data (tasks/plots.py), named in PICTURES."""
    from lmops.tasks import plots

    calibration = metrics.calibration
    assert calibration is not None
    plots.confusion(targets, predicted, labels, plots_dir / "confusion.png")
    plots.roc(roc_rows, metrics.model.roc_auc, plots_dir / "roc.png")
    ece = dict(
        zip(reliability, (calibration.test_ece_before, calibration.test_ece_after), strict=True)
    )
    plots.reliability(reliability, ece, plots_dir / "reliability.png")
    plots.slices(metrics.model, metrics.baseline, plots_dir / "slices.png")
    for stage, live in live_dirs.items():
        plots.curves(live, f"{stage} (DVCLive)", plots_dir / f"curves_{stage}.png")


def _test_label_issues(
    report_path: Path | None,
    labels_dir: Path,
    targets: np.ndarray,
    predicted: np.ndarray,
    baseline_predicted: np.ndarray,
) -> LabelIssuesOnTest | None:
    """Accuracy on every test row and on the rows the labels stage did not flag: how much
    of the remaining error may be the labels' (None when test was not checked)."""
    if report_path is None or not report_path.is_file():
        return None
    report = LabelIssuesReport.read(report_path)
    check = report.split("test")
    if check is None or not check.checked:
        return None
    issues = pd.read_parquet(labels_dir / "issues.parquet")
    flagged = issues.loc[issues["split"] == "test", "row"].to_numpy(dtype=int)
    clean = np.ones(len(targets), dtype=bool)
    clean[flagged] = False
    right, baseline_right = predicted == targets, baseline_predicted == targets
    return LabelIssuesOnTest(
        policy=report.policy,
        test_flagged=int((~clean).sum()),
        accuracy_all=round(float(right.mean()), 5),
        accuracy_unflagged=round(float(right[clean].mean()), 5),
        baseline_accuracy_all=round(float(baseline_right.mean()), 5),
        baseline_accuracy_unflagged=round(float(baseline_right[clean].mean()), 5),
        dropped_train_rows=report.dropped_train_rows,
    )


def run(
    cfg: EvaluateConfig,
    finetune_cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    finetuned_dir: Path,
    tokenizer_dir: Path,
    validated_dir: Path,
    labels_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    model_card_path: Path,
    errors_path: Path,
    live_dirs: dict[str, Path] | None = None,
    stage_runs: dict[str, Path] | None = None,
    cost_paths: dict[str, Path] | None = None,
    base_path: Path | None = None,
    distill_path: Path | None = None,
    labels_path: Path | None = None,
) -> dict[str, Any]:
    """Score the model and the baseline on test; write metrics, plots, pictures and the card.
    `live_dirs` names the DVCLive folders whose training curves are drawn (by stage), and
    `stage_runs` the training stages' metrics files the card's "Training" section reads,
    `cost_paths` the cost records (lmops/cost.py) summed into the training cost, and
    `base_path` the base stage's manifest (where the pretrained base came from), and
    `distill_path` the distill stage's report (teacher or student served, and why), and
    `labels_path` the labels stage's report (its flagged test rows are in `labels_dir`).
    The baseline learns from the same training rows as the model (`labels_dir`)."""
    from lmops.classifier import load

    started = time.perf_counter()
    train = pd.read_parquet(labels_dir / "train.parquet")
    val = pd.read_parquet(validated_dir / "val.parquet")
    test = pd.read_parquet(validated_dir / "test.parquet")
    model = load(finetuned_dir)
    tokenizer = load_tokenizer(finetuned_dir)
    labels = model.spec.labels
    texts = test["text"].tolist()
    targets = test["label"].map({name: i for i, name in enumerate(labels)}).to_numpy()
    lengths = test["text"].str.len().to_numpy()

    def predict(batch_texts: list[str]) -> np.ndarray:
        return predict_proba(model, tokenizer, batch_texts, model_cfg.max_length)

    # What the server answers: the graph's scores divided by the temperature fitted on val.
    raw_probs = predict(texts)
    probs = apply_temperature(raw_probs, model.spec.temperature)
    model_metrics = classification_metrics(targets, probs, cfg, lengths)
    baseline_probs = baseline_proba(cfg, train, texts, labels)
    baseline_metrics = classification_metrics(targets, baseline_probs, cfg, lengths)
    behavioural = behavioural_checks(predict, texts, labels)
    gates = gates_verdict(
        cfg,
        model_metrics,
        baseline_metrics,
        behavioural,
        targets,
        probs.argmax(1),
        baseline_probs.argmax(1),
    )
    bins = cfg.calibration_bins
    calibration = Calibration(
        temperature=model.spec.temperature,
        test_ece_before=round(expected_calibration_error(targets, raw_probs, bins), 5),
        test_ece_after=round(expected_calibration_error(targets, probs, bins), 5),
        bins=bins,
    )
    transformer_only = None
    if model.ngram is not None:
        # The served model combines two; each part alone, for the card's side-by-side.
        transformer_probs = predict_proba(
            model, tokenizer, texts, model_cfg.max_length, transformer_only=True
        )
        transformer_only = classification_metrics(targets, transformer_probs, cfg, lengths)
    ablation = None
    if cfg.ablation:
        from lmops.tasks.finetune import train_classifier

        scratch_model, _ = train_classifier(
            finetune_cfg, model_cfg, load_tokenizer(tokenizer_dir), labels, train, val, None, None
        )
        # Transformer against transformer: the n-gram channel is not what pretraining buys.
        scratch = classification_metrics(
            targets,
            predict_proba(scratch_model, tokenizer, texts, model_cfg.max_length),
            cfg,
            lengths,
        )
        pretrained = transformer_only or model_metrics
        ablation = AblationMetrics(
            **scratch.model_dump(),
            pretraining_gain=round(pretrained.accuracy - scratch.accuracy, 5),
        )
    explanations, errors_markdown = None, None
    if cfg.errors.mistakes or cfg.errors.deletion_texts:
        from lmops.tasks import error_analysis

        score = error_analysis.calibrated_scorer(
            model, tokenizer.pad_token_id, model.spec.temperature
        )
        if cfg.errors.deletion_texts:
            sample = test["text"].sample(
                n=min(cfg.errors.deletion_texts, len(test)), random_state=0
            )
            explanations = error_analysis.deletion_check(
                sample.tolist(), tokenizer, model_cfg.max_length, score, seed=0
            )
        errors_markdown = error_analysis.mistakes_markdown(
            texts,
            targets,
            probs,
            labels,
            tokenizer,
            model_cfg.max_length,
            score,
            cfg.errors.mistakes,
        )
    distilled = (
        DistillReport.read(distill_path) if distill_path and distill_path.is_file() else None
    )
    metrics = Metrics(
        test_rows=len(test),
        labels=labels,
        model=model_metrics,
        baseline=baseline_metrics,
        behavioural=behavioural,
        gates=gates,
        calibration=calibration,
        transformer_only=transformer_only,
        transformer_weight=model.spec.transformer_weight if transformer_only else None,
        ablation_no_pretraining=ablation,
        explanations=explanations,
        cost=_training_cost(cost_paths) if cost_paths else None,
        distillation=distilled,
        label_issues=_test_label_issues(
            labels_path, labels_dir, targets, probs.argmax(1), baseline_probs.argmax(1)
        ),
        seconds=round(time.perf_counter() - started, 2),
    )

    predicted = probs.argmax(1)
    write_json(
        plots_dir / "confusion.json",
        [
            {"actual": labels[t], "predicted": labels[p]}
            for t, p in zip(targets, predicted, strict=True)
        ],
    )
    roc_rows = _roc_rows(targets, probs, labels)
    write_json(plots_dir / "roc.json", roc_rows)
    reliability = {
        f"{which} calibration": reliability_rows(targets, scores, bins, f"{which} calibration")
        for which, scores in (("before", raw_probs), ("after", probs))
    }
    for name, rows in reliability.items():
        write_json(plots_dir / f"reliability_{name.split()[0]}.json", rows)
    _pictures(
        plots_dir,
        targets,
        predicted,
        labels,
        roc_rows,
        reliability,
        metrics,
        live_dirs or {},
    )
    model_card_path.write_text(
        _model_card(
            metrics,
            DataManifest.of(validated_dir),
            model_cfg,
            labels,
            finetune_cfg.from_pretrained,
            {stage: StageRun.read(path) for stage, path in (stage_runs or {}).items()},
            BaseManifest.read(base_path) if base_path and base_path.is_file() else None,
            distilled,
        ),
        encoding="utf-8",
    )
    errors_path.write_text(
        errors_markdown or "# Most confident mistakes\n\nNot analysed (evaluate.errors).\n",
        encoding="utf-8",
    )
    metrics.write(metrics_path)
    log.info(
        "evaluate: model accuracy %.4f, baseline %.4f, gates %s",
        model_metrics.accuracy,
        baseline_metrics.accuracy,
        "passed" if gates.passed else "failed",
    )
    return metrics.dump()
