"""The `lmops` command line: one Typer app whose --help is the reference.

Errors a user can cause print as one line (`error: ...`) with a non-zero exit; heavy
libraries are imported inside the command that needs them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from lmops.errors import LmopsError

app = typer.Typer(
    help="lmops: data → validated data → model → ONNX → served, orchestrated by Prefect "
    "and versioned by DVC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LmopsError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _log_to_console() -> None:
    """Our packages log at INFO on stderr; libraries stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("lmops").setLevel(logging.INFO)


ProfileOption = Annotated[
    str | None, typer.Option("--profile", "-p", help="Named override set from profiles/.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one param, e.g. data.split.seed=3 (repeatable)."),
]


@app.command()
@_user_errors
def run(profile: ProfileOption = None, set_: SetOption = None) -> None:
    """Run the training flow (Prefect) over every stage; DVC skips what is up to date.

    The profile and --set overrides are written into params.yaml first, as
    `dvc exp run --set-param` does, so dvc.lock records what the run used.
    """
    from lmops.config import override, parse_params, read_raw, resolve_overrides

    root = Path.cwd()
    # Bad params fail here, in one line, before a Prefect server is even started.
    params = parse_params(override(read_raw(root), resolve_overrides(root, profile, set_ or [])))
    if params.model.init_from is not None:
        from lmops.bases import builtin_name

        builtin_name(params.model.init_from)  # an unknown builtin: one line, before Prefect
    if params.evaluate.gates.relax_baseline:
        typer.echo(
            "WARNING: evaluate.gates.relax_baseline is true: the baseline gate is RELAXED, so "
            "this run can promote a model that does not beat TF-IDF + LR. Only the `tiny` "
            "smoke-test profile should do this.",
            err=True,
        )
    from lmops.flows.training import training

    result = _prefect_run(
        lambda: training(profile=profile, overrides=set_ or [], project_dir=str(root))
    )
    _print_summary(result)


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise LmopsError(f"--seeds {text!r}: expected integers separated by commas") from None


@app.command()
@_user_errors
def sweep(
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="A sweep definition (YAML: profile, configs, grid, seeds, seed_key), e.g. "
            "bench/sweeps/recipes.yaml; the options below add to it or replace its values.",
        ),
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option(help="Only this named config of the file (repeatable)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="A grid axis, e.g. finetune.learning_rate=1e-4,5e-4 (repeatable; brackets "
            "keep a list whole: pretrain.texts=[corpus],[corpus,train]).",
        ),
    ] = None,
    seeds: Annotated[
        str | None, typer.Option(help="Seeds each grid point runs with, e.g. 0,1,2.")
    ] = None,
    seed_key: Annotated[
        str | None,
        typer.Option(help="The param the seeds go to (default: data.split.seed, the split)."),
    ] = None,
    profile: ProfileOption = None,
    name: Annotated[
        str | None,
        typer.Option(help="The sweep's name (default: one derived from its definition)."),
    ] = None,
    rank: Annotated[
        str, typer.Option(help="The validation metric the report ranks on.")
    ] = "val.accuracy",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Points run at once, each lane in its own git worktree sharing the DVC cache.",
        ),
    ] = 1,
) -> None:
    """Run a grid over params and seeds, each point a DVC experiment, one after another (or
    in --workers parallel lanes).

    Resumable: the points of the same sweep that have an experiment are skipped, so a
    killed sweep started again runs only the rest, and DVC's run cache shares every stage a
    point leaves unchanged. The points are not registered (lmops promote --experiment).
    """
    from lmops.config import override, parse_params, read_raw, resolve_overrides
    from lmops.sweep import Definition, grid

    root = Path.cwd()
    spec = Definition.read(file) if file is not None else Definition()
    if config:
        unknown = sorted(set(config) - set(spec.configs))
        if unknown:
            raise LmopsError(f"--config {unknown}: not in {file} ({', '.join(spec.configs)})")
        spec = spec.model_copy(update={"configs": {n: spec.configs[n] for n in config}})
    given = {
        "profile": profile,
        "seeds": _seeds(seeds),
        "seed_key": seed_key,
        "grid": {**spec.grid, **grid(set_ or [])},
    }
    spec = spec.model_copy(update={k: v for k, v in given.items() if v is not None})
    points = spec.points()
    raw = read_raw(root)
    for point in points:  # every point's params are valid before anything runs
        sets = point.sets(spec.seed_key)
        parse_params(override(raw, resolve_overrides(root, spec.profile, sets)))
    name = name or spec.name()
    _log_to_console()
    from lmops.flows.sweep import sweep as sweep_flow

    result = _prefect_run(
        lambda: sweep_flow(
            definition=spec.model_dump(), name=name, project_dir=str(root), workers=workers
        )
    )
    typer.echo(
        f"sweep {name}: {result['points']} points, {result['done_before']} done before, "
        f"{len(result['ran'])} ran, {len(result['failed'])} failed"
    )
    _show_experiments(root, name, rank, lower_is_better=False)
    if result["failed"]:
        failed = "; ".join(result["failed"])
        raise LmopsError(f"sweep {name}: failed points (reports/runs.jsonl has why): {failed}")


