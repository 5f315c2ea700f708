"""Drift-monitor cost: wall time and peak RSS of one monitoring run over 1k-100k rows.

One `lmops monitor` run (tasks/monitor.py) over 1k, 10k and 100k traffic rows, the
reference fixed; each size in a fresh process, the way a scheduled run starts. The traffic
is synthesised from real texts (reviews of the validated splits, 1 in 5 a People's Daily
news sentence), written as the server writes its log and spread over the last 12 hours. A
second series runs without the monitor's sampling (`monitor.sample_rows` raised to the
window's size) to show what sampling buys.

    .venv/bin/python bench/monitor.py [--sizes 1000 10000 100000] [--model-dir models/onnx]

Needs an exported model and data/validated (make run). Writes reports/bench/monitor.json.

`--estimate` measures instead how well the accuracy estimated without labels (CBPE,
lmops.stats.estimated_accuracy, as the monitor computes it) follows the true accuracy:
over random in-domain windows of the test split, and over windows whose true accuracy is
lower — short texts, the model's least confident texts, and windows seeded with a share of
its mistakes. Writes reports/bench/monitor-estimate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lmops.artifacts import ExportManifest, TrafficRecord, traffic_file_name

ROOT = Path.cwd()
NEWS_EVERY = 5


def synthesise(folder: Path, rows: int, validated_dir: Path, now: datetime) -> None:
    """`rows` traffic records over the 12 hours before `now`, one file per hour."""
    import pandas as pd

    from lmops.simulate import corpus_sentences

    reviews = pd.concat(
        pd.read_parquet(validated_dir / f"{split}.parquet", columns=["text"])
        for split in ("train", "val", "test")
    )["text"].tolist()
    news = corpus_sentences("builtin:zh-news", rows // NEWS_EVERY + 1, seed=0, root=ROOT)
    folder.mkdir(parents=True)
    handles: dict[str, Any] = {}
    for i in range(rows):
        when = now - timedelta(hours=12) + timedelta(hours=12) * i / rows
        text = news[i // NEWS_EVERY] if i % NEWS_EVERY == 0 else reviews[i % len(reviews)]
        record = TrafficRecord(
            timestamp=when,
            request_id=f"bench-{i}",
            label="positive",
            score=0.9,
            latency_ms=1.0,
            model_version="bench",
            text=text,
        )
        name = traffic_file_name(when)
        if name not in handles:
            handles[name] = (folder / name).open("w", encoding="utf-8")
        handles[name].write(record.line() + "\n")
    for handle in handles.values():
        handle.close()


def one_run(args: argparse.Namespace) -> None:
    """In a fresh process: import, run the monitor once, report time and peak RSS."""
    started = time.perf_counter()
    import evidently.presets
    import evidently.ui.workspace  # noqa: F401  (imported here so `imports` holds their cost)

    from lmops.config import override, parse_params, read_raw
    from lmops.tasks import monitor

    overrides: dict[str, Any] = {"monitor.window.max_rows": None, "monitor.window.hours": 24}
    if args.unsampled:
        overrides["monitor.sample_rows"] = args.size
    cfg = parse_params(override(read_raw(ROOT), overrides)).monitor
    imported = time.perf_counter()
    work = Path(args.one)
    summary = monitor.run(
        cfg,
        Path(args.model_dir),
        "bench",
        work / "traffic",
        Path(args.validated),
        work / "reports",
        work / "workspace",
    )
    finished = time.perf_counter()
    print(
        json.dumps(
            {
                "rows": summary["rows"],
                "seconds": {
                    "imports": round(imported - started, 3),
                    **summary["seconds"],
                    "process_total": round(finished - started, 3),
                },
                # Linux reports ru_maxrss in KiB.
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "drift_detected": summary["drift_detected"],
                "drifted_columns_share": summary["checks"]["columns"]["share"],
                "embedding_score": summary["checks"]["embedding"]["score"],
                "report_html_mb": round(Path(summary["report"]["html"]).stat().st_size / 2**20, 2),
            }
        )
    )


def measure(args: argparse.Namespace, size: int, unsampled: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        synthesise(work / "traffic", size, Path(args.validated), datetime.now(UTC))
        # `-m` from the project root: run as a file, bench/serving.py would shadow `serving`.
        command = [
            sys.executable,
            "-m",
            "bench.monitor",
            "--one",
            str(work),
            "--size",
            str(size),
            "--model-dir",
            args.model_dir,
            "--validated",
            args.validated,
        ] + (["--unsampled"] if unsampled else [])
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"monitor run over {size:,} rows failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    """The estimate against the truth, window by window (the labels only for scoring)."""
    import numpy as np
    import pandas as pd

    from lmops.config import load_params
    from lmops.engine import Engine
    from lmops.stats import estimated_accuracy
    from lmops.tasks.monitor import VARIANT

    cfg = load_params(ROOT).monitor
    engine = Engine(Path(args.model_dir), require_gpu=False, max_batch_size=64, variant=VARIANT)

    def scored(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frame = pd.read_parquet(Path(args.validated) / f"{split}.parquet")
        probabilities = engine.probabilities(frame["text"].tolist())
        predicted = np.array([engine.labels[i] for i in probabilities.argmax(1)])
        right = predicted == frame["label"].astype(str).to_numpy()
        return probabilities.max(1), right, frame["text"].str.len().to_numpy()

    val_confidence, val_right, _ = scored("val")
    confidence, right, lengths = scored("test")
    rng = np.random.default_rng(0)

    def window(rows: np.ndarray) -> dict[str, float]:
        value, low, high = estimated_accuracy(confidence[rows], len(rows), 0.95)
        truth = float(right[rows].mean())
        return {
            "rows": len(rows),
            "true": round(truth, 4),
            "estimated": round(value, 4),
            "error": round(value - truth, 4),
            "inside_interval": bool(low <= truth <= high),
            "drop_vs_reference": round(float(val_confidence.mean()) - value, 4),
        }

    size = args.window_rows
    in_domain = [window(rng.choice(len(right), size, replace=False)) for _ in range(args.windows)]
    errors = np.array([w["error"] for w in in_domain])
    mistakes, correct = np.flatnonzero(~right), np.flatnonzero(right)

    def seeded(share: float) -> np.ndarray:
        wrong = rng.choice(mistakes, min(int(size * share), len(mistakes)), replace=False)
        return np.concatenate([wrong, rng.choice(correct, size - len(wrong), replace=False)])

    shifted = {
        "shortest_texts": window(np.argsort(lengths, kind="stable")[:size]),
        "least_confident": window(np.argsort(confidence)[:size]),
        **{f"mistakes_{int(share * 100)}pct": window(seeded(share)) for share in (0.3, 0.5)},
    }
    return {
        "what": "CBPE (accuracy estimated without labels) against the true accuracy",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "dir": str(Path(args.model_dir).resolve()),
            "variant": engine.variant,
            "test_rows": len(right),
            "test_accuracy": round(float(right.mean()), 4),
        },
        "reference": {
            "split": "val",
            "accuracy": round(float(val_right.mean()), 4),
            "estimated": round(float(val_confidence.mean()), 4),
        },
        "max_drop": cfg.performance.max_drop,
        "note": args.note,
        "in_domain": {
            "windows": args.windows,
            "rows_each": size,
            "seed": 0,
            "mean_error": round(float(errors.mean()), 4),
            "mean_abs_error": round(float(np.abs(errors).mean()), 4),
            "max_abs_error": round(float(np.abs(errors).max()), 4),
            "within_2_points": round(float((np.abs(errors) <= 0.02).mean()), 3),
            "inside_interval": round(float(np.mean([w["inside_interval"] for w in in_domain])), 3),
            "degraded_false_alarms": int(
                sum(w["drop_vs_reference"] > cfg.performance.max_drop for w in in_domain)
            ),
            "each": in_domain,
        },
        "lower_accuracy_windows": shifted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument(
        "--unsampled-up-to", type=int, default=10_000, help="Largest size run unsampled too."
    )
    parser.add_argument("--note", help="Recorded in the result (e.g. where the model came from).")
    parser.add_argument("--model-dir", default="models/onnx")
    parser.add_argument("--validated", default="data/validated")
    parser.add_argument("--out", default="reports/bench/monitor.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--unsampled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--estimate", action="store_true", help="CBPE against the truth.")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window-rows", type=int, default=300)
    args = parser.parse_args()
    if args.estimate:
        result = estimate(args)
        out = ROOT / "reports/bench/monitor-estimate.json"
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps({k: v for k, v in result["in_domain"].items() if k != "each"}, indent=2))
        print(json.dumps(result["lower_accuracy_windows"], indent=2))
        return
    if args.one:
        one_run(args)
        return
    if not (Path(args.model_dir) / ExportManifest.FILE).is_file():
        sys.exit(f"no exported model at {args.model_dir} (make run first, or --model-dir)")
    manifest = ExportManifest.of(Path(args.model_dir))
    from lmops.config import load_params

    cfg = load_params(ROOT).monitor
    sampled = {f"rows_{n}": measure(args, n, unsampled=False) for n in args.sizes}
    unsampled = {
        f"rows_{n}": measure(args, n, unsampled=True)
        for n in args.sizes
        if cfg.sample_rows < n <= args.unsampled_up_to
    }
    result = {
        "what": __doc__.splitlines()[0],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {
            "dir": str(Path(args.model_dir).resolve()),
            "architecture": manifest.architecture,
            "embedding_dim": manifest.outputs["embedding"].shape[1],
            "max_length": manifest.max_length,
        },
        "reference": {"splits": cfg.reference_splits, "validated": args.validated},
        "sample_rows": cfg.sample_rows,
        "note": args.note,
        "news_share_of_traffic": 1 / NEWS_EVERY,
        "sampled": sampled,
        "unsampled": unsampled,
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {
                series: {
                    size: {"s": r["seconds"]["process_total"], "peak_rss_mb": r["peak_rss_mb"]}
                    for size, r in runs.items()
                }
                for series, runs in (("sampled", sampled), ("unsampled", unsampled))
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
