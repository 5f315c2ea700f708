"""Promotion gates: a challenger version against the champion (the prod version), both run
through their ONNX exports, as the server would run them, on the challenger's test split.

Absolute gates (the challenger's own evaluation gates, its export's parity) apply always;
the relative ones (accuracy, macro-F1, median latency against prod) when there is a prod;
the live ones (promotion.live) when the challenger waits in staging for evidence from a
server that shadowed it beside prod (serving/challenger.py).
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmops import registry
from lmops.artifacts import ExportManifest, Metrics, shadow_records
from lmops.config import LiveEvidenceConfig, PairedRuleConfig, ParityConfig, PromotionConfig
from lmops.errors import LmopsError
from lmops.stages import VALIDATED_DIR


def test_split(root: Path, commit: str) -> Any:
    """The test split as of the challenger's commit, from DVC's cache (or remote)."""
    import dvc.api
    import pandas as pd

    path = VALIDATED_DIR / "test.parquet"
    try:
        with dvc.api.open(str(path), repo=str(root), rev=commit, mode="rb") as handle:
            return pd.read_parquet(io.BytesIO(handle.read()))
    except Exception as err:
        raise LmopsError(f"cannot read {path} as of {commit[:12]} from DVC: {err}") from err


def _engine(model_dir: Path) -> Any:
    from lmops.engine import Engine

    return Engine(model_dir, require_gpu=False, max_batch_size=32)


def score(engine: Any, texts: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and every predicted label (the paired gates need them)."""
    from lmops.stats import accuracy, macro_f1

    predicted = np.array([engine.labels[i] for i in engine.probabilities(texts).argmax(1)])
    targets = np.array(labels)
    return {
        "accuracy": round(accuracy(targets, predicted), 5),
        "macro_f1": round(macro_f1(targets, predicted), 5),
        "predicted": predicted.tolist(),
    }


def cpu_ms_per_1k_texts(engines: list[Any], texts: list[str], rounds: int = 5) -> list[float]:
    """What serving costs: this process's CPU time (every ONNX Runtime thread) to score the
    texts, batched as the server batches them, per 1,000 texts; the median of `rounds`
    passes alternating between the engines, so that both see the same machine load."""
    passes: list[list[float]] = [[] for _ in engines]
    for _ in range(rounds):
        for engine, times in zip(engines, passes, strict=True):
            started = time.process_time()
            engine.probabilities(texts)
            times.append((time.process_time() - started) * 1000 / len(texts) * 1000)
    return [round(statistics.median(times), 1) for times in passes]


def median_latencies_ms(engines: list[Any], texts: list[str], samples: int) -> list[float]:
    """One-text predictions, alternating between the engines so that both see the same
    machine load; the median of each."""
    timings: list[list[float]] = [[] for _ in engines]
    for engine in engines:
        engine.warm_up()
    for index in range(samples):
        text = [texts[index % len(texts)]]
        for engine, times in zip(engines, timings, strict=True):
            started = time.perf_counter()
            engine.probabilities(text)
            times.append((time.perf_counter() - started) * 1000)
    return [round(statistics.median(times), 3) for times in timings]


def measure(
    root: Path, challenger: str, champion: str | None, cfg: PromotionConfig
) -> dict[str, Any]:
    """Accuracy, macro-F1, median latency and CPU cost of both versions on the challenger's
    test split."""
    test = test_split(root, registry.commit_of(root, challenger))
    texts, labels = test["text"].tolist(), test["label"].astype(str).tolist()
    versions = [challenger] + ([champion] if champion else [])
    engines = [_engine(registry.materialize(root, v)) for v in versions]
    latencies = median_latencies_ms(engines, texts, cfg.latency_samples)
    costs = cpu_ms_per_1k_texts(engines, texts)
    measured = {
        version: {
            **score(engine, texts, labels),
            "p50_latency_ms": latency,
            "cpu_ms_per_1k_texts": cost,
            "variant": engine.variant,
        }
        for version, engine, latency, cost in zip(versions, engines, latencies, costs, strict=True)
    }
    return {"test_rows": len(texts), "targets": labels, "models": measured}


def _gate(name: str, passed: bool, value: Any, threshold: str, note: str = "") -> dict[str, Any]:
    return {"gate": name, "passed": passed, "value": value, "threshold": threshold, "note": note}


