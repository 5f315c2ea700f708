"""Sweeps: a grid over params and seeds, each point one training run saved as a DVC
experiment with the sweep's name, the point's config and its seed (lmops/experiments.py).

`--set finetune.learning_rate=1e-4,5e-4 --set model.layers=2,4 --seeds 0,1,2` is twelve
points. They run one after another in the workspace, so DVC's run cache shares every stage
whose inputs a point leaves unchanged (the tokenizer is trained once per tokenizer
setting). A point whose experiment exists is done: a killed sweep, started again, runs only
the rest. Points are never registered; `lmops promote --experiment NAME` takes one through
the gates.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmops.artifacts import RunRecord
from lmops.config import PARAMS_FILE, load_yaml, parse_set
from lmops.errors import ConfigError, LmopsError
from lmops.experiments import config_key, run_dvc

SWEEPS_DIR = Path("reports/sweeps")


class Point(BaseModel):
    config: dict[str, Any]  # dotted key -> value: the named config's and the grid's
    seed: int | None = None
    label: str | None = None  # the named config's name (with its grid values, if any)

    def sets(self, seed_key: str) -> list[str]:
        """The point as --set expressions (values as JSON, which YAML reads back as is)."""
        seed = {} if self.seed is None else {seed_key: self.seed}
        return [f"{key}={json.dumps(value)}" for key, value in {**self.config, **seed}.items()]

    def same(self, run: RunRecord) -> bool:
        return run.config == self.config and run.seed == self.seed


class Definition(BaseModel):
    """A sweep: named configs (sets of overrides, as recipes are) crossed with grid axes
    and seeds, over a profile. `lmops sweep --file` reads one from YAML; --set adds axes."""

    model_config = ConfigDict(extra="forbid")

    profile: str | None = None
    configs: dict[str, dict[str, Any]] = {}
    grid: dict[str, list[Any]] = {}
    seeds: list[int] | None = None
    seed_key: str = "data.split.seed"

    @classmethod
    def read(cls, path: Path) -> Definition:
        try:
            raw = load_yaml(path.read_text(encoding="utf-8")) or {}
            return cls.model_validate(raw)
        except OSError as err:
            raise ConfigError(f"sweep file {path}: {err.strerror or err}") from None
        except (yaml.YAMLError, ValidationError) as err:
            raise ConfigError(f"sweep file {path}: {str(err).splitlines()[0]}") from None

    def name(self) -> str:
        """The same definition always has the same name, so running it again resumes it."""
        text = json.dumps(self.model_dump(), sort_keys=True, default=str)
        return "sweep-" + hashlib.sha256(text.encode()).hexdigest()[:8]

    def points(self) -> list[Point]:
        """Every named config times every grid point times every seed (innermost)."""
        axes = self.grid
        cells = [
            dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())
        ]
        named = self.configs or {"": {}}
        points = []
        for name, overrides in named.items():
            for cell in cells:
                label = ", ".join(filter(None, [name, config_key(cell) if cell and name else ""]))
                points += [
                    Point(config={**overrides, **cell}, seed=seed, label=label or None)
                    for seed in self.seeds or [None]
                ]
        return points


def split_values(text: str) -> list[str]:
    """`1e-4,5e-4` -> ["1e-4", "5e-4"]; commas inside brackets or quotes stay, so
    `[corpus],[corpus,train]` is two lists."""
    parts, current, depth, quote = [], "", 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    if quote or depth:
        raise ConfigError(f"--set {text!r}: an unclosed quote or bracket")
    return [*parts, current]


def grid(sets: list[str]) -> dict[str, list[Any]]:
    """`--set key=v1,v2` expressions -> {key: [v1, v2]}, each value read as --set reads it."""
    axes: dict[str, list[Any]] = {}
    for expr in sets:
        key, sep, text = expr.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {expr!r}: expected key=value[,value...]")
        axes[key.strip()] = [parse_set(f"{key}={part}")[1] for part in split_values(text)]
    return axes


def pending(points: list[Point], name: str, runs: list[RunRecord]) -> list[Point]:
    """The points of sweep `name` without a completed experiment."""
    done = [run for run in runs if run.sweep == name and run.status == "completed"]
    return [point for point in points if not any(point.same(run) for run in done)]


def keep_params(root: Path, name: str) -> Path:
    """params.yaml as it was when the sweep first started (kept across a kill), to be put
    back when the sweep ends: the points' values are in their experiments, not left behind."""
    kept = root / SWEEPS_DIR / name / PARAMS_FILE
    if not kept.is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / PARAMS_FILE, kept)
    return kept


def restore_params(root: Path, kept: Path) -> None:
    scratch = root / f".{PARAMS_FILE}.sweep"
    shutil.copyfile(kept, scratch)
    scratch.replace(root / PARAMS_FILE)
    shutil.rmtree(kept.parent, ignore_errors=True)


@contextlib.contextmanager
def worktree(root: Path, params: Path) -> Iterator[Path]:
    """A checkout of HEAD beside the workspace, for one lane of a parallel sweep: params.yaml
    as the sweep found it, and the workspace's DVC cache (so its run cache too), so a lane
    recomputes nothing another lane or an earlier run computed. Its experiments are saved in
    the one git repository both share; the checkout is removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="lmops-sweep-"))
    path = scratch / root.name
    _git(root, "worktree", "add", "--detach", str(path), "HEAD")
    try:
        shutil.copyfile(params, path / PARAMS_FILE)
        cache = _dvc(root, "cache", "dir").strip()
        _dvc(path, "cache", "dir", "--local", str((root / cache).resolve()))
        yield path
    finally:
        _git(root, "worktree", "remove", "--force", str(path))
        shutil.rmtree(scratch, ignore_errors=True)


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LmopsError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _dvc(cwd: Path, *args: str) -> str:
    done = run_dvc(cwd, *args)
    if done.returncode != 0:
        raise LmopsError(f"dvc {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout
