"""The HTTP path before and after a change, side by side in one run: `lmops serve` from
the working tree and from a git revision (a temporary worktree), on the same exported
model and inputs, alternating rounds so drift in the machine's speed hits both alike.

    .venv/bin/python -m bench.server_overhead --rev 5598bf7 [--model-dir models/onnx] [--restricted]

Without --model-dir it exports a tiny-profile model first (about a minute): a small model
makes the server's own costs (parsing, batching, the traffic log) a large share of each
request, which is what a change to the server can slow down. Writes
reports/bench/server-overhead.json: texts/s, p50 and p99 per concurrency, per side, and
the after/before ratios of their medians over rounds.

With --restricted a third side runs in the same rounds: the working tree with the
inference group behind a key (serve.auth.restricted), every request carrying it, so that
the key check's cost shows beside the open server's (`restricted_vs_after`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bench.serving import load, side_by_side, wait_ready, write_result
from lmops.stages import PIPELINE

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 32)
BENCH_KEY = "bench-key-0123456789abcdef"


@contextlib.contextmanager
def revision_worktree(rev: str, where: Path) -> Iterator[Path]:
    """`rev` checked out in a temporary git worktree at `where`, removed afterwards: the
    "before" side of a bench that runs two revisions in one process."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True
        )


def tiny_export(scratch: Path) -> tuple[Path, list[str]]:
    """A tiny-profile model through the real stages, and its test texts."""
    from lmops.config import apply_overrides, resolve_overrides

    work = scratch / "model"
    work.mkdir()
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    shutil.copytree(ROOT / "profiles", work / "profiles")
    apply_overrides(work, resolve_overrides(work, "tiny", []))
    for stage in (s for s in PIPELINE if s != "evaluate"):  # what an export needs
        subprocess.run(
            [sys.executable, "-m", "lmops", "stage", stage],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    texts = pd.read_parquet(work / "data" / "validated" / "test.parquet")["text"].tolist()
    return work / "models" / "onnx", texts


def workspace(
    scratch: Path, name: str, code: Path, model_dir: Path, restricted: bool = False
) -> Path:
    """A serving folder with `code`'s own params.yaml (each revision's config is strict);
    `restricted`: the inference group behind BENCH_KEY."""
    root = scratch / name
    shutil.copytree(model_dir, root / "models" / "onnx")
    raw = yaml.safe_load((code / "params.yaml").read_text("utf-8"))
    raw["serve"].update(
        {"traffic": {**raw["serve"]["traffic"], "dir": "traffic"}, "max_queue": 1024}
    )
    if "drain_seconds" in raw["serve"]:
        raw["serve"]["drain_seconds"] = 0
    if restricted:
        raw["serve"]["auth"]["restricted"] = ["inference"]
    (root / "params.yaml").write_text(yaml.safe_dump(raw), "utf-8")
    return root


def importable(code: Path, shim: Path) -> tuple[Path, str]:
    """A folder to put on PYTHONPATH so that `code` is what imports, and the name of its
    server module. Since tasks/, flows/ and serving/ install as lmops.tasks, lmops.flows and
    lmops.serving (pyproject's package-dir), a checkout of that layout needs an lmops/
    folder that holds them."""
    if "lmops.serving" not in (code / "pyproject.toml").read_text("utf-8"):
        return code, "serving.app"  # the older layout: top-level packages
    package = shim / "lmops"
    if not package.is_dir():  # built once, for every round
        package.mkdir(parents=True)
        for entry in (code / "lmops").iterdir():
            (package / entry.name).symlink_to(entry)
        for sub in ("tasks", "flows", "serving"):
            (package / sub).symlink_to(code / sub)
    return shim, "lmops.serving.app"


def serve_and_load(
    root: Path, code: Path, texts: list[str], seconds: float, port: int, key: str | None = None
) -> dict[str, Any]:
    path, module = importable(code, root / ".code")
    env = {**os.environ, "PYTHONPATH": str(path)}
    if key is not None:
        env["LMOPS_API_KEYS"] = f"bench={key}"
    imported = subprocess.run(
        [sys.executable, "-c", f"import {module} as app; print(app.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(imported).resolve().is_relative_to(code.resolve()), f"{imported} not in {code}"
    server = subprocess.Popen(
        [sys.executable, "-m", "lmops", "serve", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        headers = None if key is None else {"Authorization": f"Bearer {key}"}
        return {
            f"clients_{n}": asyncio.run(load(url, texts, n, seconds, headers)) for n in CONCURRENCY
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="The 'before' git revision.")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--restricted",
        action="store_true",
        help="Also the working tree with the inference group behind a key.",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench/server-overhead.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        with revision_worktree(args.rev, scratch / "before-code") as before_code:
            if args.model_dir is None:
                model_dir, texts = tiny_export(scratch)
            else:
                model_dir = args.model_dir
                texts = pd.read_parquet(ROOT / "data/validated/test.parquet")["text"].tolist()
            sides = {"before": before_code, "after": ROOT}
            if args.restricted:
                sides["restricted"] = ROOT
            roots = {
                side: workspace(scratch, side, code, model_dir, side == "restricted")
                for side, code in sides.items()
            }
            rounds: dict[str, list[dict]] = {side: [] for side in sides}
            for number in range(args.rounds):
                for offset, side in enumerate(sides):
                    port = 19_000 + os.getpid() % 500 + 3 * number + offset
                    key = BENCH_KEY if side == "restricted" else None
                    rounds[side].append(
                        serve_and_load(roots[side], sides[side], texts, args.seconds, port, key)
                    )

    summary = side_by_side(
        {s: rounds[s] for s in ("before", "after")}, "before", "after", CONCURRENCY
    )
    if args.restricted:
        summary = {
            "open_vs_before": summary,
            "restricted_vs_open": side_by_side(
                {s: rounds[s] for s in ("after", "restricted")}, "after", "restricted", CONCURRENCY
            ),
        }
    facts = {
        "before_rev": subprocess.run(
            ["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "after": "working tree",
        "model": "tiny profile" if args.model_dir is None else str(args.model_dir),
        "seconds_per_load": args.seconds,
        "rounds": args.rounds,
        "restricted": "inference behind a key, every request carrying it"
        if args.restricted
        else None,
    }
    write_result(args.out, facts, summary, rounds)


if __name__ == "__main__":
    main()