exp_app = typer.Typer(help="Experiments: every run, compared.", no_args_is_help=True)
app.add_typer(exp_app, name="exp")


@exp_app.command("show")
@_user_errors
def exp_show(
    sweep_name: Annotated[
        str | None, typer.Option("--sweep", help="Only this sweep's points.")
    ] = None,
    rank: Annotated[
        str, typer.Option(help="The validation metric to rank on (val.accuracy, val.loss).")
    ] = "val.accuracy",
    lower_is_better: Annotated[
        bool, typer.Option(help="Rank the lowest first (for a loss).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the groups, every metric's mean and std.")
    ] = False,
) -> None:
    """Group the experiments by config, mean ± std over seeds, ranked on validation; test
    figures for the chosen config only. Also writes reports/experiments/index.html."""
    _show_experiments(Path.cwd(), sweep_name, rank, lower_is_better, as_json)


def _show_experiments(
    root: Path, sweep_name: str | None, rank: str, lower_is_better: bool, as_json: bool = False
) -> None:
    import json

    from lmops import experiments

    runs = [r for r in experiments.saved_runs(root) if sweep_name in (None, r.sweep)]
    table = experiments.compare(runs, rank, lower_is_better)
    title = f"experiments of {sweep_name}" if sweep_name else "experiments"
    out = root / experiments.PAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen = [r for r in runs if (r.experiment or r.name) in table[0]["experiments"]]
    curves = experiments.loss_curves(root, chosen)
    out.write_text(experiments.page(table, rank, title, curves), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(table, indent=2))
        return
    typer.echo("\n".join(experiments.markdown(table, rank)))
    typer.echo(f"\npage: {out.relative_to(root)} (lmops serve: /{experiments.PAGE.parent}/)")


