"""Faults in the pipeline's own machinery: a stage that outlives its timeout through a
grandchild process, and resume after the data changed under a checkpoint."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from lmops.flows.training import _run_streaming

pytestmark = pytest.mark.faults

# A "dvc" that runs the stage as a child which itself spawns a grandchild; both sleep on
# with the output pipe open, as a hung training process under `dvc repro` would.
SPAWNS_A_GRANDCHILD = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c",
    "import os, time; open('grandchild.pid', 'w').write(str(os.getpid())); time.sleep(120)"])
print('stage started', flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie is dead


def test_a_stage_timeout_kills_the_whole_process_tree(tmp_path: Path) -> None:
    started = time.monotonic()
    output, returncode = _run_streaming(
        [sys.executable, "-c", SPAWNS_A_GRANDCHILD], tmp_path, timeout_s=2
    )
    assert time.monotonic() - started < 30, "the flow waited for the stage's grandchild"
    assert returncode != 0 and "killed after" in output
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's grandchild survived the timeout"


def test_changed_data_never_resumes_a_stale_pretraining_checkpoint(
    repo_params_raw: dict, tiny_validated: Path, tmp_path: Path
) -> None:
    """Killed mid-run, then the training texts change past the first rows (same row
    count): the rerun must start over, not resume the checkpoint of other data."""
    import json
    import shutil
    import signal
    import subprocess

    import pandas as pd
    import yaml

    from lmops.tasks import tokenizer
    from tests.conftest import params_with, tiny_raw, tool_env, without_base

    raw = tiny_raw(repo_params_raw)
    raw["pretrain"].update({"steps": 400, "checkpoint_every": 10})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), "utf-8")
    validated = tmp_path / "data" / "validated"
    shutil.copytree(tiny_validated, validated)
    params = params_with(raw)
    tokenizer_dir = tmp_path / "models" / "tokenizer"
    tokenizer.run(params.tokenizer, params.model, validated, tokenizer_dir, tmp_path / "t.json")
    without_base(tmp_path)
    checkpoints = tmp_path / "models" / "checkpoints" / "pretrain"
    command = [sys.executable, "-m", "lmops", "stage", "pretrain"]

    killed = subprocess.Popen(
        command, cwd=tmp_path, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert list(checkpoints.glob("step-*")), "no checkpoint was written before the kill"

    train = pd.read_parquet(validated / "train.parquet")
    train.loc[train.index[-1], "text"] = train["text"].iloc[-1][::-1]  # same length, new data
    train.to_parquet(validated / "train.parquet")
    rerun = subprocess.run(
        command, cwd=tmp_path, env=tool_env(), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from the checkpoint" not in rerun.stderr
    metrics = json.loads((tmp_path / "reports" / "pretrain.json").read_text("utf-8"))
    assert metrics["resumed_from_step"] == 0


RETRIED_FLOW = """
import json
from prefect import flow, task
from lmops.flows.retry import task_options
from lmops.config import OrchestrationConfig
from lmops.errors import DataError

calls = {"disk briefly full": 0, "bad data": 0}


@task
def fails(kind):
    calls[kind] += 1
    raise OSError(kind) if kind == "disk briefly full" else DataError(kind)


@flow
def run():
    policy = OrchestrationConfig(
        lock_timeout_minutes=1, stage_timeout_minutes=1, task_timeout_minutes=1,
        retries=2, retry_delay_seconds=0,
    )
    for kind in calls:
        fails.with_options(**task_options(policy, 1))(kind, return_state=True)


run()
print(json.dumps(calls))
"""


def test_only_transient_failures_are_retried(prefect_server: dict, tmp_path: Path) -> None:
    """The one policy every flow takes (flows/retry.py), under a real Prefect server: an
    OSError is tried 1 + orchestration.retries times, a user's error once."""
    import json
    import subprocess

    from tests.conftest import REPO_ROOT

    result = subprocess.run(
        [sys.executable, "-c", RETRIED_FLOW],
        cwd=REPO_ROOT,
        env=prefect_server["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    calls = json.loads(result.stdout.strip().splitlines()[-1])
    assert calls == {"disk briefly full": 3, "bad data": 1}
