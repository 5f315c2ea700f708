"""The fault family's shared server: `lmops serve` on a tiny export, a real process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port, start_server, stop_server


def fault_workspace(tiny_export: Callable[[int], Path], root: Path) -> Path:
    shutil.copytree(tiny_export(0), root / "models" / "onnx")
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    return root


def serve(root: Path, preexec_fn: Callable[[], None] | None = None) -> tuple[str, subprocess.Popen]:
    port = free_port()
    process = start_server(
        [sys.executable, "-m", "lmops", "serve", "--port", str(port)],
        root,
        port,
        root / "server.log",
        preexec_fn=preexec_fn,
    )
    return f"http://127.0.0.1:{port}", process


@pytest.fixture(scope="session")
def served(
    tiny_export: Callable[[int], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """One server for the family's tests that leave it serving: (URL, workspace)."""
    root = fault_workspace(tiny_export, tmp_path_factory.mktemp("faults"))
    url, process = serve(root)
    yield url, root
    stop_server(process)