def _print_summary(result: dict[str, Any]) -> None:
    from lmops.artifacts import DataManifest, ExportManifest, Metrics

    manifest = DataManifest.model_validate(result["manifest"])
    rows = manifest.rows
    typer.echo("\nlmops run finished")
    for stage in result["stages"]:
        typer.echo(f"  {stage['stage']:<10} {'ran' if stage['ran'] else 'up to date, skipped'}")
    labelled, corpus = manifest.labelled, manifest.corpus
    unique = rows["train"] + rows["val"] + rows["test"]
    typer.echo(
        f"  labelled   {labelled.spec}: {labelled.rows_read:,} rows read, {unique:,} unique "
        f"kept (train {rows['train']:,} / val {rows['val']:,} / test {rows['test']:,}); dropped "
        + ", ".join(f"{n:,} {reason}" for reason, n in labelled.dropped.items())
    )
    typer.echo(
        f"  corpus     {corpus.spec}: {corpus.rows_read:,} docs read, {rows['corpus']:,} "
        "kept; dropped " + ", ".join(f"{n:,} {reason}" for reason, n in corpus.dropped.items())
    )
    typer.echo("  data       data/validated/ (manifest.json has counts and hashes)")
    typer.echo(f"  validation {result['data_docs']}")
    if result.get("labels"):
        from lmops.artifacts import LabelIssuesReport

        found = LabelIssuesReport.model_validate(result["labels"])
        typer.echo(
            "  labels     "
            + found.line().removeprefix("- label issues: ")
            + " (lmops labels; reports/labels/index.html)"
        )
    typer.echo("  model      models/finetuned/ (pretrained LM: models/pretrained/)")
    typer.echo(f"  card       {result['model_card']}")
    exported = ExportManifest.model_validate(result["export"])
    refused = "".join(f"; {name} not published: {why}" for name, why in exported.refused.items())
    typer.echo(f"  onnx       models/onnx/ ({', '.join(exported.variants)}{refused})")
    typer.echo("  metrics    reports/metrics.json (dvc metrics show; dvc plots show)")
    registered, promoted = result["registered"], result["promotion"]
    if registered is None:
        typer.echo("  registry   not a git repository: the model was not registered")
    else:
        typer.echo(
            f"  registry   {registered['version']}"
            + (" (newly registered)" if registered["new"] else " (already registered)")
            + (f"; {_promotion_verdict(promoted)}: {promoted['why']}" if promoted else "")
            + " (lmops models)"
        )
        if promoted and promoted["promoted"]:
            typer.echo(
                "  serve      lmops serve --stage prod (follows prod; make serve: models/onnx/)"
            )
        else:
            typer.echo(
                "  serve      this model is not in prod: make serve serves models/onnx/ (this "
                "run's export); lmops serve --stage prod serves prod, if there is one"
            )
    if result.get("experiment"):
        typer.echo(f"  experiment {result['experiment']} (dvc exp show)")
    typer.echo("")
    metrics = Metrics.model_validate(result["metrics"])
    typer.echo(metrics.markdown())
    if not metrics.gates.beats_baseline.passed and not metrics.gates.beats_baseline.relaxed:
        typer.echo("\n" + _why_not_prod(labelled.spec, metrics.label_issues))


def _why_not_prod(spec: str, label_issues: Any = None) -> str:
    """One paragraph for a run that ends with no model in prod because the baseline won,
    with what the labels stage found on test when it checked it."""
    from lmops.sources import BUILTINS

    builtin = BUILTINS.get(spec.removeprefix("builtin:"))
    known = builtin.known_ceiling if builtin else None
    return (
        "**Why no model went to prod**: the gate keeps a model that does not beat TF-IDF + LR "
        "out of prod, and it is never relaxed. "
        + (
            f"{known[0].upper()}{known[1:]}. "
            if known
            else "A pretrained base (model.init_from), more data or more compute may change "
            "that; bench/recipes.py compares recipes on validation over split seeds. "
        )
        + (
            f"The labels stage flags {label_issues.test_flagged:,} test rows as likely "
            f"mislabelled; on the others the model scores {label_issues.accuracy_unflagged:.4f} "
            f"and the baseline {label_issues.baseline_accuracy_unflagged:.4f} (lmops labels). "
            if label_issues is not None
            else ""
        )
        + "The model is registered all the same (lmops models), and make serve serves this "
        "run's export."
    )


@app.command()
@_user_errors
def stage(name: Annotated[str, typer.Argument(help="Stage name, as in dvc.yaml.")]) -> None:
    """Run one stage from params.yaml: what each stage's `cmd` in dvc.yaml calls."""
    from lmops.config import load_params
    from lmops.tasks.stages import STAGES, run_stage

    if name not in STAGES:
        raise LmopsError(f"unknown stage {name!r} (known: {', '.join(STAGES)})")
    _log_to_console()
    run_stage(name, load_params(Path.cwd()), Path.cwd())


