"""The sweep flow: one training subflow run per grid point (lmops/sweep.py), one after
another in the workspace, each saved as a DVC experiment; the Prefect UI shows the sweep
with its points beneath it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from lmops import experiments
from lmops.flows.training import training
from lmops.sweep import Definition, keep_params, pending, restore_params


@flow(name="sweep")
def sweep(definition: dict[str, Any], name: str, project_dir: str = ".") -> dict[str, Any]:
    """Run every point of the sweep `definition` (lmops/sweep.py Definition) that has no
    completed experiment yet. A failed point is recorded (reports/runs.jsonl) and the sweep
    goes on; params.yaml is put back as it was before the sweep once every point has had
    its turn."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    spec = Definition.model_validate(definition)
    points = spec.points()
    todo = pending(points, name, experiments.saved_runs(root))
    logger.info(
        "sweep %s: %d points, %d done before, %d to run",
        name,
        len(points),
        len(points) - len(todo),
        len(todo),
    )
    kept = keep_params(root, name)
    ran, failed = [], []
    for number, point in enumerate(todo, start=1):
        sets = point.sets(spec.seed_key)
        logger.info("sweep %s: point %d/%d %s", name, number, len(todo), sets)
        state = training(
            profile=spec.profile,
            overrides=sets,
            project_dir=str(root),
            sweep_point={"sweep": name, **point.model_dump()},
            return_state=True,
        )
        (failed if state.is_failed() else ran).append(point.label or " ".join(sets))
    restore_params(root, kept)
    return {
        "sweep": name,
        "points": len(points),
        "done_before": len(points) - len(todo),
        "ran": ran,
        "failed": failed,
    }
