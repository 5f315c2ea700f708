"""The monitoring flow: a drift report now (the same run as `lmops monitor`), published as
the `drift-report` artifact; on drift the event `lmops.drift.detected`, and when the
accuracy estimated without labels fell (CBPE, tasks/monitor.py) `lmops.performance.degraded`.
An automation turns either into a training run.

One event a run (drift first: its payload carries the estimate too), and at most one per
`monitor.cooldown_hours` of either kind: a drifted window stays drifted for hours, and
each report would otherwise start another retraining. The last trigger is recorded in
`<monitor.reports_dir>/last_trigger.json`, so the cooldown survives restarts and holds
across processes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.events import emit_event
from prefect.states import Failed

from lmops.artifacts import DriftSummary
from lmops.atomic import write_json
from lmops.config import load_params
from lmops.errors import LmopsError
from lmops.flows.retry import task_options

EVENT = "lmops.drift.detected"
PERFORMANCE_EVENT = "lmops.performance.degraded"
LAST_TRIGGER = "last_trigger.json"


@task
def drift_report(project_dir: str, traffic: str | None) -> dict[str, Any] | State:
    """The monitor's run (tasks/monitor.py); a user error is a Failed state with its reason."""
    from lmops.tasks import monitor

    root = Path(project_dir)
    try:
        return monitor.run_project(root, load_params(root), root / traffic if traffic else None)
    except LmopsError as err:
        return Failed(message=str(err))


def _last_trigger(path: Path) -> datetime | None:
    try:
        return datetime.fromisoformat(json.loads(path.read_text(encoding="utf-8"))["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _markdown(summary: dict[str, Any], pages_url: str) -> str:
    typed = DriftSummary.model_validate(summary)
    lines = [f"# Drift report — model {typed.model.version}", ""]
    if typed.status == "not_enough_data":
        return "\n".join([*lines, f"**{typed.message}**: no report written."])
    html = typed.report["html"] if typed.report else ""
    per_column = typed.checks.columns.per_column if typed.checks else {}
    lines += [
        f"**Drift {'DETECTED' if typed.drift_detected else 'not detected'}** ({typed.trigger})",
        "",
        "| check | method | score | threshold | drift |",
        "|---|---|---:|---:|---|",
        *(
            f"| {name if name in per_column else f'**{name}**'} | {method} | {score:.4f} | "
            f"{threshold:g} | {drift} |"
            for name, method, score, threshold, drift in typed.table()
        ),
        "",
        *(
            [f"**Performance** (no labels needed): {typed.performance.line()}", ""]
            if typed.performance
            else []
        ),
        f"{typed.rows_line().capitalize()} "
        f"({typed.traffic.corrupt_lines_skipped:,} corrupt log lines skipped).",
        "",
        f"Report (Evidently): `{html}`; in a browser while `lmops serve` runs: "
        f"{pages_url}/reports/drift/{Path(html).parent.name}/report.html",
    ]
    return "\n".join(lines)


def _emit(name: str, model_name: str, summary: dict[str, Any]) -> Any:
    """The event, about the model as a Prefect resource, carrying the monitor's summary."""
    return emit_event(
        event=name,
        resource={
            "prefect.resource.id": f"lmops.model.{model_name}",
            "prefect.resource.name": model_name,
            "lmops.model.version": summary["model"]["version"],
        },
        payload=summary,
    )


@flow(name="monitoring", log_prints=True)
def monitoring(traffic: str | None = None, project_dir: str = ".") -> dict[str, Any] | State:
    """Run the drift monitor; on drift emit `lmops.drift.detected`, on an estimated drop in
    accuracy `lmops.performance.degraded`, unless within the cooldown. Returns the
    monitor's summary with `event_emitted` and `trigger` added."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    params = load_params(root)
    options = task_options(params.orchestration, params.orchestration.task_timeout_minutes)
    state = drift_report.with_options(**options)(str(root), traffic, return_state=True)
    if state.is_failed():
        return Failed(message=state.message)
    summary = state.result()
    cfg = params.monitor
    degraded = (summary.get("performance") or {}).get("degraded", False)
    # One event a run: each starts a training run, and drift's payload carries the
    # performance estimate too.
    due = EVENT if summary["drift_detected"] else PERFORMANCE_EVENT if degraded else None
    event_emitted, trigger = False, "no drift, no drop in estimated accuracy: no event"
    if due:
        trigger_path = root / cfg.reports_dir / LAST_TRIGGER
        now = datetime.now(UTC)
        last = _last_trigger(trigger_path)
        if last is not None and now < last + timedelta(hours=cfg.cooldown_hours):
            trigger = (
                f"{due} suppressed by the cooldown: the last event at {last:%F %T} UTC, the "
                f"next not before {last + timedelta(hours=cfg.cooldown_hours):%F %T} UTC "
                f"(monitor.cooldown_hours={cfg.cooldown_hours:g})"
            )
        else:
            event = _emit(due, params.serve.model_name, summary)
            if event is None:
                trigger = f"{due} could not be emitted (no Prefect API reachable)"
            else:
                event_emitted, trigger = True, f"emitted {due} (event {event.id})"
                write_json(
                    trigger_path,
                    {
                        "at": now.isoformat(),
                        "event": due,
                        "event_id": str(event.id),
                        "model_version": summary["model"]["version"],
                        "report": summary["report"]["html"],
                    },
                )
    summary = {**summary, "event_emitted": event_emitted, "trigger": trigger}
    logger.info("%s; %s", summary.get("message", "report written"), trigger)
    create_markdown_artifact(
        key="drift-report",
        markdown=_markdown(summary, params.serve.pages_url),
        description="Drift checks of the served traffic against the reference",
    )
    return summary
