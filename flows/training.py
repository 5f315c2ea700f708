"""The training flow: each stage a Prefect task that asks DVC to reproduce that stage.

DVC decides run-or-skip from its content hashes and writes dvc.lock; Prefect owns
scheduling, retries, logs and the UI. So the flow and `dvc repro` are interchangeable:
after either, `dvc status` is clean and the other does no work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from lmops import experiments, registry
from lmops.artifacts import DataManifest, ExportManifest, LabelIssuesReport, Metrics, RunRecord
from lmops.config import (
    OrchestrationConfig,
    apply_overrides,
    load_params,
    override,
    parse_params,
    read_raw,
    resolve_overrides,
)
from lmops.errors import LmopsError
from lmops.flows.promotion import actor, promotion
from lmops.flows.retry import task_options
from lmops.stages import (
    LABELS_METRICS,
    LABELS_PAGE_DIR,
    METRICS,
    MODEL_CARD,
    ONNX_DIR,
    PLOTS_DIR,
    VALIDATED_DIR,
    VALIDATION_DOCS_DIR,
)
from lmops.tasks.stages import STAGES
from lmops.trainloop import PROGRESS_ENV, PROGRESS_PREFIX, progress_mode
from lmops.workspace import workspace_lock


def _dvc_env() -> dict[str, str]:
    """The stage commands call `lmops`: make sure this interpreter's scripts are found."""
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _run_streaming(
    command: list[str],
    cwd: Path,
    timeout_s: float,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[str, int]:
    """Run a command, passing its output (progress included) through to the console as it
    comes, and return it all with the exit code. Its progress is bars when the console is
    a terminal, else log lines, each also handed to `on_progress` (the Prefect run log).
    Past `timeout_s` its whole process group is killed: `dvc repro` runs the stage as a
    child, which would otherwise live on, holding the pipe open, and the flow would wait
    for it."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**_dvc_env(), PROGRESS_ENV: progress_mode()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    killed = threading.Event()

    def kill_group() -> None:
        killed.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill_group)
    timer.start()
    chunks, pending = [], b""
    try:
        while chunk := process.stdout.read1(65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            chunks.append(chunk)
            if on_progress is not None:
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    text = line.decode("utf-8", errors="replace").strip()
                    if text.startswith(PROGRESS_PREFIX):
                        on_progress(text.removeprefix(PROGRESS_PREFIX))
        returncode = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted (Ctrl-C): its own session hears no signal
            kill_group()
            process.wait()
    output = b"".join(chunks).decode("utf-8", errors="replace").strip()
    if killed.is_set():
        output += (
            f"\nerror: killed after {timeout_s / 60:g} min (orchestration.stage_timeout_minutes)"
        )
    return output, returncode


def _reason(output: str) -> str:
    """The stage's own one-line errors (`error: ...`), else the last lines DVC printed."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    if start is None:
        return "\n".join(lines[-5:])
    ours = [line for line in lines[start:] if not line.startswith("ERROR: failed to reproduce")]
    return "\n".join(ours).removeprefix("error: ")


def _locked(root: Path, stage: str) -> dict[str, list[str]]:
    """What dvc.lock says the stage read and wrote, as `path (md5)` strings."""
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    entry = lock.get("stages", {}).get(stage, {})
    return {
        kind: [f"{item['path']} ({item.get('md5', '?')[:12]})" for item in entry.get(kind, [])]
        for kind in ("deps", "outs")
    }


STAGE_FAILED = "StageFailed"


@task(task_run_name="stage-{stage}")
def reproduce_stage(stage: str, project_dir: str, timeout_s: float) -> dict[str, Any] | State:
    """`dvc repro --single-item STAGE`: runs the stage, or skips it when nothing changed
    (the task run then ends in a Completed state named Skipped)."""
    logger = get_run_logger()
    root = Path(project_dir)
    output, returncode = _run_streaming(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        root,
        timeout_s,
        on_progress=logger.info,
    )
    if returncode != 0:
        logger.error(
            "dvc repro %s failed; its last lines:\n%s", stage, "\n".join(output.splitlines()[-40:])
        )
        # A Failed state, not an exception: the reason is the user's, not a traceback's.
        return Failed(name=STAGE_FAILED, message=f"stage {stage} failed: {_reason(output)}")
    ran = "didn't change, skipping" not in output
    io = _locked(root, stage)
    logger.info(
        "%s %s\nread: %s\nwrote: %s",
        "ran" if ran else "skipped (up to date):",
        stage,
        ", ".join(io["deps"]),
        ", ".join(io["outs"]),
    )
    result = {"stage": stage, "ran": ran, **io}
    if not ran:
        return Completed(name="Skipped", message="up to date (dvc.lock)", data=result)
    return result


def _manifest_markdown(manifest: DataManifest, docs_url: str, stages: list[dict]) -> str:
    rows = manifest.rows
    lines = [
        "# Data manifest",
        "",
        "| table | rows | content sha256 |",
        "|---|---:|---|",
        *(f"| {name} | {rows[name]:,} | `{manifest.content_sha256[name][:16]}` |" for name in rows),
        "",
        "| dropped | rows |",
        "|---|---:|",
        *(f"| labelled: {reason} | {n:,} |" for reason, n in manifest.labelled.dropped.items()),
        *(f"| corpus: {reason} | {n:,} |" for reason, n in manifest.corpus.dropped.items()),
        "",
        f"Labels: {', '.join(manifest.labelled.labels or [])}. "
        f"Sources: `{manifest.labelled.spec}`, `{manifest.corpus.spec}`.",
        "",
        manifest.personal_data.line() if manifest.personal_data else "",
        "",
        f"Validation report (Great Expectations Data Docs, shown by `lmops serve`): {docs_url}",
        "",
        "| stage | result | outputs in dvc.lock (md5) |",
        "|---|---|---|",
        *(
            f"| {s['stage']} | {'ran' if s['ran'] else 'skipped (up to date)'} | "
            f"{', '.join(s['outs'])} |"
            for s in stages
        ),
    ]
    return "\n".join(lines)


def _labels_markdown(report: LabelIssuesReport, page_url: str) -> str:
    lines = [
        "# Label issues",
        "",
        report.line().removeprefix("- "),
        "",
        "| split | given label | suggested | confidence | text |",
        "|---|---|---|---:|---|",
        *(
            f"| {i.split} | {i.label} | {i.suggested} | {i.confidence:.2f} | "
            f"{i.text[:120].replace('|', '/')} |"
            for i in report.top[:10]
        ),
        "",
        f"Every split's counts and top issues: {page_url}; every flagged row: `lmops labels "
        "--export FILE.csv`.",
    ]
    return "\n".join(lines)


@task
def register_model(project_dir: str, by: str, summary: str) -> dict[str, Any]:
    """Commit dvc.lock, params and reports, push data and models to the DVC remote, and tag
    the commit as a version (GTO)."""
    root = Path(project_dir)
    version, new = registry.register(root, by, summary, load_params(root).registry.remote)
    return {"version": version, "new": new}


@flow(name="register-experiment")
def register_experiment(experiment: str, project_dir: str = ".", by: str | None = None) -> str:
    """Register a saved experiment (a sweep's point, or any earlier run) as a new version:
    its params, dvc.lock and outputs go back into the workspace and are committed and
    tagged as `lmops run` does. Returns the version, for the promotion gates."""
    root = Path(project_dir).resolve()
    who = actor(by)
    orchestration = load_params(root).orchestration
    with workspace_lock(root, orchestration.lock_timeout_minutes, who):
        run = experiments.apply(root, experiment)
        registered = register_model.with_options(
            **task_options(orchestration, orchestration.task_timeout_minutes)
        )(str(root), who, f"experiment {experiment} ({run.sweep or 'lmops run'}, {run.config})")
    return registered["version"]


def _registry_markdown(
    root: Path, registered: dict[str, Any], promoted: dict | None, pages_url: str
) -> str:
    version = registered["version"]
    commit = registry.commit_of(root, version)
    lines = [
        f"# Registry\n\nThis run's model is **{version}** "
        f"({'newly registered' if registered['new'] else 'already registered: nothing changed'}).",
        "",
        f"- tag `{registry.ARTIFACT}@{version}` on commit `{commit[:12]}` (its dvc.lock pins the "
        f"export)",
        f"- model: `{root / ONNX_DIR}` in this workspace; any clone: "
        f"`lmops models` lists it, the registry fetches it from DVC",
        "- serve it: `lmops serve --stage prod` (follows prod) or `make serve` (this workspace's "
        "export)",
        f"- its page (metrics, pictures, model card, history; while `lmops serve` runs): "
        f"{pages_url}/models/{version}",
        "",
        "| stage | version |",
        "|---|---|",
        *(
            f"| {stage} | {registry.stage_version(root, stage) or '-'} |"
            for stage in registry.REGISTRY_STAGES
        ),
    ]
    if promoted is not None:
        verdict = "PROMOTED" if promoted["promoted"] else "not promoted"
        if promoted.get("staged"):
            verdict = "STAGED"
        lines += ["", f"Promotion: {verdict} — {promoted['why']}"]
    return "\n".join(lines)


@flow(name="training", log_prints=True)
def training(
    profile: str | None = None,
    overrides: list[str] | None = None,
    project_dir: str = ".",
    promote: bool = True,
    sweep_point: dict[str, Any] | None = None,
) -> dict[str, Any] | State:
    """Apply the profile and overrides to params.yaml, reproduce every stage in order, then
    register the model and run the promotion gates. One run at a time per workspace.

    `sweep_point` ({"sweep": name, "config": {...}, "seed": n}): the run is a point of
    `lmops sweep`, recorded as such and neither registered nor promoted."""
    root = Path(project_dir).resolve()
    wanted = resolve_overrides(root, profile, overrides or [])
    # This run's own settings decide how long it waits; params.yaml is written only once
    # the lock is held, so a waiting run never changes what the running one reads.
    orchestration = parse_params(override(read_raw(root), wanted)).orchestration
    try:
        return _train_locked(root, wanted, orchestration, profile, overrides, promote, sweep_point)
    except LmopsError as err:  # the lock, git, the registry: the user's to fix, no traceback
        return Failed(message=str(err))


def _train_locked(
    root: Path,
    wanted: dict[str, Any],
    orchestration: OrchestrationConfig,
    profile: str | None,
    overrides: list[str] | None,
    promote: bool,
    sweep_point: dict[str, Any] | None = None,
) -> dict[str, Any] | State:
    """The run under the workspace lock, recorded at its end whether it completed (a DVC
    experiment) or failed (reports/runs.jsonl, with the stage and the error):
    lmops/experiments.py."""
    who = actor(None)
    with workspace_lock(root, orchestration.lock_timeout_minutes, who):
        started = datetime.now(UTC)
        commit = registry.head_commit(root)
        failed_stage: list[str] = []
        run = {"profile": profile, "overrides": overrides or [], **(sweep_point or {})}
        try:
            outcome = _train(
                root,
                wanted,
                orchestration,
                (profile, overrides),
                promote=promote and sweep_point is None,
                register=sweep_point is None,
                who=who,
                failed_stage=failed_stage,
            )
        except LmopsError as err:
            _record(root, started, commit, run, failed_stage, str(err))
            raise
        error = outcome.message if isinstance(outcome, State) else None
        experiment = _record(root, started, commit, run, failed_stage, error, outcome)
    if isinstance(outcome, dict):
        outcome["experiment"] = experiment
    return outcome


def _record(
    root: Path,
    started: datetime,
    commit: str | None,
    run: dict[str, Any],
    failed_stage: list[str],
    error: str | None,
    outcome: dict[str, Any] | State | None = None,
) -> str | None:
    """`run`: the profile, the overrides and, for a sweep's point, its sweep, config, seed."""
    from prefect.runtime import flow_run

    registered = outcome.get("registered") if isinstance(outcome, dict) else None
    promoted = outcome.get("promotion") if isinstance(outcome, dict) else None
    iso = started.isoformat(timespec="seconds")
    metrics: dict[str, dict[str, float]] = {}
    if error is None:
        try:
            metrics = experiments.run_metrics(root, list(STAGES))
        except (OSError, ValueError, KeyError) as err:  # a report missing: the run stands
            get_run_logger().warning("run metrics not recorded: %s", err)
    return experiments.record(
        root,
        RunRecord(
            name=experiments.experiment_name(flow_run.name, iso),
            status="failed" if error is not None else "completed",
            flow_run_id=str(flow_run.id) if flow_run.id else None,
            git_commit=commit,
            started=iso,
            wall_seconds=round((datetime.now(UTC) - started).total_seconds(), 1),
            failed_stage=failed_stage[0] if failed_stage else None,
            error=error,
            version=registered["version"] if registered else None,
            promoted=bool(promoted["promoted"]) if promoted else None,
            metrics=metrics,
            **run,
        ),
    )


def _train(
    root: Path,
    wanted: dict[str, Any],
    orchestration: OrchestrationConfig,
    asked: tuple[str | None, list[str] | None],
    promote: bool,
    register: bool,
    who: str,
    failed_stage: list[str],
) -> dict[str, Any] | State:
    """`asked`: the profile and overrides as given (the registry commit's message)."""
    profile, overrides = asked
    logger = get_run_logger()
    _, changed = apply_overrides(root, wanted)
    if changed:
        logger.info("params.yaml changed: %s", changed)
    # A stage that fails on its own returns a Failed state (not an exception): never
    # retried. Its timeout is the stage's own (killed in _run_streaming), plus slack.
    reproduce = reproduce_stage.with_options(
        **task_options(orchestration, orchestration.stage_timeout_minutes + 1)
    )
    stages = []
    for stage in STAGES:
        state = reproduce(
            stage, str(root), orchestration.stage_timeout_minutes * 60, return_state=True
        )
        if state.is_failed():
            failed_stage.append(stage)
            return Failed(message=state.message)
        stages.append(state.result())
    pages_url = parse_params(read_raw(root)).serve.pages_url
    result = _publish(root, stages, pages_url)
    if not register:  # a sweep's point: an experiment, registered only when promoted
        return {**result, "registered": None, "promotion": None}
    if not registry.is_git_repo(root):
        logger.warning("%s is not a git repository: the model is not registered", root)
        return {**result, "registered": None, "promotion": None}
    metrics = Metrics.model_validate(result["metrics"]).model
    registered = register_model.with_options(
        **task_options(orchestration, orchestration.task_timeout_minutes)
    )(
        str(root),
        who,
        f"profile {profile or '-'}, overrides {overrides or []}; test accuracy "
        f"{metrics.accuracy:.4f}, macro-F1 {metrics.macro_f1:.4f}",
    )
    promoted = None
    if promote:
        promotion_state = promotion(registered["version"], str(root), return_state=True)
        if promotion_state.is_failed():
            failed_stage.append("promotion")
            return Failed(message=f"promotion failed: {promotion_state.message}")
        promoted = promotion_state.result()
    create_markdown_artifact(
        key="registry",
        markdown=_registry_markdown(root, registered, promoted, pages_url),
        description="The registered version and where the stages point",
    )
    return {**result, "registered": registered, "promotion": promoted}


def _publish(root: Path, stages: list[dict[str, Any]], pages_url: str) -> dict[str, Any]:
    """The data and evaluation artifacts, and what the run summary needs."""
    manifest = DataManifest.of(root / VALIDATED_DIR)
    docs_index = root / VALIDATION_DOCS_DIR / "index.html"
    create_markdown_artifact(
        key="data-manifest",
        markdown=_manifest_markdown(
            manifest,
            f"{pages_url}/{docs_index.relative_to(root).as_posix()}",
            stages,
        ),
        description="Row counts, drops and content hashes of the validated data",
    )
    labels = LabelIssuesReport.read(root / LABELS_METRICS)
    create_markdown_artifact(
        key="label-issues",
        markdown=_labels_markdown(labels, f"{pages_url}/{LABELS_PAGE_DIR.as_posix()}/"),
        description="Rows whose given label looks wrong, per split, and what was dropped",
    )
    metrics = Metrics.read(root / METRICS)
    plots = sorted((root / PLOTS_DIR).glob("*"))
    create_markdown_artifact(
        key="evaluation",
        markdown="# Evaluation\n\n"
        + metrics.markdown()
        + f"\n\nThe model card (`{MODEL_CARD}`) and the pictures ("
        + ", ".join(f"`{plot.name}`" for plot in plots)
        + ") are on the version's page once it is registered (the registry artifact links it);"
        " `dvc plots show` draws them all.",
        description="Test metrics beside the baseline, and the gates' verdict",
    )
    return {
        "export": ExportManifest.of(root / ONNX_DIR).dump(),
        "stages": stages,
        "manifest": manifest.dump(),
        "data_docs": str(docs_index),
        "labels": labels.dump(),
        "metrics": metrics.dump(),
        "model_card": str(root / MODEL_CARD),
    }
