"""The flow's guards against running unattended: stage timeouts and the workspace lock."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmops.errors import LmopsError
from lmops.flows.training import _run_streaming
from lmops.workspace import LOCK_FILE, workspace_lock


def test_a_stage_past_its_timeout_is_killed_and_says_why(tmp_path: Path) -> None:
    output, returncode = _run_streaming(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        tmp_path,
        timeout_s=1,
    )
    assert returncode != 0
    assert output.startswith("started")
    assert "killed after" in output and "orchestration.stage_timeout_minutes" in output


def test_a_stage_within_its_timeout_is_left_alone(tmp_path: Path) -> None:
    output, returncode = _run_streaming([sys.executable, "-c", "print('ok')"], tmp_path, 30)
    assert (output, returncode) == ("ok", 0)


def test_workspace_lock_is_reentrant_in_a_process_and_exclusive_across_processes(
    tmp_path: Path,
) -> None:
    with workspace_lock(tmp_path, 0, "flow-run:outer"):
        with workspace_lock(tmp_path, 0, "flow-run:inner"):  # a subflow in the same process
            pass
        seen: list[str] = []
        thread = threading.Thread(  # a task thread of the same flow run
            target=lambda: seen.append(_take_in_thread(tmp_path))
        )
        thread.start()
        thread.join()
        assert seen == ["taken"]
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "from pathlib import Path; from lmops.workspace import workspace_lock\n"
                f"with workspace_lock(Path({str(tmp_path)!r}), 0, 'other'): pass",
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0
        assert "another run holds the workspace lock" in other.stderr
        assert "flow-run:outer" in other.stderr  # the holder is named
    with workspace_lock(tmp_path, 0, "after"):  # released
        assert (tmp_path / LOCK_FILE).exists()


def _take_in_thread(root: Path) -> str:
    with workspace_lock(root, 0, "thread"):
        return "taken"


def test_a_held_lock_times_out_with_a_clear_error(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from lmops.workspace import workspace_lock\n"
            f"with workspace_lock(Path({str(tmp_path)!r}), 0, 'flow-run:holder'):\n"
            "    print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LmopsError, match=r"flow-run:holder.*waited 0.01 min"):
            workspace_lock(tmp_path, 0.01, "me").__enter__()
    finally:
        holder.kill()
        holder.wait()


def test_stage_progress_reaches_the_run_log_as_lines(tmp_path: Path) -> None:
    """Under the flow a stage's output is a pipe: it logs progress lines (no redrawn bars),
    and each reaches `on_progress`, which the flow points at the Prefect run log."""
    script = (
        "import logging, sys\n"
        "import lmops.trainloop as t\n"
        "t.PROGRESS_EVERY_S = 0.0\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stderr)\n"
        "shown = t.progress(range(3), desc='pretrain')\n"
        "for step in shown:\n"
        "    shown.set_postfix(loss=f'{7.5 - step:.3f}')\n"
    )
    seen: list[str] = []
    output, code = _run_streaming([sys.executable, "-c", script], tmp_path, 60, seen.append)
    assert code == 0 and "\r" not in output
    assert seen == [
        line.removeprefix("progress: ")
        for line in output.splitlines()
        if line.startswith("progress: ")
    ]
    assert len(seen) == 3 and seen[-1].startswith("pretrain 3/3 (100%), loss 5.500")
    assert "ETA 0:00" in seen[-1]


def test_progress_is_bars_only_where_asked_or_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lmops.trainloop import LineProgress, progress

    monkeypatch.setenv("LMOPS_PROGRESS", "lines")
    assert isinstance(progress(range(2), desc="x"), LineProgress)
    monkeypatch.setenv("LMOPS_PROGRESS", "bars")
    assert not isinstance(progress(range(2), desc="x"), LineProgress)
    monkeypatch.delenv("LMOPS_PROGRESS")
    assert isinstance(progress(range(2), desc="x"), LineProgress)  # pytest's stderr: no tty
