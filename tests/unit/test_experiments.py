"""Recording a run never fails the run it records: outside git it is only logged, and a
disk that refuses the record is said in a warning, not raised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmops import experiments
from lmops.artifacts import RunRecord

pytestmark = pytest.mark.code


def _run(status: str = "completed") -> RunRecord:
    return RunRecord(
        name="20261207-182242-sturdy-manatee",
        status=status,
        started="2026-12-07T18:22:42+00:00",
        wall_seconds=398.0,
        failed_stage="validate" if status == "failed" else None,
    )


def test_outside_a_dvc_project_the_run_is_logged_only(tmp_path: Path) -> None:
    assert experiments.record(tmp_path, _run()) is None
    assert experiments.record(tmp_path, _run("failed")) is None
    lines = (tmp_path / experiments.RUN_LOG).read_text("utf-8").splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["completed", "failed"]
    assert json.loads(lines[1])["failed_stage"] == "validate"
    assert RunRecord.read(tmp_path / experiments.RUN_RECORD).status == "failed"


def test_a_disk_that_refuses_the_record_does_not_fail_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / experiments.RUN_LOG).mkdir(parents=True)  # the log's path is taken
    assert experiments.record(tmp_path, _run("failed")) is None
    assert "not appended to reports/runs.jsonl" in caplog.text
    record = tmp_path / experiments.RUN_RECORD
    record.unlink()  # written by the call above
    record.mkdir()  # now the record's path is taken too
    assert experiments.record(tmp_path, _run()) is None
    assert "not recorded" in caplog.text


def test_experiment_names_are_git_refs_a_person_can_read() -> None:
    name = experiments.experiment_name("Sturdy Manatee!", "2026-12-07T18:22:42+00:00")
    assert name == "20261207-182242-sturdy-manatee"
    assert experiments.experiment_name(None, "2026-12-07T18:22:42+00:00").endswith("-run")
