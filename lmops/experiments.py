"""Every training run is recorded. A completed `lmops run` ends by saving the workspace
(params, dvc.lock, metrics, plots) as a DVC experiment with `dvc exp save`, together with
reports/run.json (how the run went: its name, Prefect flow run, git commit, wall time), so
`dvc exp show` and `dvc exp diff` list and compare the runs as DVC users expect.

A failed run cannot be a DVC experiment: DVC deletes a stage's outputs before it runs it,
and `dvc exp save` refuses a workspace whose outputs are missing. So every run, completed
or failed (with the stage and the error), is also appended to reports/runs.jsonl, and a
failed one says there why it has no experiment.

Both files stay out of git (they change every run, and the registry's commits must not: a
run that changes nothing keeps its version); the experiment carries reports/run.json.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lmops.artifacts import RunRecord
from lmops.registry import is_git_repo

log = logging.getLogger(__name__)

RUN_RECORD = Path(RunRecord.FILE)
RUN_LOG = Path("reports/runs.jsonl")


def experiment_name(flow_run_name: str | None, started: str) -> str:
    """A name git accepts as a ref and a person can read: the UTC start and the flow run's
    own name (Prefect's two words), e.g. 20261207-173512-crimson-lemur."""
    stamp = re.sub(r"[^0-9]", "", started[:19])
    stamp = f"{stamp[:8]}-{stamp[8:14]}"
    words = re.sub(r"[^a-z0-9-]+", "-", (flow_run_name or "run").lower()).strip("-")
    return f"{stamp}-{words or 'run'}"


def _dvc() -> str:
    """The dvc of this environment (a Prefect worker's PATH may not have the venv's)."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def record(root: Path, run: RunRecord) -> str | None:
    """Write reports/run.json, save a completed run as the DVC experiment `run.name`, and
    append the run to reports/runs.jsonl. Returns the experiment's name, or None where there
    is none (a failed run, not a DVC project in git, or DVC's own error, logged): recording
    never fails the run it records."""
    try:
        run.write(root / RUN_RECORD)
    except OSError as err:  # a full or read-only disk: said, and the run's own result stands
        log.warning("run %s not recorded: %s", run.name, err)
        return None
    saved = _save(root, run) if run.status == "completed" else None
    entry = run.model_copy(update={"experiment": saved}) if saved else run
    try:
        with (root / RUN_LOG).open("a", encoding="utf-8") as runs:
            runs.write(entry.model_dump_json(exclude_none=True) + "\n")
    except OSError as err:
        log.warning("run %s not appended to %s: %s", run.name, RUN_LOG, err)
    return saved


def _save(root: Path, run: RunRecord) -> str | None:
    if not (root / ".dvc").is_dir() or not is_git_repo(root):
        log.warning(
            "%s is not a DVC project in git: run %s not saved as an experiment", root, run.name
        )
        return None
    result = subprocess.run(
        [_dvc(), "exp", "save", "--name", run.name, "--include-untracked", str(RUN_RECORD)],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        timeout=300,
    )
    if result.returncode != 0:
        log.warning("run %s not saved as a DVC experiment: %s", run.name, result.stderr.strip())
        return None
    log.info("run %s saved as a DVC experiment", run.name)
    return run.name
