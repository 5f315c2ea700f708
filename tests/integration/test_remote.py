"""The DVC remote registrations push to (lmops/registry.py), on a real git + DVC repo: a
repository's own default remote wins, `registry.remote` is written per machine otherwise,
and a push the remote refuses registers nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmops import registry
from lmops.errors import LmopsError
from tests.conftest import git, tool_env


def _dvc(root: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    _dvc(root, "init", "-q")
    (root / "data.txt").write_text("a tracked file\n", "utf-8")
    _dvc(root, "add", "-q", "data.txt")
    (root / "params.yaml").write_text("x: 1\n", "utf-8")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


def test_registry_remote_is_written_per_machine_and_pushed_to(repo: Path, tmp_path: Path) -> None:
    remote = tmp_path / "store"
    assert registry.push(repo, str(remote)) == registry.REMOTE_NAME
    assert any(p.is_file() for p in remote.rglob("*"))
    local = (repo / ".dvc" / "config.local").read_text("utf-8")
    assert f"url = {remote}" in local and "remote = lmops" in local
    assert "lmops" not in (repo / ".dvc" / "config").read_text("utf-8")  # nothing committed


def test_a_default_remote_of_the_repository_wins(repo: Path, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    _dvc(repo, "remote", "add", "-d", "store", str(theirs))
    assert registry.push(repo, str(tmp_path / "ours")) == "store"
    assert any(theirs.rglob("*")) and not (tmp_path / "ours").exists()


def test_a_refused_push_registers_nothing(repo: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", "utf-8")
    with pytest.raises(LmopsError, match="cannot push the version's data and models to DVC"):
        registry.register(repo, "test", "a model", str(blocker / "remote"))
    assert git(repo, "tag").strip() == ""
