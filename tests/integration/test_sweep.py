"""`lmops sweep` on the tiny profile in a temporary git repo, against a real Prefect server
and the `dvc` CLI: a 2 x 2 grid over 2 seeds is 8 DVC experiments; a sweep killed midway
and started again runs only the points left; `lmops exp show` pools the seeds as the
experiments hold them; `lmops promote --experiment` takes a point through the gates."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_git_project, tool_env

pytestmark = pytest.mark.e2e

# The seeds go to fine-tuning and the grid to promotion params, which no stage reads: the
# first two points train (one a seed), the six others recompute nothing (DVC's run cache).
GRID = [
    "--set",
    "promotion.accuracy_vs_prod.rule=non_inferiority,superiority",
    "--set",
    "promotion.max_latency_increase=0.25,0.5",
    "--seeds",
    "0,1",
    "--seed-key",
    "finetune.seed",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_git_project(tmp_path_factory.mktemp("sweep"))


def _lmops(root: Path, server: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmops", *args],
        cwd=root,
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=1200,
    )


def _experiments(root: Path) -> dict[str, dict[str, Any]]:
    """Every DVC experiment's run record, as `dvc exp show` lists it."""
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--all-commits", "--json"],
        cwd=root,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        rev["name"]: rev["data"]["metrics"]["reports/run.json"]["data"]
        for baseline in json.loads(shown.stdout)
        for experiment in baseline.get("experiments") or []
        for rev in experiment["revs"]
    }


def _completed_runs(root: Path) -> int:
    log = root / "reports" / "runs.jsonl"
    if not log.is_file():
        return 0
    return sum(json.loads(line)["status"] == "completed" for line in log.read_text().splitlines())


def test_a_killed_sweep_resumes_and_ends_with_eight_experiments(
    project: Path, prefect_server: dict[str, Any]
) -> None:
    params_before = (project / "params.yaml").read_text("utf-8")
    with (project.parent / "first.log").open("w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "lmops", "sweep", "--profile", "tiny", *GRID],
            cwd=project,
            env=prefect_server["env"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 900
        while _completed_runs(project) < 3 and first.poll() is None:
            assert time.monotonic() < deadline, "the sweep saved no 3 points in 15 minutes"
            time.sleep(1)
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and the stage it is running
        first.wait()
    before = _experiments(project)
    assert len(before) >= 3

    again = _lmops(project, prefect_server, "sweep", "--profile", "tiny", *GRID)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"8 points, {len(before)} done before, {8 - len(before)} ran, 0 failed" in again.stdout
    assert "Running stage" not in again.stdout  # every stage it needed was already computed
    after = _experiments(project)
    assert len(after) == 8 and set(before) <= set(after)  # nothing done was run again
    points = {(json.dumps(r["config"], sort_keys=True), r["seed"]) for r in after.values()}
    assert len(points) == 8 and {r["sweep"] for r in after.values()} == {
        next(iter(before.values()))["sweep"]
    }
    # The points were experiments, not versions; params.yaml is as the sweep found it.
    assert all(r.get("version") is None for r in after.values())
    assert (project / "params.yaml").read_text("utf-8") == params_before
    # Points of the same seed shared its fine-tuned model.
    seconds = {r["seed"]: set() for r in after.values()}
    for r in after.values():
        seconds[r["seed"]].add(r["metrics"]["seconds"]["finetune"])
    assert all(len(s) == 1 for s in seconds.values())

    # The report pools the seeds as the experiments hold them, and ranks on validation.
    shown = _lmops(project, prefect_server, "exp", "show", "--json", "--rank", "val.loss")
    assert shown.returncode == 0, shown.stderr
    table = json.loads(shown.stdout)
    assert len(table) == 4 and all(group["seeds"] == [0, 1] for group in table)
    for group in table:
        accuracies = [after[name]["metrics"]["test"]["accuracy"] for name in group["experiments"]]
        assert group["metrics"]["test.accuracy"]["mean"] == pytest.approx(
            statistics.fmean(accuracies)
        )
        assert group["metrics"]["test.accuracy"]["std"] == pytest.approx(
            statistics.stdev(accuracies)
        )
    refused = _lmops(project, prefect_server, "exp", "show", "--rank", "test.accuracy")
    assert refused.returncode == 1 and "rank on a validation metric" in refused.stderr
    # The page: the same table, and the chosen config's training curves, offline.
    page = (project / "reports" / "experiments" / "index.html").read_text("utf-8")
    assert "<table>" in page and 'src="data:image/png;base64,' in page
    assert "http://" not in page and "https://" not in page


def test_promote_an_experiment_through_the_gates(
    project: Path, prefect_server: dict[str, Any]
) -> None:
    runs = _experiments(project)

    def point(rule: str) -> str:
        return next(
            name
            for name, run in runs.items()
            if run["seed"] == 0 and run["config"]["promotion.accuracy_vs_prod.rule"] == rule
        )

    easy = point("non_inferiority")
    promoted = _lmops(project, prefect_server, "promote", "--experiment", easy)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert f"experiment {easy} registered as v" in promoted.stdout
    assert "promoted v" in promoted.stdout and "to prod" in promoted.stdout
    # The same model under its point's rule, superiority over prod: it cannot be better
    # than itself, so the gate refuses it, by name.
    strict = point("superiority")
    refused = _lmops(project, prefect_server, "promote", "--experiment", strict)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "not promoted" in refused.stderr and "accuracy_vs_prod" in refused.stderr
    models = json.loads(_lmops(project, prefect_server, "models", "--json").stdout)
    assert len(models) == 2 and sum("prod" in m["stages"] for m in models) == 1

    unknown = _lmops(project, prefect_server, "promote", "--experiment", "no-such-run")
    assert unknown.returncode == 1 and "no experiment 'no-such-run'" in unknown.stderr


def test_parallel_lanes_share_the_cache_and_save_into_the_workspace(
    project: Path, prefect_server: dict[str, Any]
) -> None:
    """--workers 2: each lane in its own git worktree; the seeds' fine-tuned models are in
    the shared DVC cache already, so no lane recomputes a stage."""
    params_before = (project / "params.yaml").read_text("utf-8")
    before = _experiments(project)
    grid = ["--set", "promotion.max_latency_increase=0.75,1.0", "--seeds", "0,1"]
    result = _lmops(
        project,
        prefect_server,
        *("sweep", "--profile", "tiny", *grid, "--seed-key", "finetune.seed", "--workers", "2"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 points, 0 done before, 4 ran, 0 failed" in result.stdout
    assert "Running stage" not in result.stdout
    new = {name: run for name, run in _experiments(project).items() if name not in before}
    assert sorted(
        (r["config"]["promotion.max_latency_increase"], r["seed"]) for r in new.values()
    ) == [
        (0.75, 0),
        (0.75, 1),
        (1.0, 0),
        (1.0, 1),
    ]
    assert all(r["metrics"]["val"]["accuracy"] > 0 for r in new.values())
    # The worktrees are gone, the workspace's params are as the sweep found them, and its
    # run log has the lanes' runs.
    worktrees = subprocess.run(
        ["git", "worktree", "list"], cwd=project, capture_output=True, text=True, check=True
    )
    assert len(worktrees.stdout.splitlines()) == 1
    assert (project / "params.yaml").read_text("utf-8") == params_before
    logged = (project / "reports" / "runs.jsonl").read_text("utf-8")
    assert all(name in logged for name in new)
