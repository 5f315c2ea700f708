"""The sweep flow: one training subflow run per grid point (lmops/sweep.py), one after
another in the workspace, each saved as a DVC experiment; the Prefect UI shows the sweep
with its points beneath it."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from lmops import experiments
from lmops.flows.training import training
from lmops.sweep import Definition, Point, keep_params, pending, restore_params, worktree


@flow(name="sweep")
def sweep(
    definition: dict[str, Any], name: str, project_dir: str = ".", workers: int = 1
) -> dict[str, Any]:
    """Run every point of the sweep `definition` (lmops/sweep.py Definition) that has no
    completed experiment yet. A failed point is recorded (reports/runs.jsonl) and the sweep
    goes on; params.yaml is put back as it was before the sweep once every point has had
    its turn. With `workers` > 1 the points are dealt to that many lanes, each a training
    subflow after another in its own git worktree, the lanes in parallel."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    spec = Definition.model_validate(definition)
    points = spec.points()
    todo = pending(points, name, experiments.saved_runs(root))
    logger.info(
        "sweep %s: %d points, %d done before, %d to run, %d at a time",
        name,
        len(points),
        len(points) - len(todo),
        len(todo),
        min(workers, len(todo)) or 1,
    )
    kept = keep_params(root, name)
    lanes = [todo[lane::workers] for lane in range(workers) if todo[lane::workers]]
    if len(lanes) <= 1:
        outcomes = _lane(spec, name, todo, root, logger)
    else:
        with contextlib.ExitStack() as stack:
            paths = [stack.enter_context(worktree(root, kept)) for _ in lanes]
            with ThreadPoolExecutor(len(lanes)) as pool:
                done = pool.map(
                    lambda lane, path: _lane(spec, name, lane, path, logger), lanes, paths
                )
                outcomes = [outcome for lane in done for outcome in lane]
            for path in paths:  # the lanes' run logs (failed points too) into the workspace's
                _append_runs(path / experiments.RUN_LOG, root / experiments.RUN_LOG)
    restore_params(root, kept)
    return {
        "sweep": name,
        "points": len(points),
        "done_before": len(points) - len(todo),
        "ran": [label for label, failed in outcomes if not failed],
        "failed": [label for label, failed in outcomes if failed],
    }


def _lane(
    spec: Definition, name: str, points: list[Point], root: Path, logger: Any
) -> list[tuple[str, bool]]:
    """Points one after another in the workspace `root`: (label, failed) of each. (A lane's
    thread has no flow run context of its own: the sweep's logger is passed in.)"""
    outcomes = []
    for number, point in enumerate(points, start=1):
        sets = point.sets(spec.seed_key)
        logger.info("sweep %s: point %d/%d in %s: %s", name, number, len(points), root, sets)
        state = training(
            profile=spec.profile,
            overrides=sets,
            project_dir=str(root),
            sweep_point={"sweep": name, **point.model_dump()},
            return_state=True,
        )
        outcomes.append((point.label or " ".join(sets), state.is_failed()))
    return outcomes


def _append_runs(source: Path, target: Path) -> None:
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a", encoding="utf-8") as log:
            log.write(source.read_text(encoding="utf-8"))
