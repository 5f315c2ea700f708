"""The promotion flow: champion (prod) vs challenger, then staging → prod when every gate
passes. On a failed gate nothing in the registry changes and the report names the gate
with its numbers. The first model, with no champion, faces the absolute gates only.

With promotion.live.required, a challenger that passes goes to staging only; promoting it
again once a server has shadowed it beside prod (`lmops serve --stage prod --challenger
staging`) adds the live gates, and moves it to prod when they pass too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Failed

from lmops import registry
from lmops.artifacts import ExportManifest
from lmops.config import load_params
from lmops.errors import LmopsError
from lmops.flows.retry import task_options
from lmops.tasks import promote
from lmops.workspace import workspace_lock


def actor(by: str | None) -> str:
    """Who acts: the given user, or this flow run."""
    run = f"flow-run:{flow_run.id}" if flow_run.id else ""
    return " via ".join(part for part in (by, run) if part) or registry.user_actor()


@task
def measure_versions(root: str, challenger: str, champion: str | None) -> dict[str, Any]:
    cfg = load_params(Path(root)).promotion
    return promote.measure(Path(root), challenger, champion, cfg)


@flow(name="promotion", log_prints=True)
def promotion(
    version: str | None = None, project_dir: str = ".", by: str | None = None
) -> dict[str, Any] | State:
    """Gate VERSION (default: the newest registered) against prod and promote it if it passes."""
    try:
        return _gate_and_promote(version, Path(project_dir).resolve(), actor(by))
    except LmopsError as err:  # unknown version, no git repository, locked workspace
        return Failed(message=str(err))


def _gate_and_promote(version: str | None, root: Path, who: str) -> dict[str, Any]:
    logger = get_run_logger()
    params = load_params(root)
    with workspace_lock(root, params.orchestration.lock_timeout_minutes, who):
        challenger = version or registry.latest_version(root)
        champion = registry.stage_version(root, "prod")
        if champion == challenger:
            message = f"{challenger} is already in prod; nothing to do"
            logger.info(message)
            return {"version": challenger, "champion": champion, "promoted": False, "why": message}
        commit = registry.commit_of(root, challenger)
        orchestration = params.orchestration
        measured = measure_versions.with_options(
            **task_options(orchestration, orchestration.task_timeout_minutes)
        )(str(root), challenger, champion)
        evaluation = registry.metrics_at(root, commit)
        gates = promote.absolute_gates(
            evaluation, _manifest(root, challenger), params.export.parity
        )
        if champion:
            gates += promote.relative_gates(measured, challenger, champion, params.promotion)
        # Live evidence is asked of a challenger with a champion to compare it with, once it
        # waits in staging (where `lmops serve --challenger staging` shadows it).
        live_cfg = params.promotion.live
        wants_live = bool(champion) and live_cfg.required
        staged = registry.stage_version(root, "staging") == challenger
        live = None
        if wants_live and staged:
            live = promote.live_evidence(
                root / params.serve.traffic.dir, champion, challenger, params.promotion.confidence
            )
            gates += promote.live_gates(live, live_cfg)
        failed = [g for g in gates if not g["passed"]]
        report = promote.markdown(challenger, champion, measured, gates)
        figures = promote.key_figures(measured, challenger, gates, evaluation, live)
        to_staging_only = wants_live and not staged and not failed
        if failed:
            why = "refused: " + "; ".join(
                f"{g['gate']} {g['value']} (needed {g['threshold']})" for g in failed
            )
        elif to_staging_only:
            why = (
                f"gates passed against {champion}; in staging until it has live evidence "
                "(promotion.live.required): serve it with `lmops serve --stage prod "
                f"--challenger staging`, then `lmops promote {challenger}` again"
            )
            registry.assign(root, challenger, "staging", who, why, figures)
        else:
            why = f"gates passed against {champion or 'no champion (first model)'}"
            # Relaxed gates and what each paired comparison means ("may be noise") go on record.
            why += "".join(f"; {g['gate']}: {g['note']}" for g in gates if g["note"])
            if registry.stage_version(root, "staging") != challenger:
                registry.assign(root, challenger, "staging", who, why, figures)
            registry.assign(root, challenger, "prod", who, why, figures)
        verdict = "REFUSED" if failed else "STAGED" if to_staging_only else "PROMOTED to prod"
        logger.info("%s: %s %s", verdict, challenger, why)
        create_markdown_artifact(
            key="promotion",
            markdown=f"# Promotion: {verdict}\n\n"
            f"{report}\n\nRegistry: prod = "
            f"**{registry.stage_version(root, 'prod') or 'none'}**, staging = "
            f"**{registry.stage_version(root, 'staging') or 'none'}**. By {who}.",
            description=f"{challenger} vs {champion or 'no champion'}: gates and verdict",
        )
    return {
        "version": challenger,
        "champion": champion,
        "promoted": not failed and not to_staging_only,
        "staged": to_staging_only,
        "failed_gates": [g["gate"] for g in failed],
        "why": why,
        "gates": gates,
        "measured": measured,
        "report": report,
    }


def _manifest(root: Path, version: str) -> ExportManifest | None:
    model_dir = registry.materialize(root, version)
    return ExportManifest.of(model_dir) if (model_dir / ExportManifest.FILE).is_file() else None
