"""The training flow: each stage a Prefect task that asks DVC to reproduce that stage.

DVC decides run-or-skip from its content hashes and writes dvc.lock; Prefect owns
scheduling, retries, logs and the UI. So the flow and `dvc repro` are interchangeable:
after either, `dvc status` is clean and the other does no work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.states import Failed

from lmops.config import apply_overrides, resolve_overrides
from lmops.stages import (
    METRICS,
    MODEL_CARD,
    ONNX_DIR,
    STAGES,
    VALIDATED_DIR,
    VALIDATION_DOCS_DIR,
)


def _dvc_env() -> dict[str, str]:
    """The stage commands call `lmops`: make sure this interpreter's scripts are found."""
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _run_streaming(command: list[str], cwd: Path) -> tuple[str, int]:
    """Run a command, passing its output (progress bars included) through to the console
    as it comes, and return it all with the exit code."""
    process = subprocess.Popen(
        command, cwd=cwd, env=_dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    chunks = []
    while chunk := process.stdout.read1(65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        chunks.append(chunk)
    returncode = process.wait()
    return b"".join(chunks).decode("utf-8", errors="replace").strip(), returncode


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


@task(task_run_name="stage-{stage}")
def reproduce_stage(stage: str, project_dir: str) -> dict[str, Any] | State:
    """`dvc repro --single-item STAGE`: runs the stage, or skips it when nothing changed."""
    logger = get_run_logger()
    root = Path(project_dir)
    output, returncode = _run_streaming(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage], root
    )
    if returncode != 0:
        logger.error(
            "dvc repro %s failed; its last lines:\n%s", stage, "\n".join(output.splitlines()[-40:])
        )
        # A Failed state, not an exception: the reason is the user's, not a traceback's.
        return Failed(message=f"stage {stage} failed: {_reason(output)}")
    ran = "didn't change, skipping" not in output
    io = _locked(root, stage)
    logger.info(
        "%s %s\nread: %s\nwrote: %s",
        "ran" if ran else "skipped (up to date):",
        stage,
        ", ".join(io["deps"]),
        ", ".join(io["outs"]),
    )
    return {"stage": stage, "ran": ran, **io}


def _manifest_markdown(manifest: dict[str, Any], docs_index: Path, stages: list[dict]) -> str:
    rows = manifest["rows"]
    lines = [
        "# Data manifest",
        "",
        "| table | rows | content sha256 |",
        "|---|---:|---|",
        *(
            f"| {name} | {rows[name]:,} | `{manifest['content_sha256'][name][:16]}` |"
            for name in rows
        ),
        "",
        "| dropped | rows |",
        "|---|---:|",
        *(
            f"| labelled: {reason} | {n:,} |"
            for reason, n in manifest["labelled"]["dropped"].items()
        ),
        *(f"| corpus: {reason} | {n:,} |" for reason, n in manifest["corpus"]["dropped"].items()),
        "",
        f"Labels: {', '.join(manifest['labelled']['labels'])}. "
        f"Sources: `{manifest['labelled']['spec']}`, `{manifest['corpus']['spec']}`.",
        "",
        f"Validation report (Great Expectations Data Docs): [{docs_index}]({docs_index.as_uri()})",
        "",
        "| stage | result |",
        "|---|---|",
        *(f"| {s['stage']} | {'ran' if s['ran'] else 'skipped (up to date)'} |" for s in stages),
    ]
    return "\n".join(lines)


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """The test metrics beside the baseline, and the gates' verdict."""
    model, baseline, gates = metrics["model"], metrics["baseline"], metrics["gates"]
    beats = gates["beats_baseline"]
    beats_word = (
        "ok" if beats["passed"] else "relaxed by the profile" if beats["relaxed"] else "FAILED"
    )
    lines = [
        "| test metric | model | TF-IDF + LR baseline |",
        "|---|---:|---:|",
        *(
            f"| {key} | {model[key]:.4f} | {baseline[key]:.4f} |"
            for key in ("accuracy", "macro_f1", "roc_auc", "ece")
        ),
        "",
        f"Gates: **{'passed' if gates['passed'] else 'failed'}** — accuracy "
        f"{gates['min_accuracy']['value']:.4f} (minimum {gates['min_accuracy']['threshold']}: "
        f"{'ok' if gates['min_accuracy']['passed'] else 'FAILED'}); margin over the baseline "
        f"{beats['margin']:+.4f} (needed {beats['threshold']:+.4f}: "
        f"{beats_word})",
    ]
    if metrics.get("behavioural"):
        lines += [
            "",
            "Behavioural checks (pass rates): "
            + ", ".join(f"{k} {v:.3f}" for k, v in metrics["behavioural"].items()),
        ]
    if "ablation_no_pretraining" in metrics:
        gain = metrics["ablation_no_pretraining"]["pretraining_gain"]
        lines += ["", f"Pretraining is worth {gain:+.4f} accuracy (ablation from random weights)."]
    return "\n".join(lines)


@flow(name="training", log_prints=True)
def training(
    profile: str | None = None, overrides: list[str] | None = None, project_dir: str = "."
) -> dict[str, Any] | State:
    """Apply the profile and overrides to params.yaml, then reproduce every stage in order."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    _, changed = apply_overrides(root, resolve_overrides(root, profile, overrides or []))
    if changed:
        logger.info("params.yaml changed: %s", changed)
    stages = []
    for stage in STAGES:
        state = reproduce_stage(stage, str(root), return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        stages.append(state.result())
    from tasks.validate import read_manifest

    manifest = read_manifest(root / VALIDATED_DIR)
    docs_index = root / VALIDATION_DOCS_DIR / "index.html"
    create_markdown_artifact(
        key="data-manifest",
        markdown=_manifest_markdown(manifest, docs_index, stages),
        description="Row counts, drops and content hashes of the validated data",
    )
    metrics = json.loads((root / METRICS).read_text(encoding="utf-8"))
    create_markdown_artifact(
        key="evaluation",
        markdown="# Evaluation\n\n"
        + metrics_markdown(metrics)
        + f"\n\nModel card: {(root / MODEL_CARD).as_uri()}",
        description="Test metrics beside the baseline, and the gates' verdict",
    )
    export_manifest = json.loads((root / ONNX_DIR / "manifest.json").read_text(encoding="utf-8"))
    return {
        "export": export_manifest,
        "stages": stages,
        "manifest": manifest,
        "data_docs": str(docs_index),
        "metrics": metrics,
        "model_card": str(root / MODEL_CARD),
    }