def _prefect_run(call: Callable[[], Any]) -> Any:
    """Run a flow in this process; a failed flow run becomes one `error:` line."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.exceptions import FailedRun

    try:
        return call()
    except FailedRun as failed:
        raise LmopsError(str(failed)) from None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command()
@_user_errors
def models(
    history: Annotated[
        bool, typer.Option("--history", help="Every registration and stage assignment.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    url: Annotated[
        str | None,
        typer.Option(
            help="A running server (http://HOST:PORT): print the version it really serves "
            "beside the registry's stages; exit 1 when it serves another than its stage names."
        ),
    ] = None,
) -> None:
    """List the registered model versions (GTO tags), their stages and test metrics."""
    import json

    from lmops import registry

    root = Path.cwd()
    if url is not None:
        _served(root, url)
        return
    rows = registry.history(root) if history else registry.versions(root)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    elif not rows:
        typer.echo(f"no version of {registry.ARTIFACT} registered yet (run `lmops run`)")
    elif history:
        typer.echo(f"{'when (UTC)':<26} {'event':<13} {'version':<9} {'stage':<8} by / why")
        for e in rows:
            figures = ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in e["metrics"].items()
                if not isinstance(v, dict)
            )
            typer.echo(
                f"{e['when']:<26} {e['event']:<13} {e['version']:<9} {e['stage'] or '-':<8} "
                f"{e['by']}: {e['why']}" + (f" [{figures}]" if figures else "")
            )
    else:
        typer.echo(
            f"{'version':<9} {'stages':<14} {'accuracy':>8} {'macro-F1':>8} {'baseline':>8} "
            f"{'gates':<6} {'commit':<12} registered (UTC)           by"
        )
        for r in rows:
            gates = {True: "passed", False: "FAILED", None: "-"}[r["gates_passed"]]
            typer.echo(
                f"{r['version']:<9} {','.join(r['stages']) or '-':<14} {_fmt(r['accuracy']):>8} "
                f"{_fmt(r['macro_f1']):>8} {_fmt(r['baseline_accuracy']):>8} {gates:<6} "
                f"{r['commit'][:12]:<12} {r['registered']:<26} {r['by']}"
            )


def _served(root: Path, url: str) -> None:
    """The registry's stages beside what the server at `url` serves."""
    import httpx

    from lmops import registry
    from lmops.client import api_headers
    from lmops.config import load_params

    name = load_params(root).serve.model_name
    stages = {stage: registry.stage_version(root, stage) for stage in registry.REGISTRY_STAGES}
    typer.echo("registry: " + ", ".join(f"{s} {v or '-'}" for s, v in stages.items()))
    try:
        response = httpx.get(
            f"{url.rstrip('/')}/v2/models/{name}", headers=api_headers(), timeout=10
        )
        response.raise_for_status()
    except httpx.HTTPError as err:
        raise LmopsError(f"cannot ask the server at {url} what it serves: {err}") from None
    metadata = response.json()
    (served,) = metadata["versions"]
    following = metadata["parameters"].get("following")
    if following is None:
        typer.echo(f"server {url}: serves {served} (serve.model_dir; it follows no stage)")
        return
    stage, wanted = following["stage"], following["version"]
    in_sync = following["in_sync"] and stages.get(stage) in (None, served)
    if in_sync:
        typer.echo(f"server {url}: serves {served}, the version {stage} names: in sync")
    else:
        why = following["problem"] or "its next poll has not seen the registry's change yet"
        typer.echo(
            f"server {url}: serves {served}, but {stage} names {stages.get(stage) or wanted}: "
            f"OUT OF SYNC ({why})"
        )
    if (challenger := metadata["parameters"].get("challenger")) is not None:
        typer.echo(_challenger_line(challenger))
    if not in_sync:
        raise typer.Exit(1)


def _challenger_line(status: dict[str, Any]) -> str:
    """What the server's challenger (`--challenger`) has seen, in one line."""
    shadow, canary = status["shadow"], status["canary"]
    line = f"challenger from {status['stage']}: {status['version'] or 'NOT LOADED'}"
    if shadow["texts"]:
        estimated = shadow["estimated_accuracy"]
        line += (
            f"; shadow {shadow['texts']:,} texts, agreement {shadow['agreement']:.3f}, "
            f"estimated accuracy {estimated['challenger']:.3f} vs prod {estimated['prod']:.3f}"
        )
    if canary["share"]:
        line += f"; canary {canary['share']:.0%}" + (
            f" SWITCHED OFF: {canary['switched_off']}" if canary["switched_off"] else " on"
        )
    return line


