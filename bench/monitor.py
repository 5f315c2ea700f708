"""Drift-monitor cost: wall time and peak RSS of one monitoring run over 1k-100k rows.

One `lmops monitor` run (tasks/monitor.py) over 1k, 10k and 100k traffic rows, the
reference fixed; each size in a fresh process, the way a scheduled run starts. The traffic
is synthesised from real texts (reviews of the validated splits, 1 in 5 a People's Daily
news sentence), written as the server writes its log and spread over the last 12 hours. A
second series runs without the monitor's sampling (`monitor.sample_rows` raised to the
window's size) to show what sampling buys.

    .venv/bin/python bench/monitor.py [--sizes 1000 10000 100000] [--model-dir models/onnx]

Needs an exported model and data/validated (make run). Writes reports/bench/monitor.json.
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

    from lmops.simulate import news_sentences

    reviews = pd.concat(
        pd.read_parquet(validated_dir / f"{split}.parquet", columns=["text"])
        for split in ("train", "val", "test")
    )["text"].tolist()
    news = news_sentences(rows // NEWS_EVERY + 1, seed=0, root=ROOT)
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
    args = parser.parse_args()
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
