"""One retry and timeout policy for every flow's tasks, from `orchestration:` in params.

Only what can pass on a second try is retried: an OSError (a subprocess that could not
start, a file rotated away mid-read, a disk briefly full). A user's error (LmopsError: bad
data, a failed gate, an unknown version) and a bug fail the same way every time, so they
fail at once.
"""

from __future__ import annotations

from typing import Any

from prefect.client.schemas.objects import State
from prefect.tasks import exponential_backoff

from lmops.config import OrchestrationConfig
from lmops.errors import LmopsError


def transient(task: Any, task_run: Any, state: State) -> bool:
    try:
        state.result()
    except LmopsError:
        return False
    except OSError:
        return True
    except BaseException:
        return False
    return False


def task_options(orchestration: OrchestrationConfig, timeout_minutes: float) -> dict[str, Any]:
    """`Task.with_options(...)` arguments: retries with exponential backoff, the transient
    condition above, and a timeout."""
    delay = orchestration.retry_delay_seconds
    return {
        "retries": orchestration.retries,
        "retry_delay_seconds": exponential_backoff(delay) if delay else 0,
        "retry_condition_fn": transient,
        "timeout_seconds": timeout_minutes * 60,
    }
