"""What a challenger beside prod costs prod's callers, side by side in one run: the same
server on the same model and inputs, alone and with a challenger (the same export, loaded
a second time) in the shadow of every request, alternating rounds so drift in the
machine's speed hits both alike. Prod's throughput, p50 and p99 at 1, 8 and 32 clients per
side, the ratios shadow/alone, and what the shadow did (scored or skipped for a full queue).

    .venv/bin/python -m bench.shadow [--model-dir models/onnx] [--seconds 4] [--rounds 3]

Needs an export and its test split (`make run`). Writes reports/bench/shadow.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import yaml

from bench.serving import load, side_by_side, wait_ready, write_result

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 32)
SIDES = ("alone", "shadow")


def serve(root: Path, model_dir: Path, port: int, shadow: bool) -> None:
    """The server `lmops serve --stage prod [--challenger staging]` builds, without a
    registry: prod and the challenger are the same export under two version names."""
    import uvicorn

    from lmops.config import load_params
    from lmops.engine import Engine
    from lmops.serving.app import create_app
    from lmops.serving.swap import Following

    cfg = load_params(root).serve
    prod = Engine(model_dir, False, cfg.max_batch_size, cfg.threads, version="prod")
    follow = Following(lambda: ("prod", model_dir))
    challenger, challenger_follow = None, None
    if shadow:
        # As the CLI loads a shadow-only challenger: one ONNX Runtime thread.
        challenger = Engine(model_dir, False, cfg.max_batch_size, 1, version="challenger")
        challenger.warm_up()
        challenger_follow = Following(
            lambda: ("challenger", model_dir), lambda v, d: challenger, "staging"
        )
    app = create_app(cfg, prod, root, follow, None, challenger_follow, challenger)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def shadow_counts(url: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("lmops_shadow_requests_total{"):
            counts[line.split('"')[1]] = float(line.split()[-1])
    return counts


def measure(root: Path, model_dir: Path, texts: list[str], shadow: bool, seconds: float) -> dict:
    port = 19_500 + os.getpid() % 400 + (1 if shadow else 0)
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.shadow", "--serve", str(root), str(model_dir), str(port)]
        + (["--with-shadow"] if shadow else []),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        figures: dict[str, Any] = {}
        for n in CONCURRENCY:
            before = shadow_counts(url)
            figures[f"clients_{n}"] = asyncio.run(load(url, texts, n, seconds))
            if shadow:
                after = shadow_counts(url)
                figures[f"clients_{n}"]["shadow"] = {k: after[k] - before[k] for k in after}
        return figures
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models/onnx")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench/shadow.json")
    parser.add_argument("--serve", nargs=3, metavar=("ROOT", "MODEL_DIR", "PORT"))
    parser.add_argument("--with-shadow", action="store_true")
    args = parser.parse_args()
    if args.serve:
        root, model_dir, port = args.serve
        return serve(Path(root), Path(model_dir), int(port), args.with_shadow)

    texts = pd.read_parquet(ROOT / "data/validated/test.parquet")["text"].tolist()
    rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        raw = yaml.safe_load((ROOT / "params.yaml").read_text("utf-8"))
        raw["serve"].update({"max_queue": 1024, "drain_seconds": 0})
        raw["serve"]["traffic"]["dir"] = "traffic"
        (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), "utf-8")
        for _ in range(args.rounds):
            for side in SIDES:
                rounds[side].append(
                    measure(root, args.model_dir.resolve(), texts, side == "shadow", args.seconds)
                )

    summary = side_by_side(rounds, "alone", "shadow", CONCURRENCY)
    for clients, row in summary.items():
        shadowed = [r[clients]["shadow"] for r in rounds["shadow"]]
        scored = sum(s.get("scored", 0) for s in shadowed)
        skipped = sum(s.get("skipped", 0) for s in shadowed)
        row["shadow_scored_share"] = round(scored / max(scored + skipped, 1), 3)
    facts = {"model": str(args.model_dir), "seconds_per_load": args.seconds, "rounds": args.rounds}
    write_result(args.out, facts, summary, rounds)


if __name__ == "__main__":
    main()
