"""The deployments as a user runs them: a real Prefect server, the `process` work pool,
`prefect deploy --all` from deployments/prefect.yaml, a real worker, flow runs triggered
through the API or by the drift automation, a real `lmops serve`; everything is read
back through the Prefect API. The tests build on each other, in order."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmops.tasks.stages import STAGES
from tests.conftest import (
    BIN_DIR,
    latest_artifact,
    serve_stage,
    stop_server,
    tiny_git_project,
    tool_env,
)

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Api:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        """As Prefect's own client does, a 503 (the server's database busy under load; seen
        once on 2 loaded cores) is retried after a pause; anything else fails at once."""
        for attempt in range(6):
            response = self.client.request(method, path, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(float(response.headers.get("retry-after", 2 ** min(attempt, 3))))
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict | None = None) -> Any:
        return self._send("POST", path, json=body or {})

    def get(self, path: str) -> Any:
        return self._send("GET", path)

    def deployment(self, flow: str, name: str) -> dict[str, Any]:
        return self.get(f"/deployments/name/{flow}/{name}")

    def wait(self, flow_run_id: str, timeout_s: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state_type"] in FINAL:
                return run
            time.sleep(1)
        pytest.fail(f"flow run {flow_run_id} did not finish in {timeout_s} s")

    def artifacts(self, flow_run_id: str) -> dict[str, str]:
        found = self.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
        return {a["key"]: a["data"] for a in found}

    def task_states(self, flow_run_id: str) -> dict[str, str]:
        found = self.post(
            "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}
        )
        return {t["name"]: t["state_name"] for t in found}


@pytest.fixture(scope="module")
def deployed(prefect_server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The project in a fresh git repo, deployed as the README says, with a worker running."""
    root = tiny_git_project(tmp_path_factory.mktemp("deployed-project"))
    env = {**prefect_server["env"], "PWD": str(root)}
    prefect = str(BIN_DIR / "prefect")
    for command in (
        [prefect, "work-pool", "create", "lmops", "--type", "process"],
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
    ):
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    log = (root / "worker.log").open("w")
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "lmops", "--type", "process"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield {
        "root": root,
        "api": Api(prefect_server["api_url"]),
        "api_url": prefect_server["api_url"],
        "worker_log": root / "worker.log",
    }
    worker.send_signal(signal.SIGINT)  # a worker stops on SIGINT, not SIGTERM
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
    log.close()


def test_deploy_creates_the_three_deployments_schedules_and_automation(deployed: dict) -> None:
    api: Api = deployed["api"]
    training = api.deployment("training", "training")
    monitoring = api.deployment("monitoring", "monitoring")
    promotion = api.deployment("promotion", "promotion")
    assert training["work_pool_name"] == monitoring["work_pool_name"] == "lmops"
    assert [s["schedule"]["cron"] for s in training["schedules"]] == ["0 3 * * 1"]
    assert [s["schedule"]["cron"] for s in monitoring["schedules"]] == ["0 * * * *"]
    assert promotion["schedules"] == []
    pull = training["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == str(deployed["root"])
    (automation,) = api.post("/automations/filter")
    assert automation["name"] == "retrain-on-drift"
    assert set(automation["trigger"]["expect"]) == {
        "lmops.drift.detected",
        "lmops.performance.degraded",
    }
    assert automation["actions"][0]["deployment_id"] == training["id"]


def test_training_deployment_runs_on_the_worker_and_publishes_artifacts(deployed: dict) -> None:
    api: Api = deployed["api"]
    training = api.deployment("training", "training")
    run = api.post(
        f"/deployments/{training['id']}/create_flow_run", {"parameters": {"profile": "tiny"}}
    )
    finished = api.wait(run["id"])
    assert finished["state_type"] == "COMPLETED", deployed["worker_log"].read_text()

    artifacts = api.artifacts(run["id"])
    assert {"data-manifest", "evaluation", "registry"} <= set(artifacts)
    assert "| train | 1,200 |" in artifacts["data-manifest"]
    assert "| export | ran | models/onnx (" in artifacts["data-manifest"]  # lock hash shown
    assert "TF-IDF + LR baseline" in artifacts["evaluation"]
    assert "Gates: **passed**" in artifacts["evaluation"]
    assert "confusion.json" in artifacts["evaluation"]
    assert "**v0.0.1** (newly registered)" in artifacts["registry"]
    assert "| prod | v0.0.1 |" in artifacts["registry"]
    promotion = latest_artifact(deployed["api_url"], "promotion")
    assert "PROMOTED to prod" in promotion["data"]
    assert "| min_accuracy | pass |" in promotion["data"]
    states = api.task_states(run["id"])
    assert all(states[f"stage-{stage}"] == "Completed" for stage in STAGES)


def test_second_run_shows_every_stage_skipped(deployed: dict) -> None:
    api: Api = deployed["api"]
    training = api.deployment("training", "training")
    run = api.post(f"/deployments/{training['id']}/create_flow_run", {"parameters": {}})
    assert api.wait(run["id"])["state_type"] == "COMPLETED"
    states = api.task_states(run["id"])
    assert {states[f"stage-{stage}"] for stage in STAGES} == {"Skipped"}
    assert "already registered" in api.artifacts(run["id"])["registry"]


def test_drift_closes_the_loop_through_the_automation(deployed: dict, tmp_path: Path) -> None:
    """Served shifted traffic → the monitoring deployment → `lmops.drift.detected` → the
    automation starts the training deployment → that run completes."""
    api: Api = deployed["api"]
    root: Path = deployed["root"]
    training = api.deployment("training", "training")
    monitoring = api.deployment("monitoring", "monitoring")
    started = datetime.now(UTC)

    url, server = serve_stage(root, tmp_path / "serve.log")
    try:
        sent = subprocess.run(
            [sys.executable, "-m", "lmops", "simulate-traffic", "--scenario", "shifted"]
            + ["--n", "300", "--url", url],
            cwd=root,
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sent.returncode == 0, sent.stderr
        assert "sent 300 texts" in sent.stdout and "300 answered" in sent.stdout
    finally:
        stop_server(server)

    run = api.post(f"/deployments/{monitoring['id']}/create_flow_run", {"parameters": {}})
    finished = api.wait(run["id"])
    assert finished["state_type"] == "COMPLETED", deployed["worker_log"].read_text()
    report = api.artifacts(run["id"])["drift-report"]
    assert "Drift DETECTED" in report and "model v0.0.1" in report

    deadline, events = time.monotonic() + 60, []
    while not events and time.monotonic() < deadline:  # events are stored asynchronously
        events = api.post(
            "/events/filter",
            {
                "filter": {
                    "event": {"name": ["lmops.drift.detected"]},
                    "occurred": {"since": started.isoformat()},
                },
                "limit": 10,
            },
        )["events"]
        time.sleep(0.5)
    assert len(events) == 1
    assert events[0]["payload"]["drift_detected"] is True
    assert events[0]["resource"]["prefect.resource.id"] == "lmops.model.lmops"

    deadline, triggered = time.monotonic() + 120, []
    while not triggered and time.monotonic() < deadline:
        triggered = api.post(
            "/flow_runs/filter",
            {
                "flow_runs": {"expected_start_time": {"after_": started.isoformat()}},
                "deployments": {"id": {"any_": [training["id"]]}},
            },
        )
        time.sleep(1)
    assert len(triggered) == 1, "the automation did not start the training deployment"
    assert api.wait(triggered[0]["id"])["state_type"] == "COMPLETED"