def _promotion_verdict(promoted: dict[str, Any]) -> str:
    if promoted["promoted"]:
        return "PROMOTED to prod"
    return "in staging, waiting for live evidence" if promoted.get("staged") else "not promoted"


@app.command()
@_user_errors
def promote(
    version: Annotated[
        str | None, typer.Argument(help="Version to promote (default: the newest registered).")
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            help="Register this DVC experiment (a sweep's point: lmops exp show) as a new "
            "version first, then promote it."
        ),
    ] = None,
) -> None:
    """Run the promotion flow: VERSION against prod on the same test split; staging then
    prod when every gate passes. Exit code 1 when a gate fails (nothing changes then)."""
    from lmops import registry
    from lmops.flows.promotion import promotion

    _log_to_console()
    if experiment is not None:
        if version is not None:
            raise LmopsError("give a VERSION or --experiment, not both")
        from lmops.flows.training import register_experiment

        by = registry.user_actor()
        version = _prefect_run(
            lambda: register_experiment(experiment, project_dir=str(Path.cwd()), by=by)
        )
        typer.echo(f"experiment {experiment} registered as {version}")
    result = _prefect_run(
        lambda: promotion(version=version, project_dir=str(Path.cwd()), by=registry.user_actor())
    )
    if "report" in result:
        typer.echo(result["report"] + "\n")
    if result["promoted"]:
        typer.echo(f"promoted {result['version']} to prod (via staging): {result['why']}")
    elif result.get("staged"):
        typer.echo(f"{result['version']} to staging: {result['why']}")
    elif result.get("failed_gates"):
        raise LmopsError(f"{result['version']} not promoted, {result['why']}")
    else:
        typer.echo(result["why"])


@app.command()
@_user_errors
def rollback() -> None:
    """Assign prod back to the previous prod version (recorded in the history)."""
    from lmops import registry
    from lmops.config import load_params
    from lmops.workspace import workspace_lock

    root = Path.cwd()
    who = registry.user_actor()
    with workspace_lock(root, load_params(root).orchestration.lock_timeout_minutes, who):
        current = registry.stage_version(root, "prod")
        previous = registry.previous_prod(root)
        if current is None or previous is None:
            raise LmopsError(
                f"nothing to roll back to: prod is {current or 'unassigned'} and no earlier "
                "version was ever in prod"
            )
        registry.assign(root, previous, "prod", who, f"rollback from {current}", force=True)
    typer.echo(f"prod: {current} -> {previous}")


