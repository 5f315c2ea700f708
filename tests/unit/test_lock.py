"""The repository tells the truth: the dvc.lock in git was written by a real run of the code
and params in git (as DVC's example project keeps it), so a fresh clone's `dvc metrics show`
prints the committed code's own figures. Checked with the real `dvc status`, restricted to
the code and params deps: data and models are not in git, so those always differ."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN_DIR, REPO_ROOT, tool_env

pytestmark = pytest.mark.code


def _project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO_ROOT / name).is_file()]


def _stale(status: dict) -> dict[str, list[str]]:
    """Per stage, the code files and params whose hashes differ from dvc.lock's."""
    stale: dict[str, list[str]] = {}
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            if "changed command" in entry:
                stale.setdefault(stage, []).append("cmd")
            for path, change in entry.get("changed deps", {}).items():
                if path.endswith(".py"):
                    stale.setdefault(stage, []).append(f"{path} ({change})")
                elif path == "params.yaml":
                    stale.setdefault(stage, []).append(f"params {change}")
    return stale


def test_the_committed_lock_matches_the_code_and_params(tmp_path: Path) -> None:
    for name in _project_files():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    result = subprocess.run(
        [str(BIN_DIR / "dvc"), "status", "--json"],
        cwd=tmp_path,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    stale = _stale(json.loads(result.stdout))
    assert not stale, (
        "dvc.lock does not match the code and params in git; commit dvc.lock and reports/ "
        f"from a real `make run` of this code: {stale}"
    )


def test_a_changed_code_dep_is_seen() -> None:
    """The filter above can fail: an edited stage module and an edited param are stale."""
    status = {
        "ingest": [
            {"changed deps": {"tasks/ingest.py": "modified", "data/raw": "deleted"}},
            {"changed outs": {"data/ingested": "not in cache"}},
        ],
        "train": [{"changed deps": {"params.yaml": {"finetune.epochs": "modified"}}}],
        "export": [{"changed outs": {"models/onnx": "deleted"}}],
    }
    assert _stale(status) == {
        "ingest": ["tasks/ingest.py (modified)"],
        "train": ["params {'finetune.epochs': 'modified'}"],
    }
