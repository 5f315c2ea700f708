"""Pretraining's memory and time per step as the corpus grows, before and after a change,
side by side in one run: `lmops stage pretrain` from a git revision (a temporary worktree)
and from the working tree, on the same validated data, tokenizer and params.

    .venv/bin/python -m bench.scale --rev 8b1c0de [--copies 1,10,30] [--steps 20]

The corpus is People's Daily news (builtin:zh-news, 19.5k documents) repeated N times,
each copy tagged so that every document stays distinct, as issue 33's table measured it;
pretraining runs `--steps` steps on the corpus alone with the tiny profile's model. Peak
memory is the stage's own record (reports/cost/pretrain.json: on the working tree its
address space's peak, VmHWM; a revision before cb1d1c7 reports ru_maxrss, which counts
what the process inherited from the bench, kept small for that reason).
Writes reports/bench/scale.json: per side and size, peak MB, wall seconds, seconds per
step, and the after/before ratio of peak memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from bench.server_overhead import importable, revision_worktree
from bench.serving import write_result
from lmops.artifacts import StageCost, StageRun

ROOT = Path(__file__).resolve().parent.parent
STAGE_PARAMS = {
    "pretrain.texts": ["corpus"],
    "finetune.from_pretrained": True,
    "pretrain.eval_batches": 2,
}


def prepare(scratch: Path, copies: list[int], steps: int) -> tuple[Path, dict[int, Path]]:
    """The tiny profile's validated data and tokenizer once, then one validated folder per
    size whose corpus is the news corpus repeated."""
    from lmops.config import apply_overrides, resolve_overrides
    from lmops.sources import read_corpus

    base = scratch / "base"
    base.mkdir()
    shutil.copy(ROOT / "params.yaml", base / "params.yaml")
    shutil.copytree(ROOT / "profiles", base / "profiles")
    overrides = [f"{k}={json.dumps(v)}" for k, v in STAGE_PARAMS.items()]
    overrides += [f"pretrain.steps={steps}", f"pretrain.checkpoint_every={steps + 1}"]
    apply_overrides(base, resolve_overrides(base, "tiny", overrides))
    for stage in ("base", "ingest", "validate", "tokenizer"):
        subprocess.run(
            [sys.executable, "-m", "lmops", "stage", stage],
            cwd=base,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    news = read_corpus("builtin:zh-news", base).frame["text"].astype(str).tolist()
    validated = {}
    for n in copies:
        folder = scratch / f"validated-{n}x"
        shutil.copytree(base / "data" / "validated", folder)
        # A copy at a time: a stage forked from a big bench process would inherit its
        # peak RSS (Linux keeps ru_maxrss across exec), and measure the bench, not itself.
        schema = pa.schema([("text", pa.string())])
        with pq.ParquetWriter(folder / "corpus.parquet", schema) as corpus:
            for copy in range(n):
                texts = [f"{t}（{copy}）" if copy else t for t in news]
                corpus.write_table(pa.table({"text": texts}, schema=schema))
        validated[n] = folder
    return base, validated


def _merge(tree: dict[str, Any], changes: dict[str, Any]) -> None:
    """`changes` into `tree`, key by key at every depth (a profile over the defaults)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def run_stage(
    side_code: Path, base: Path, validated: Path, work: Path, steps: int
) -> dict[str, Any]:
    """`lmops stage pretrain` with `side_code` importing, in a fresh copy of the workspace
    whose params are that code's own (each revision's config is strict)."""
    shutil.copytree(base, work, ignore=shutil.ignore_patterns("validated", "reports"))
    (work / "data" / "validated").symlink_to(validated)
    stage_params = {
        **STAGE_PARAMS,
        "pretrain.steps": steps,
        "pretrain.checkpoint_every": steps + 1,
    }
    raw = yaml.safe_load((side_code / "profiles" / "default.yaml").read_text("utf-8"))
    _merge(raw, yaml.safe_load((side_code / "profiles" / "tiny.yaml").read_text("utf-8")))
    for dotted, value in stage_params.items():
        *parents, leaf = dotted.split(".")
        _merge(
            raw, functools.reduce(lambda tree, key: {key: tree}, reversed(parents), {leaf: value})
        )
    (work / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), "utf-8")
    path, _ = importable(side_code, work / ".code")
    env = {**os.environ, "PYTHONPATH": str(path)}
    subprocess.run(
        [sys.executable, "-m", "lmops", "stage", "pretrain"],
        cwd=work,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cost = StageCost.read(work / "reports" / "cost" / "pretrain.json")
    metrics = StageRun.read(work / "reports" / "pretrain.json")
    result = {
        "peak_memory_mb": cost.peak_memory_mb,
        "wall_seconds": cost.wall_seconds,
        "training_seconds": metrics.seconds,
        "seconds_per_step": round(metrics.seconds / metrics.steps, 4),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="The 'before' git revision.")
    parser.add_argument("--copies", default="1,10,30", help="Corpus sizes, in copies.")
    parser.add_argument("--after-only", default="", help="Sizes run on the working tree only.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench/scale.json")
    args = parser.parse_args()
    both = [int(n) for n in args.copies.split(",") if n]
    after_only = [int(n) for n in args.after_only.split(",") if n]

    runs: dict[str, dict[str, Any]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        with revision_worktree(args.rev, scratch / "before-code") as before_code:
            base, validated = prepare(scratch, sorted({*both, *after_only}), args.steps)
            for n in sorted({*both, *after_only}):
                sides = (
                    {"after": ROOT} if n in after_only else {"before": before_code, "after": ROOT}
                )
                for side, code in sides.items():
                    runs[side][f"{n}x"] = run_stage(
                        code, base, validated[n], scratch / "work", args.steps
                    )
                    print(f"{n}x {side}: {runs[side][f'{n}x']}", flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for size, after in runs["after"].items():
        row = {f"after_{k}": v for k, v in after.items()}
        if (before := runs["before"].get(size)) is not None:
            row |= {f"before_{k}": v for k, v in before.items()}
            row["after_vs_before_peak_memory"] = round(
                after["peak_memory_mb"] / before["peak_memory_mb"], 3
            )
        summary[size] = row
    facts = {
        "before_rev": subprocess.run(
            ["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "after": "working tree",
        "corpus": "builtin:zh-news repeated, each copy tagged",
        "params": {"profile": "tiny", "pretrain.steps": args.steps, **STAGE_PARAMS},
    }
    write_result(args.out, facts, summary, runs)


if __name__ == "__main__":
    main()