@app.command()
@_user_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serve.port).")] = None,
    stage: Annotated[
        str | None,
        typer.Option(
            help="Serve the version in this registry stage (e.g. prod) instead of "
            "serve.model_dir, and hot-swap to a new one when the stage moves (polled every "
            "serve.poll_seconds)."
        ),
    ] = None,
    challenger: Annotated[
        str | None,
        typer.Option(
            help="With --stage: also load the version in this stage (e.g. staging) beside it, "
            "scoring serve.shadow.share of requests in the shadow and answering "
            "serve.canary.share of them (followed like --stage)."
        ),
    ] = None,
) -> None:
    """Serve the exported model with ONNX Runtime: /v1/predict, /v2 (Open Inference
    Protocol), /metrics. CUDA when ONNX Runtime really has it, CPU otherwise."""
    from lmops.config import load_params
    from lmops.engine import Engine
    from lmops.serving.app import create_app, run_server
    from lmops.serving.auth import check_exposure, load_keys
    from lmops.serving.swap import Following

    _log_to_console()
    root = Path.cwd()
    params = load_params(root)
    cfg = params.serve
    keys = load_keys(cfg.auth, root)
    check_exposure(cfg.auth, keys, host or cfg.host)
    if challenger is not None and (stage is None or challenger == stage):
        raise LmopsError(
            "--challenger needs --stage, and another stage: the challenger is compared with "
            "the version --stage serves"
        )
    if stage is None:
        follow = None
        engine = Engine(root / cfg.model_dir, cfg.require_gpu, cfg.max_batch_size, cfg.threads)
    else:
        from lmops.registry import ensure_remote, stage_resolver
        from lmops.serving import stage as stage_serving

        resolve = stage_resolver(root, stage)  # checks the stage's name first
        # A clone with an empty cache pulls the version from the remote registrations push to.
        ensure_remote(root, params.registry.remote)
        load = stage_serving.loader(root, cfg)
        engine, wanted, problem = stage_serving.start(root, stage, load)
        follow = Following(resolve, load, stage, wanted, problem)
    challenger_engine, challenger_follow = None, None
    if challenger is not None:
        # Shadow only: one thread (at the lowest priority, serving/challenger.py), so that
        # prod keeps the cores; as a canary it answers callers, with prod's threads.
        threads = cfg.threads if cfg.canary.share > 0 else 1
        challenger_load = stage_serving.loader(root, cfg, threads)
        challenger_engine, challenger_follow = stage_serving.start_challenger(
            stage_resolver(root, challenger), challenger, challenger_load
        )
    following = "" if stage is None else f", following stage {stage}"
    if follow is not None and follow.problem:
        following += f" — FALLBACK: {follow.problem}"
    if challenger_follow is not None:
        mode = f"canary {cfg.canary.share:.0%}, " if cfg.canary.share > 0 else ""
        following += (
            f"; challenger {challenger_engine.version if challenger_engine else 'NOT LOADED'} "
            f"from {challenger} ({mode}shadow {cfg.shadow.share:.0%})"
        )
    typer.echo(
        f"serving {cfg.model_name} {engine.version} ({engine.variant}) on {engine.providers}"
        + following,
        err=True,
    )
    run_server(
        create_app(
            cfg,
            engine,
            root,
            follow,
            root / params.monitor.reports_dir,
            challenger_follow,
            challenger_engine,
            keys,
        ),
        host or cfg.host,
        cfg.port if port is None else port,
        cfg.drain_seconds,
        cfg.tls,
    )


