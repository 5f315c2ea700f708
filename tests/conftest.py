"""Shared fixtures: the repository's own params, and small real data from the builtins."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmops.config import Params, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent


@pytest.fixture(scope="session")
def repo_params_raw() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


def params_with(raw: dict[str, Any], **dotted: Any) -> Params:
    """The repository's params with dotted-key overrides (`data__max_rows=100`)."""
    tree = copy.deepcopy(raw)
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value
    return parse_params(tree)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment a subprocess of this venv needs: its scripts first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1"})
    env.update(extra)
    return env


def copy_project(dest: Path) -> Path:
    """Copy what git would ship (tracked and untracked-not-ignored files) into `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    for name in listed:
        source = REPO_ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=lmops-tests", "-c", "user.email=tests@lmops.invalid", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    ).stdout


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: equal digests mean nothing was touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
