"""The whole pipeline (tiny profile) in a temporary git repo: `dvc repro` and the Prefect
flow (against a real Prefect server) are interchangeable, and a failing validation keeps
the last good data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmops.tasks.stages import STAGES
from tests.conftest import latest_artifact, tiny_git_project, tool_env, tree_digest

pytestmark = pytest.mark.e2e

UP_TO_DATE = "Data and pipelines are up to date."


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _lmops_run(root: Path, server: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmops", "run", *args],
        cwd=root,
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_git_project(tmp_path_factory.mktemp("project"))
    return root


def _assert_all_skipped(output: str) -> None:
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output


def test_dvc_repro_runs_every_stage_then_skips_them(project: Path) -> None:
    first = _dvc(project, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    for name in ("train", "val", "test", "corpus"):
        assert (project / "data" / "validated" / f"{name}.parquet").is_file()
    assert (project / "reports" / "validation" / "index.html").is_file()
    assert (project / "models" / "finetuned" / "model.safetensors").is_file()
    assert (project / "reports" / "model_card.md").is_file()
    metrics = json.loads(_dvc(project, "metrics", "show", "--json").stdout)
    workspace = metrics[""]["data"]  # DVC keys the workspace's metrics by ""
    assert "accuracy" in workspace["reports/metrics.json"]["data"]["baseline"]
    # Every stage's cost is a DVC metric, and the training stages' total is in metrics.json.
    for stage in STAGES:
        cost = workspace[f"reports/cost/{stage}.json"]["data"]
        assert cost["stage"] == stage and cost["cpu_seconds"] > 0 and cost["energy_kwh"] > 0
    training = workspace["reports/metrics.json"]["data"]["cost"]
    assert list(training["stages"]) == [
        "base",
        "ingest",
        "validate",
        "labels",
        "tokenizer",
        "pretrain",
        "finetune",
        "distill",
    ]
    assert training["total"]["tokens"] == sum(
        workspace[f"reports/cost/{s}.json"]["data"].get("tokens", 0) for s in training["stages"]
    )
    assert training["stages"]["pretrain"]["flops"] > 0
    card = (project / "reports" / "model_card.md").read_text("utf-8")
    assert "## Cost" in card
    # What the personal-data check found and did (validation.pii), on the card and so on
    # the model page.
    assert "- Personal data (validation.pii: redact): " in card
    # The labels stage's verdict: a DVC metric, on the card, and its page beside Data Docs.
    found = workspace["reports/labels.json"]["data"]
    assert found["policy"] == "report" and found["dropped_train_rows"] == 0
    assert "- label issues: " in card and "unflagged test rows" in card
    assert (project / "reports" / "labels" / "index.html").is_file()
    plots = json.loads(_dvc(project, "plots", "show", "--json").stdout)["data"]
    assert {
        "reports/plots/confusion.json",
        "reports/plots/roc.json",
        "Pretraining loss",
        "Fine-tuning loss",
    } <= set(plots)
    assert UP_TO_DATE in _dvc(project, "status").stdout
    _assert_all_skipped(_dvc(project, "repro").stdout)


def test_flow_after_repro_does_no_work_and_publishes_the_manifest(
    project: Path, prefect_server: dict[str, Any]
) -> None:
    result = _lmops_run(project, prefect_server, "--profile", "tiny")
    assert result.returncode == 0, result.stderr
    for stage in STAGES:
        assert f"{stage:<10} up to date, skipped" in result.stdout
    assert "TF-IDF + LR baseline" in result.stdout
    assert "train 1,200 / val 150 / test 150" in result.stdout
    assert UP_TO_DATE in _dvc(project, "status").stdout

    artifact = latest_artifact(prefect_server["api_url"], "data-manifest")
    assert "| train | 1,200 |" in artifact["data"]
    assert "Personal data (validation.pii: redact)" in artifact["data"]
    # An http link to `lmops serve` (a browser blocks file:// links from Prefect's UI).
    assert "http://127.0.0.1:8000/reports/validation/index.html" in artifact["data"]
    assert "skipped (up to date)" in artifact["data"]
    assert "labels     train " in result.stdout and "none dropped" in result.stdout
    # The run is a DVC experiment, named in the summary, with how it went.
    (name,) = _experiments(project)
    assert f"experiment {name} (dvc exp show)" in result.stdout
    run = _experiments(project)[name]["run"]
    assert run["status"] == "completed" and run["profile"] == "tiny" and run["version"]
    assert run["flow_run_id"] and run["wall_seconds"] > 0 and "failed_stage" not in run
    # What runs are compared on (lmops exp show): validation, test, and every stage's time.
    assert 0 < run["metrics"]["val"]["accuracy"] <= 1 and "margin" in run["metrics"]["test"]
    assert set(run["metrics"]["seconds"]) == set(STAGES)
    labels = latest_artifact(prefect_server["api_url"], "label-issues")
    assert "| split | given label | suggested |" in labels["data"]
    assert "http://127.0.0.1:8000/reports/labels/" in labels["data"]
    evaluation = latest_artifact(prefect_server["api_url"], "evaluation")
    assert "| accuracy |" in evaluation["data"] and "Gates:" in evaluation["data"]


def _experiments(project: Path) -> dict[str, dict[str, Any]]:
    """Every DVC experiment in the project (all baselines): its run record and params."""
    shown = json.loads(_dvc(project, "exp", "show", "--all-commits", "--json").stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "run": data["metrics"]["reports/run.json"]["data"],
                    "params": data["params"]["params.yaml"]["data"],
                }
    return found


def test_repro_after_flow_does_no_work(project: Path, prefect_server: dict[str, Any]) -> None:
    result = _lmops_run(project, prefect_server, "--set", "data.split.seed=1")
    assert result.returncode == 0, result.stderr
    # A new split: every stage after the base runs again; the base does not read the data.
    assert f"{'base':<10} up to date, skipped" in result.stdout
    for stage in list(STAGES)[1:]:
        assert f"{stage:<10} ran" in result.stdout
    assert UP_TO_DATE in _dvc(project, "status").stdout
    _assert_all_skipped(_dvc(project, "repro").stdout)
    # Two runs, two experiments, each with its own params: `dvc exp diff` compares them.
    runs = _experiments(project)
    assert sorted(r["params"]["data"]["split"]["seed"] for r in runs.values()) == [0, 1]
    first, second = sorted(runs)
    diff = json.loads(_dvc(project, "exp", "diff", first, second, "--json").stdout)
    assert diff["params"]["params.yaml"]["data.split.seed"] == {"old": 0, "new": 1, "diff": 1}


def test_failing_validation_quarantines_and_keeps_validated_data(
    project: Path, prefect_server: dict[str, Any]
) -> None:
    validated_before = tree_digest(project / "data" / "validated")
    result = _lmops_run(project, prefect_server, "--set", "validation.min_class_share=0.6")
    assert result.returncode == 1
    assert "error: stage validate failed" in result.stderr
    assert "expect_table_row_count_to_be_between" in result.stderr
    assert "Traceback" not in result.stderr
    assert tree_digest(project / "data" / "validated") == validated_before
    assert len(list((project / "data" / "quarantine").iterdir())) == 1
    # A failed run is recorded too, with the stage and the error: in reports/runs.jsonl
    # beside the completed ones (DVC cannot save a workspace whose stage outputs are gone).
    log = (project / "reports" / "runs.jsonl").read_text("utf-8")
    runs = [json.loads(line) for line in log.splitlines()]
    assert [r["status"] for r in runs] == ["completed", "completed", "failed"]
    assert [r.get("experiment") for r in runs[:2]] == sorted(_experiments(project))
    assert runs[2]["failed_stage"] == "validate" and "experiment" not in runs[2]
    assert "expect_table_row_count_to_be_between" in runs[2]["error"]
    assert runs[2]["overrides"] == ["validation.min_class_share=0.6"]

    repro = _dvc(project, "repro", check=False)
    assert repro.returncode != 0
    assert tree_digest(project / "data" / "validated") == validated_before
    assert len(list((project / "data" / "quarantine").iterdir())) == 2


def test_bad_override_fails_in_one_line_before_prefect_starts(
    project: Path, prefect_server: dict[str, Any]
) -> None:
    before = (project / "params.yaml").read_bytes()
    result = _lmops_run(project, prefect_server, "--set", "pretrain.steps=0")
    assert result.returncode == 1
    assert result.stderr.startswith("error: invalid params: pretrain.steps:")
    assert "Traceback" not in result.stderr and "Flow run" not in result.stderr
    assert (project / "params.yaml").read_bytes() == before
