"""Every training run is recorded. A completed `lmops run` ends by saving the workspace
(params, dvc.lock, metrics, plots) as a DVC experiment with `dvc exp save`, together with
reports/run.json (how the run went: its name, Prefect flow run, git commit, wall time), so
`dvc exp show` and `dvc exp diff` list and compare the runs as DVC users expect.

A failed run cannot be a DVC experiment: DVC deletes a stage's outputs before it runs it,
and `dvc exp save` refuses a workspace whose outputs are missing. So every run, completed
or failed (with the stage and the error), is also appended to reports/runs.jsonl, and a
failed one says there why it has no experiment.

Both files stay out of git (they change every run, and the registry's commits must not: a
run that changes nothing keeps its version); the experiment carries reports/run.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
from html import escape
from pathlib import Path
from typing import Any

from lmops.artifacts import DistillReport, Metrics, RunRecord, StageCost
from lmops.errors import LmopsError
from lmops.registry import is_git_repo
from lmops.stages import (
    DISTILL_METRICS,
    EXPERIMENTS_PAGE_DIR,
    FINETUNE_LIVE,
    FINETUNE_METRICS,
    cost_path,
)

log = logging.getLogger(__name__)

RUN_RECORD = Path(RunRecord.FILE)
RUN_LOG = Path("reports/runs.jsonl")
PAGE = EXPERIMENTS_PAGE_DIR / "index.html"  # lmops exp show's comparison, served as is


def experiment_name(flow_run_name: str | None, started: str) -> str:
    """A name git accepts as a ref and a person can read: the UTC start and the flow run's
    own name (Prefect's two words), e.g. 20261207-173512-crimson-lemur."""
    stamp = re.sub(r"[^0-9]", "", started[:19])
    stamp = f"{stamp[:8]}-{stamp[8:14]}"
    words = re.sub(r"[^a-z0-9-]+", "-", (flow_run_name or "run").lower()).strip("-")
    return f"{stamp}-{words or 'run'}"


def run_dvc(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `root`, output captured, DVC's analytics off."""
    return subprocess.run(
        [dvc_executable(), *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        timeout=timeout,
    )


def dvc_executable() -> str:
    """The dvc of this environment (a Prefect worker's PATH may not have the venv's)."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def record(root: Path, run: RunRecord) -> str | None:
    """Write reports/run.json, save a completed run as the DVC experiment `run.name`, and
    append the run to reports/runs.jsonl. Returns the experiment's name, or None where there
    is none (a failed run, not a DVC project in git, or DVC's own error, logged): recording
    never fails the run it records."""
    try:
        run.write(root / RUN_RECORD)
    except OSError as err:  # a full or read-only disk: said, and the run's own result stands
        log.warning("run %s not recorded: %s", run.name, err)
        return None
    saved = _save(root, run) if run.status == "completed" else None
    entry = run.model_copy(update={"experiment": saved}) if saved else run
    try:
        with (root / RUN_LOG).open("a", encoding="utf-8") as runs:
            runs.write(entry.model_dump_json(exclude_none=True) + "\n")
    except OSError as err:
        log.warning("run %s not appended to %s: %s", run.name, RUN_LOG, err)
    return saved


def _save(root: Path, run: RunRecord) -> str | None:
    if not (root / ".dvc").is_dir() or not is_git_repo(root):
        log.warning(
            "%s is not a DVC project in git: run %s not saved as an experiment", root, run.name
        )
        return None
    # One save at a time per git repository: a parallel sweep's lanes (lmops/sweep.py
    # worktree) share it, and DVC's exp save goes through refs all checkouts share.
    with _repository_lock(root):
        return _save_locked(root, run)


def _repository_lock(root: Path) -> Any:
    from filelock import FileLock

    common = subprocess.run(
        ["git", "rev-parse", "--git-common-dir"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    return FileLock((root / common / "lmops-exp-save.lock").resolve())


def _save_locked(root: Path, run: RunRecord) -> str | None:
    result = run_dvc(
        root,
        *("exp", "save", "--name", run.name),
        # The record, and the training curves where git does not track them yet.
        *("--include-untracked", str(RUN_RECORD)),
        *("--include-untracked", str(FINETUNE_LIVE)),
        timeout=300,
    )
    if result.returncode != 0:
        log.warning("run %s not saved as a DVC experiment: %s", run.name, result.stderr.strip())
        return None
    log.info("run %s saved as a DVC experiment", run.name)
    return run.name


def run_metrics(root: Path, stages: list[str]) -> dict[str, dict[str, float]]:
    """What runs are compared on, from the stages' own reports: `val` is the served model on
    validation (what a sweep chooses on), `test` the evaluate stage's figures (reported,
    never chosen on), `seconds` each stage's wall time when it last computed."""
    finetune = json.loads((root / FINETUNE_METRICS).read_text("utf-8"))
    channel = finetune.get("ngram_channel") or {}
    val = {
        "accuracy": channel.get("val_accuracy_combined", finetune["val_accuracy"]),
        "transformer_accuracy": finetune["val_accuracy"],
        "loss": finetune["val_loss"],
    }
    distilled = DistillReport.read(root / DISTILL_METRICS)
    if distilled.served == "student" and distilled.student_val_accuracy is not None:
        val["accuracy"] = distilled.student_val_accuracy
    metrics = Metrics.read(root / Metrics.FILE)
    paired = metrics.gates.beats_baseline.paired
    test = {
        "accuracy": metrics.model.accuracy,
        "macro_f1": metrics.model.macro_f1,
        "roc_auc": metrics.model.roc_auc,
        "ece": metrics.model.ece,
        "baseline_accuracy": metrics.baseline.accuracy,
        "margin": paired.difference,
        "margin_ci_low": paired.ci_low,
        "margin_ci_high": paired.ci_high,
    }
    seconds = {}
    for stage in stages:
        cost = root / cost_path(stage)
        if cost.is_file():
            seconds[stage] = StageCost.read(cost).wall_seconds
    return {"val": val, "test": test, "seconds": seconds}


def saved_runs(root: Path) -> list[RunRecord]:
    """Every run saved as a DVC experiment, on any commit, as its reports/run.json holds it
    (read through `dvc exp show`, so what DVC lists is what is compared)."""
    result = run_dvc(root, "exp", "show", "--all-commits", "--json")
    if result.returncode != 0:
        raise LmopsError(f"dvc exp show failed: {result.stderr.strip()}")
    runs = []
    for baseline in json.loads(result.stdout or "[]"):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                record = ((rev.get("data") or {}).get("metrics") or {}).get(str(RUN_RECORD))
                if record and "data" in record:
                    run = RunRecord.model_validate(record["data"])
                    found = {"experiment": rev.get("name"), "experiment_rev": rev.get("rev")}
                    runs.append(run.model_copy(update=found))
    return runs


def flat(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"val": {"accuracy": x}} -> {"val.accuracy": x}."""
    return {f"{part}.{name}": v for part, values in metrics.items() for name, v in values.items()}


def config_key(config: dict[str, Any]) -> str:
    """A config as one line a person reads: `finetune.learning_rate=0.0001, model.layers=2`."""
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(config.items())) or "-"


def compare(
    runs: list[RunRecord], rank: str, lower_is_better: bool = False
) -> list[dict[str, Any]]:
    """The runs grouped by config (seeds pooled), each metric's mean and standard deviation,
    ranked on the validation metric `rank`, best first.

    Choosing reads validation only: `rank` must be a `val.` metric, and the ranking is made
    before any test figure is looked at; the caller shows test only for the first group."""
    if not rank.startswith("val."):
        raise LmopsError(
            f"--rank {rank}: rank on a validation metric (val.accuracy, val.loss, ...); test "
            "figures are reported for the chosen config, never chosen on"
        )
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        if run.status == "completed" and run.metrics:
            groups.setdefault(run.label or config_key(run.config), []).append(run)
    if not groups:
        raise LmopsError("no completed experiments to compare (lmops run or lmops sweep first)")
    known = {name for mine in groups.values() for run in mine for name in flat(run.metrics)}
    if rank not in known:
        shown = ", ".join(sorted(name for name in known if name.startswith("val.")))
        raise LmopsError(f"--rank {rank}: not a validation metric of these runs ({shown})")
    table = []
    for key, mine in groups.items():
        values: dict[str, list[float]] = {}
        for run in mine:
            for name, value in flat(run.metrics).items():
                values.setdefault(name, []).append(value)
        table.append(
            {
                "config": key,
                "seeds": sorted(run.seed for run in mine if run.seed is not None),
                "experiments": sorted(run.experiment or run.name for run in mine),
                "metrics": {name: _stats(v) for name, v in values.items()},  # stage order
            }
        )
    sign = 1 if lower_is_better else -1
    worst = {"mean": sign * float("inf")}  # a config without the metric ranks last
    table.sort(key=lambda group: sign * group["metrics"].get(rank, worst)["mean"])
    return table


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _cell(
    stats: dict[str, float] | None, scale: float = 1.0, digits: int = 4, sign: str = ""
) -> str:
    if stats is None:
        return "-"
    spread = f" ± {stats['std'] * scale:.{digits}f}" if stats["n"] > 1 else ""
    return f"{stats['mean'] * scale:{sign}.{digits}f}{spread}"


def markdown(table: list[dict[str, Any]], rank: str) -> list[str]:
    """The comparison as markdown: every config's validation metrics and stage seconds,
    best first on `rank`; then the chosen config's test figures, labelled as reported."""
    val_names = sorted({n for g in table for n in g["metrics"] if n.startswith("val.")})
    lines = [
        f"Ranked on {rank} (mean ± std over seeds), best first.",
        "",
        "| # | config | seeds | " + " | ".join(val_names) + " | seconds (all stages) |",
        "|---:|---|---|" + "---:|" * len(val_names) + "---:|",
    ]
    for number, group in enumerate(table, start=1):
        metrics = group["metrics"]
        seconds = [m["mean"] for n, m in metrics.items() if n.startswith("seconds.")]
        lines.append(
            f"| {number} | {group['config']} | {', '.join(map(str, group['seeds'])) or '-'} | "
            + " | ".join(_cell(metrics.get(n)) for n in val_names)
            + f" | {sum(seconds):,.0f} |"
        )
    chosen = table[0]["metrics"]
    margin, low, high = (
        chosen.get(f"test.{n}") for n in ("margin", "margin_ci_low", "margin_ci_high")
    )
    lines += [
        "",
        f"Chosen on validation: **{table[0]['config']}**. Its test figures, reported, not "
        "chosen on:",
        "",
        "| test metric | mean ± std |",
        "|---|---:|",
        *(
            f"| {n.removeprefix('test.')} | {_cell(m)} |"
            for n, m in chosen.items()
            if n.startswith("test.") and not n.startswith("test.margin")
        ),
    ]
    if margin is not None:
        lines.append(
            f"| margin over the baseline (points; paired 95% interval, mean of its ends) | "
            f"{_cell(margin, 100, 2, '+')} [{low['mean'] * 100:+.2f}, {high['mean'] * 100:+.2f}] |"
        )
    stage_seconds = ", ".join(
        f"{n.removeprefix('seconds.')} {m['mean']:,.1f}"
        for n, m in chosen.items()
        if n.startswith("seconds.")
    )
    return [*lines, "", f"Stage seconds of the chosen config (mean): {stage_seconds}."]


def page(table: list[dict[str, Any]], rank: str, title: str, curves: str = "") -> str:
    """The same comparison as a static page (no script, nothing loaded from outside), with
    `curves` (a picture's data: URI, from loss_curves) under it."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render("\n".join(markdown(table, rank)))
    if curves:
        body += (
            "<h2>Fine-tuning loss of the chosen config, one line a seed</h2>"
            f'<img alt="fine-tuning loss of the chosen config\'s runs" src="{curves}">'
        )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lmops — {escape(title)}</title><style>body{{font-family:sans-serif;"
        "margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        f"</style></head><body><h1>{escape(title)}</h1>{body}</body></html>\n"
    )


def loss_curves(root: Path, runs: list[RunRecord]) -> str:
    """The fine-tuning loss of `runs` (DVCLive's, as each experiment's commit holds it),
    overlaid, smoothed over 20 steps, as a PNG data: URI; "" when none is found."""
    import base64
    import io

    series = {}
    for run in runs:
        shown = subprocess.run(
            ["git", "show", f"{run.experiment_rev}:{FINETUNE_LIVE}/plots/metrics/train/loss.tsv"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        rows = [line.split("\t") for line in shown.stdout.splitlines()[1:]]
        if shown.returncode == 0 and rows:
            series[f"seed {run.seed}" if run.seed is not None else run.name] = [
                float(loss) for _, loss in rows
            ]
    if not series:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    for label, losses in sorted(series.items()):
        window = min(20, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(np.arange(len(smooth)) + window - 1, smooth, label=label)
    axes.set(xlabel="step", ylabel="training loss (mean of 20 steps)")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def apply(root: Path, name: str) -> RunRecord:
    """Put experiment `name` (a completed run) into the workspace: its params, dvc.lock and
    outputs, from the DVC cache (`dvc exp apply`), ready to be registered."""
    runs = {run.experiment: run for run in saved_runs(root)}
    if name not in runs:
        known = ", ".join(sorted(n for n in runs if n)) or "none"
        raise LmopsError(f"no experiment {name!r} (dvc exp show lists: {known})")
    result = run_dvc(root, "exp", "apply", name)
    if result.returncode != 0:
        raise LmopsError(f"dvc exp apply {name} failed: {result.stderr.strip()}")
    return runs[name]