def absolute_gates(
    evaluation: Metrics | None, manifest: ExportManifest | None, parity: ParityConfig
) -> list[dict[str, Any]]:
    """The challenger's own evaluation gates and its export's fp32 parity figures."""
    if evaluation is None or manifest is None:
        return [_gate("evaluated and exported", False, "missing", "reports/metrics.json, manifest")]
    gates = evaluation.gates
    beats = gates.beats_baseline
    paired = beats.paired
    fp32 = manifest.variants["fp32"].parity
    rule = "CI low > 0" if paired.rule == "superiority" else f"CI low > -{paired.margin}"
    baseline_gate = {
        **_gate(
            "beats_baseline",
            beats.passed or beats.relaxed,
            f"{beats.margin:+.4f} [{paired.ci_low:+.4f}, {paired.ci_high:+.4f}] "
            f"p={paired.p_value_mcnemar:.3g}",
            f">= {beats.threshold:+} and {rule} over TF-IDF + LR "
            f"({evaluation.baseline.accuracy:.4f})",
            "relaxed by the profile (evaluate.gates.relax_baseline)"
            if beats.relaxed and not beats.passed
            else paired.reading,
        ),
        "paired": paired.dump(),
    }
    behavioural = [
        _gate(f"behavioural:{name}", gate.passed, gate.value, f">= {gate.threshold}")
        for name, gate in (gates.behavioural or {}).items()
    ]
    return [
        _gate(
            "min_accuracy",
            gates.min_accuracy.passed,
            gates.min_accuracy.value,
            f">= {gates.min_accuracy.threshold}",
        ),
        baseline_gate,
        *behavioural,
        _gate(
            "onnx_parity",
            fp32["max_abs_logit_diff_vs_torch"] <= parity.max_abs_logit_diff
            and fp32["label_agreement_vs_torch"] >= parity.min_label_agreement,
            f"max |logit diff| {fp32['max_abs_logit_diff_vs_torch']:.2e}, labels "
            f"{fp32['label_agreement_vs_torch']:.4f}",
            f"<= {parity.max_abs_logit_diff:.0e}, >= {parity.min_label_agreement}",
        ),
    ]


def _paired_gate(
    name: str,
    metric: str,
    measured: dict[str, Any],
    challenger: str,
    champion: str,
    rule: PairedRuleConfig,
    max_drop: float,
    cfg: PromotionConfig,
) -> dict[str, Any]:
    """The point estimate within `max_drop` of prod, and the paired rule."""
    from lmops.stats import compare

    models = measured["models"]
    paired = compare(
        np.array(measured["targets"]),
        np.array(models[challenger]["predicted"]),
        np.array(models[champion]["predicted"]),
        metric,
        rule.rule,
        rule.margin,
        cfg.confidence,
        cfg.bootstrap_samples,
    )
    needed = f">= -{max_drop} and " + (
        "CI low > 0 (superiority)"
        if rule.rule == "superiority"
        else f"CI low > -{rule.margin} (non-inferiority)"
    )
    return {
        **_gate(
            name,
            paired["difference"] >= -max_drop and paired["passed"],
            f"{paired['difference']:+.4f} [{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}]",
            needed,
            paired["reading"],
        ),
        "paired": paired,
    }


def relative_gates(
    measured: dict[str, Any], challenger: str, champion: str, cfg: PromotionConfig
) -> list[dict[str, Any]]:
    """Challenger minus champion on the same texts (paired), median latency and CPU cost."""
    models = measured["models"]
    latency_limit = models[champion]["p50_latency_ms"] * (1 + cfg.max_latency_increase)
    cost_limit = models[champion]["cpu_ms_per_1k_texts"] * (1 + cfg.max_cost_increase)
    return [
        _paired_gate(
            "accuracy_vs_prod",
            "accuracy",
            measured,
            challenger,
            champion,
            cfg.accuracy_vs_prod,
            cfg.max_accuracy_drop,
            cfg,
        ),
        _paired_gate(
            "macro_f1_vs_prod",
            "macro_f1",
            measured,
            challenger,
            champion,
            cfg.macro_f1_vs_prod,
            cfg.max_macro_f1_drop,
            cfg,
        ),
        _gate(
            "latency_vs_prod",
            models[challenger]["p50_latency_ms"] <= latency_limit,
            f"{models[challenger]['p50_latency_ms']:.3f} ms",
            f"<= {latency_limit:.3f} ms ({models[champion]['p50_latency_ms']:.3f} ms "
            f"+ {cfg.max_latency_increase:.0%})",
        ),
        _gate(
            "cost_vs_prod",
            models[challenger]["cpu_ms_per_1k_texts"] <= cost_limit,
            f"{models[challenger]['cpu_ms_per_1k_texts']:,.1f} CPU-ms per 1,000 texts",
            f"<= {cost_limit:,.1f} ({models[champion]['cpu_ms_per_1k_texts']:,.1f} "
            f"+ {cfg.max_cost_increase:.0%})",
        ),
    ]


def live_evidence(
    traffic_dir: Path, champion: str, challenger: str, confidence: float
) -> dict[str, Any]:
    """What the shadow saw of `challenger` beside `champion` (every shadow record of the
    pair): texts, label agreement, each one's estimated accuracy (mean calibrated
    confidence, CBPE) and the paired interval of their difference, median latencies."""
    from lmops.stats import paired_mean_interval

    records = shadow_records(traffic_dir, champion, challenger)
    if not records:
        return {"texts": 0, "agreement": None}
    prod = np.array([r.prod_score for r in records])
    mine = np.array([r.challenger_score for r in records])
    difference, low, high = paired_mean_interval(mine - prod, confidence)
    return {
        "texts": len(records),
        "agreement": round(
            float(np.mean([r.prod_label == r.challenger_label for r in records])), 5
        ),
        "estimated_accuracy": {
            "prod": round(float(prod.mean()), 5),
            "challenger": round(float(mine.mean()), 5),
        },
        "paired": {
            "difference": round(difference, 5),
            "ci_low": round(low, 5),
            "ci_high": round(high, 5),
            "confidence": confidence,
        },
        "median_latency_ms": {
            "prod": statistics.median(r.prod_latency_ms for r in records),
            "challenger": statistics.median(r.challenger_latency_ms for r in records),
        },
        "since": records[0].timestamp.isoformat(timespec="seconds"),
    }


