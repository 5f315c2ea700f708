"""One run at a time per workspace: training and promotion rewrite params.yaml, run DVC
stages and commit to git, so two of them interleaved would corrupt each other.

DVC's own lock only covers one `dvc repro` (dvc#10465), not a flow of several; this lock
covers the whole flow. A second run waits for it, then fails naming the holder.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from lmops.errors import LmopsError

LOCK_FILE = Path(".dvc/tmp/lmops-run.lock")


@contextmanager
def workspace_lock(root: Path, timeout_minutes: float, holder: str) -> Iterator[None]:
    """Re-entrant within one process (a subflow inside a flow takes it again freely)."""
    from filelock import FileLock, Timeout

    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_suffix(".owner")
    lock = FileLock(path, is_singleton=True, thread_local=False)
    try:
        lock.acquire(timeout=timeout_minutes * 60)
    except Timeout:
        held_by = owner.read_text(encoding="utf-8").strip() if owner.exists() else "unknown"
        raise LmopsError(
            f"another run holds the workspace lock of {root} ({held_by}); waited "
            f"{timeout_minutes:g} min (orchestration.lock_timeout_minutes)"
        ) from None
    try:
        if lock.lock_counter == 1:
            started = datetime.now(UTC).isoformat(timespec="seconds")
            owner.write_text(
                f"{holder}, pid {os.getpid()} on {socket.gethostname()}, since {started}\n",
                encoding="utf-8",
            )
        yield
    finally:
        lock.release()