@app.command()
@_user_errors
def monitor(
    traffic: Annotated[
        Path | None,
        typer.Option(help="A traffic log file, or a folder of them (default: serve.traffic.dir)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """A drift report now (Evidently): the traffic window against the data the served
    model was tested on. Writes reports/drift/<UTC time>/ and adds the run to the
    Evidently workspace (make monitor-ui). Exit code 0 with or without drift, and when
    there is too little traffic yet (status not_enough_data, no report)."""
    import contextlib
    import json

    from lmops.config import load_params
    from lmops.tasks import monitor as drift

    _log_to_console()
    root = Path.cwd()
    # Only the result goes to stdout: whatever the libraries print goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        summary = drift.run_project(root, load_params(root), traffic)
    typer.echo(
        json.dumps(summary, indent=2, ensure_ascii=False)
        if as_json
        else drift.format_summary(summary)
    )


@app.command("feedback")
@_user_errors
def feedback_command(
    file: Annotated[
        Path | None,
        typer.Argument(
            help='True labels: JSON Lines of {"request_id": ..., "labels": [...]}, or a CSV '
            "with request_id and label columns (one row per text, in order)."
        ),
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(
            help="Write every labelled logged text as a CSV for data.source: text, label and "
            "their provenance (served_label, feedback_key, feedback_at)."
        ),
    ] = None,
    with_source: Annotated[
        bool,
        typer.Option(
            "--with-source",
            help="With --export: the rows of the current data.source first, so that pointing "
            "data.source at the file retrains on the old data plus the labelled traffic.",
        ),
    ] = False,
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            help="With --export: only feedback written by this API key (repeatable; '-' for "
            "feedback written without a key). Default: all of it.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="With --export: only feedback received at or after this ISO 8601 date or "
            "time (UTC when it has no offset)."
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="With --export: only feedback received before this date or time."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Send FILE's labels to this running server's POST /v1/feedback (with "
            "$LMOPS_API_KEY as its bearer key, waiting out 429s) instead of writing the "
            "local traffic folder."
        ),
    ] = None,
) -> None:
    """Delayed labels, joined to the traffic log by request id (as POST /v1/feedback does):
    each id is stored or refused with its reason; exit 1 if any was refused (the others
    are kept). The monitor then reports the realized accuracy beside the estimate."""
    from lmops import feedback
    from lmops.artifacts import ExportManifest
    from lmops.config import load_params
    from lmops.tasks.monitor import reference_model

    if file is None and export is None:
        raise LmopsError("give a FILE of labels to store, or --export OUT.csv (or both)")
    if export is None and (key or since or until):
        raise LmopsError("--key, --since and --until choose what --export writes: give --export")
    selection = feedback.Selection(
        keys=frozenset(None if name == "-" else name for name in key) if key else None,
        since=None if since is None else feedback.parse_instant(since, "--since"),
        until=None if until is None else feedback.parse_instant(until, "--until"),
    )
    root = Path.cwd()
    params = load_params(root)
    traffic_dir = root / params.serve.traffic.dir
    refused = 0
    if url is not None and (file is None or export is not None):
        raise LmopsError("--url sends a FILE of labels to a server: give FILE, without --export")
    if file is not None:
        if not file.is_file():
            raise LmopsError(f"no feedback file at {file}")
        if url is not None:
            from lmops.client import send_feedback

            verdicts = send_feedback(url.rstrip("/"), feedback.read_items(file))
        else:
            _, model_dir, _ = reference_model(root, params)
            labels = ExportManifest.of(model_dir).labels
            verdicts = feedback.submit(traffic_dir, feedback.read_items(file), labels, "file")
        for verdict in verdicts:
            if verdict.status != 200:
                typer.echo(f"{verdict.status} {verdict.request_id}: {verdict.detail}", err=True)
        refused = sum(v.status != 200 for v in verdicts)
        typer.echo(f"stored {len(verdicts) - refused} of {len(verdicts)} request(s)' labels")
    if export is not None:
        from lmops.sources import read_labelled

        source = read_labelled(params.data.source, root).frame if with_source else None
        written, by_key = feedback.write_export(export, traffic_dir, selection, source)
        labelled = sum(by_key.values())
        keys = ", ".join(
            f"{name or '(no key)'} {n:,}"
            for name, n in sorted(by_key.items(), key=lambda item: item[0] or "")
        )
        typer.echo(
            f"wrote {written:,} text(s) to {export}: {labelled:,} labelled from the traffic"
            + (f" ({keys})" if keys else "")
            + (f", {written - labelled:,} from {params.data.source}" if with_source else "")
        )
    if refused:
        raise typer.Exit(1)


@app.command("labels")
@_user_errors
def labels_command(
    top: Annotated[int, typer.Option(min=0, help="How many flagged rows to print.")] = 10,
    split: Annotated[
        str | None, typer.Option(help="Only this split's rows (train, val or test).")
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(
            help="Write the flagged rows as a CSV (text, label, given_label, suggested_label, "
            "confidence, split, row) whose `label` column a person corrects."
        ),
    ] = None,
    with_source: Annotated[
        bool,
        typer.Option(
            "--with-source",
            help="With --export: every validated row after the flagged ones, so that "
            "pointing data.source at the corrected file retrains on all the data.",
        ),
    ] = False,
) -> None:
    """The rows whose given label looks wrong (the labels stage's confident learning),
    most confident first; --export writes them for a person to correct."""
    from lmops.artifacts import LabelIssuesReport
    from lmops.stages import LABELS_DIR, LABELS_METRICS, VALIDATED_DIR
    from lmops.tasks.labels import SPLITS, review_table

    root = Path.cwd()
    if split is not None and split not in SPLITS:
        raise LmopsError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if not (root / LABELS_METRICS).is_file() or not (root / LABELS_DIR).is_dir():
        raise LmopsError(
            f"no label issues here ({LABELS_METRICS} or {LABELS_DIR}/ is missing): "
            "run `lmops run` (or `dvc repro labels`) first"
        )
    report = LabelIssuesReport.read(root / LABELS_METRICS)
    typer.echo(report.method)
    for check in report.splits:
        typer.echo(
            f"  {check.split:<5} {check.flagged:,} of {check.rows:,} rows flagged ("
            + ", ".join(f"{n:,} labelled {name}" for name, n in check.flagged_by_class.items())
            + ")"
            if check.checked
            else f"  {check.split:<5} not checked: {check.why_unchecked}"
        )
    # One read: the flagged rows first, every other row after them with --with-source.
    every_row = export is not None and with_source
    table = review_table(root / VALIDATED_DIR, root / LABELS_DIR, every_row=every_row)
    if split is not None:
        table = table[table["split"] == split]
    for row in table[table["given_label"].notna()].head(top).itertuples():
        text = row.text if len(row.text) <= 100 else row.text[:99] + "…"
        typer.echo(
            f"  {row.split}#{row.row}: {row.given_label} -> {row.suggested_label} "
            f"({row.confidence:.2f}): {text}"
        )
    if export is not None:
        export.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(export, index=False)
        flagged = int(table["given_label"].notna().sum())
        typer.echo(
            f"wrote {len(table):,} row(s) to {export}: {flagged:,} flagged"
            + (f", {len(table) - flagged:,} not flagged" if with_source else "")
            + "; correct the `label` column, then point data.source at the file"
        )


keys_app = typer.Typer(help="API keys of the server's restricted endpoint groups.")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
@_user_errors
def keys_new(
    name: Annotated[str, typer.Argument(help="Who holds the key (kept in feedback records).")],
    groups: Annotated[
        str | None,
        typer.Option(help="Comma-separated groups the key may use (default: every group)."),
    ] = None,
) -> None:
    """Make a strong key and add it to serve.auth.keys_file (created with mode 600); the
    key is printed once, for its holder. Without a keys file, print the
    LMOPS_API_KEYS item instead."""
    import os
    import secrets

    from lmops.config import ENDPOINT_GROUPS, load_params
    from lmops.serving.auth import load_keys

    root = Path.cwd()
    auth = load_params(root).serve.auth
    chosen = groups.split(",") if groups else []
    if unknown := sorted(set(chosen) - set(ENDPOINT_GROUPS)):
        raise LmopsError(f"unknown group(s) {unknown} (known: {', '.join(ENDPOINT_GROUPS)})")
    path = root / auth.keys_file if auth.keys_file else None
    known = (
        auth if path is not None and path.exists() else auth.model_copy(update={"keys_file": None})
    )
    if name in {key.name for key in load_keys(known, root)}:
        raise LmopsError(f"a key named {name!r} exists already")
    secret = secrets.token_urlsafe(32)
    if path is None:
        typer.echo(f"{name}={secret}")
        typer.echo("(serve.auth.keys_file is unset: add this item to LMOPS_API_KEYS)", err=True)
        return
    line = f"{name} {secret}" + (f" {','.join(chosen)}" if chosen else "") + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(line)
    load_keys(auth, root)  # the file still reads, and is still private
    typer.echo(secret)
    typer.echo(f"added key {name!r} to {path}; give it to its holder as LMOPS_API_KEY", err=True)


@app.command("simulate-traffic")
@_user_errors
def simulate_traffic(
    scenario: Annotated[
        str,
        typer.Option(
            help="in-domain: reviews of the held-out test split; shifted: sentences of "
            "review-like length from the run's corpus (movie plots by default, People's "
            "Daily news with the zh profile)."
        ),
    ],
    n: Annotated[int, typer.Option(min=1, help="How many texts to send.")] = 500,
    url: Annotated[
        str | None,
        typer.Option(
            help="The server (default: serve.host:serve.port, https with serve.tls); "
            "$LMOPS_API_KEY is sent as its bearer key."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per request.")] = 4,
    seed: Annotated[int, typer.Option(help="Which texts, in which order.")] = 0,
) -> None:
    """Send real texts to a running server's POST /v1/predict, as traffic for the monitor."""
    from lmops import simulate
    from lmops.config import load_params
    from lmops.stages import VALIDATED_DIR

    root = Path.cwd()
    cfg = load_params(root).serve
    target = (url or cfg.pages_url).rstrip("/")
    texts = simulate.scenario_texts(scenario, n, seed, root, root / VALIDATED_DIR)
    answered = simulate.send(target, texts, batch_size)
    typer.echo(
        f"{scenario}: sent {len(texts):,} texts to {target}/v1/predict, {answered:,} answered"
    )


if __name__ == "__main__":
    app()