def live_gates(evidence: dict[str, Any], cfg: LiveEvidenceConfig) -> list[dict[str, Any]]:
    """Enough shadowed texts, enough agreement with prod, and an estimated accuracy whose
    paired interval reaches no further than the margin below prod's (non-inferiority: a
    challenger as good as prod passes; one that is surely worse does not)."""
    from lmops.stats import reading

    texts, agreement = evidence["texts"], evidence["agreement"]
    gates = [
        _gate(
            "live_shadow_texts",
            texts >= cfg.min_texts,
            f"{texts:,} texts shadowed beside prod",
            f">= {cfg.min_texts:,} (promotion.live.min_texts)",
            "" if texts else "serve it with `lmops serve --stage prod --challenger staging`",
        ),
        _gate(
            "live_agreement",
            agreement is not None and agreement >= cfg.min_agreement,
            "none" if agreement is None else f"{agreement:.4f}",
            f">= {cfg.min_agreement} (promotion.live.min_agreement)",
        ),
    ]
    if not texts:
        return [*gates, _gate("live_estimated_accuracy", False, "none", "shadowed texts")]
    paired = evidence["paired"]
    estimated = evidence["estimated_accuracy"]
    paired = {**paired, "rule": "non_inferiority", "margin": cfg.estimated_accuracy_margin}
    return [
        *gates,
        {
            **_gate(
                "live_estimated_accuracy",
                paired["ci_low"] > -cfg.estimated_accuracy_margin,
                f"{paired['difference']:+.4f} [{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}] "
                f"(challenger {estimated['challenger']:.4f}, prod {estimated['prod']:.4f})",
                f"CI low > -{cfg.estimated_accuracy_margin} (non-inferiority)",
                reading(paired["ci_low"], paired["ci_high"]),
            ),
            "paired": paired,
        },
    ]


def cell(value: Any) -> str:
    """A markdown table cell: a `|` in the text (`|logit diff|`) would split the row."""
    return str(value).replace("|", "\\|")


def markdown(
    challenger: str, champion: str | None, measured: dict[str, Any], gates: list[dict]
) -> str:
    models = measured["models"]
    lines = [
        f"Challenger **{challenger}** vs champion **{champion or 'none (first model)'}** "
        f"on the challenger's test split ({measured['test_rows']:,} texts)",
        "",
        "| version | accuracy | macro-F1 | p50 latency (1 text) | CPU-ms per 1,000 texts "
        "| variant |",
        "|---|---:|---:|---:|---:|---|",
        *(
            f"| {v} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['p50_latency_ms']:.3f} ms "
            f"| {m['cpu_ms_per_1k_texts']:,.1f} | {m['variant']} |"
            for v, m in models.items()
        ),
        "",
        "Measured here as a CPU server runs each version: the variant its manifest recommends "
        "(int8 where it passed parity). The evaluation's figures (reports/metrics.json, the "
        "model card) are the PyTorch model's, so the two can differ by the quantisation.",
        "",
        "| gate | verdict | value | needed | note |",
        "|---|---|---|---|---|",
        *(
            f"| {g['gate']} | {'pass' if g['passed'] else '**FAIL**'} | {cell(g['value'])} | "
            f"{cell(g['threshold'])} | {cell(g['note'])} |"
            for g in gates
        ),
    ]
    return "\n".join(lines)


def key_figures(
    measured: dict[str, Any],
    version: str,
    gates: list[dict[str, Any]],
    evaluation: Metrics | None,
    live: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the promotion record keeps: the figures, each paired comparison, what the
    version cost to train (its evaluation's total, reports/cost/), and the live evidence."""
    figures = measured["models"][version]
    kept = {
        k: figures[k] for k in ("accuracy", "macro_f1", "p50_latency_ms", "cpu_ms_per_1k_texts")
    }
    if evaluation is not None and evaluation.cost is not None:
        kept["training_cost"] = evaluation.cost.total.dump()
    for gate in gates:
        if "paired" in gate:
            kept[gate["gate"]] = {
                k: gate["paired"][k]
                for k in ("difference", "ci_low", "ci_high", "confidence", "rule", "margin")
            } | (
                {"p_value": gate["paired"]["p_value_mcnemar"]}
                if "p_value_mcnemar" in gate["paired"]
                else {}
            )
    if live is not None:
        kept["live_evidence"] = live
    return kept
