"""Promotion gates: a challenger version against the champion (the prod version), both run
through their ONNX exports, as the server would run them, on the challenger's test split.

Absolute gates (the challenger's own evaluation gates, its export's parity) apply always;
the relative ones (accuracy, macro-F1, median latency against prod) when there is a prod.
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Any

from lmops import registry
from lmops.config import ParityConfig, PromotionConfig
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
    from serving.engine import Engine

    return Engine(model_dir, require_gpu=False, max_batch_size=32)


def score(engine: Any, texts: list[str], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    predicted = [engine.labels[i] for i in engine.probabilities(texts).argmax(1)]
    return {
        "accuracy": round(float(accuracy_score(labels, predicted)), 5),
        "macro_f1": round(float(f1_score(labels, predicted, average="macro")), 5),
    }


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
    """Accuracy, macro-F1 and median latency of both versions on the challenger's test split."""
    test = test_split(root, registry.commit_of(root, challenger))
    texts, labels = test["text"].tolist(), test["label"].astype(str).tolist()
    versions = [challenger] + ([champion] if champion else [])
    engines = [_engine(registry.materialize(root, v)) for v in versions]
    latencies = median_latencies_ms(engines, texts, cfg.latency_samples)
    measured = {
        version: {
            **score(engine, texts, labels),
            "p50_latency_ms": latency,
            "variant": engine.variant,
        }
        for version, engine, latency in zip(versions, engines, latencies, strict=True)
    }
    return {"test_rows": len(texts), "models": measured}


def _gate(name: str, passed: bool, value: Any, threshold: str, note: str = "") -> dict[str, Any]:
    return {"gate": name, "passed": passed, "value": value, "threshold": threshold, "note": note}


def absolute_gates(
    evaluation: dict[str, Any], manifest: dict[str, Any], parity: ParityConfig
) -> list[dict[str, Any]]:
    """The challenger's own evaluation gates and its export's fp32 parity figures."""
    if not evaluation or not manifest:
        return [_gate("evaluated and exported", False, "missing", "reports/metrics.json, manifest")]
    gates = evaluation["gates"]
    beats = gates["beats_baseline"]
    fp32 = manifest["variants"]["fp32"]["parity"]
    return [
        _gate(
            "min_accuracy",
            gates["min_accuracy"]["passed"],
            gates["min_accuracy"]["value"],
            f">= {gates['min_accuracy']['threshold']}",
        ),
        _gate(
            "beats_baseline",
            beats["passed"] or beats["relaxed"],
            beats["margin"],
            f">= {beats['threshold']:+} over TF-IDF + LR "
            f"({evaluation['baseline']['accuracy']:.4f})",
            "relaxed by the profile (evaluate.gates.relax_baseline)"
            if beats["relaxed"] and not beats["passed"]
            else "",
        ),
        _gate(
            "onnx_parity",
            fp32["max_abs_logit_diff_vs_torch"] <= parity.max_abs_logit_diff
            and fp32["label_agreement_vs_torch"] >= parity.min_label_agreement,
            f"max |logit diff| {fp32['max_abs_logit_diff_vs_torch']:.2e}, labels "
            f"{fp32['label_agreement_vs_torch']:.4f}",
            f"<= {parity.max_abs_logit_diff:.0e}, >= {parity.min_label_agreement}",
        ),
    ]


def relative_gates(
    challenger: dict[str, Any], champion: dict[str, Any], cfg: PromotionConfig
) -> list[dict[str, Any]]:
    latency_limit = champion["p50_latency_ms"] * (1 + cfg.max_latency_increase)
    return [
        _gate(
            "accuracy_vs_prod",
            challenger["accuracy"] >= champion["accuracy"] - cfg.max_accuracy_drop,
            challenger["accuracy"],
            f">= {champion['accuracy']:.4f} - {cfg.max_accuracy_drop}",
        ),
        _gate(
            "macro_f1_vs_prod",
            challenger["macro_f1"] >= champion["macro_f1"] - cfg.max_macro_f1_drop,
            challenger["macro_f1"],
            f">= {champion['macro_f1']:.4f} - {cfg.max_macro_f1_drop}",
        ),
        _gate(
            "latency_vs_prod",
            challenger["p50_latency_ms"] <= latency_limit,
            f"{challenger['p50_latency_ms']:.3f} ms",
            f"<= {latency_limit:.3f} ms ({champion['p50_latency_ms']:.3f} ms "
            f"+ {cfg.max_latency_increase:.0%})",
        ),
    ]


def markdown(
    challenger: str, champion: str | None, measured: dict[str, Any], gates: list[dict]
) -> str:
    models = measured["models"]
    lines = [
        f"Challenger **{challenger}** vs champion **{champion or 'none (first model)'}** "
        f"on the challenger's test split ({measured['test_rows']:,} texts)",
        "",
        "| version | accuracy | macro-F1 | p50 latency (1 text) | variant |",
        "|---|---:|---:|---:|---|",
        *(
            f"| {v} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['p50_latency_ms']:.3f} ms "
            f"| {m['variant']} |"
            for v, m in models.items()
        ),
        "",
        "| gate | verdict | value | needed | note |",
        "|---|---|---|---|---|",
        *(
            f"| {g['gate']} | {'pass' if g['passed'] else '**FAIL**'} | {g['value']} | "
            f"{g['threshold']} | {g['note']} |"
            for g in gates
        ),
    ]
    return "\n".join(lines)


def key_figures(measured: dict[str, Any], version: str) -> dict[str, Any]:
    figures = measured["models"][version]
    return {k: figures[k] for k in ("accuracy", "macro_f1", "p50_latency_ms")}
