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
    for package in ("lmops", "tasks", "flows", "serving"):
        logging.getLogger(package).setLevel(logging.INFO)


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
    parse_params(override(read_raw(root), resolve_overrides(root, profile, set_ or [])))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.exceptions import FailedRun

    from flows.training import training

    try:
        result = training(profile=profile, overrides=set_ or [], project_dir=str(root))
    except FailedRun as failed:
        raise LmopsError(str(failed)) from None
    _print_summary(result)


def _print_summary(result: dict[str, Any]) -> None:
    manifest = result["manifest"]
    rows = manifest["rows"]
    typer.echo("\nlmops run finished")
    for stage in result["stages"]:
        typer.echo(f"  {stage['stage']:<10} {'ran' if stage['ran'] else 'up to date, skipped'}")
    labelled, corpus = manifest["labelled"], manifest["corpus"]
    unique = rows["train"] + rows["val"] + rows["test"]
    typer.echo(
        f"  labelled   {labelled['spec']}: {labelled['rows_read']:,} rows read, {unique:,} unique "
        f"kept (train {rows['train']:,} / val {rows['val']:,} / test {rows['test']:,}); dropped "
        + ", ".join(f"{n:,} {reason}" for reason, n in labelled["dropped"].items())
    )
    typer.echo(
        f"  corpus     {corpus['spec']}: {corpus['rows_read']:,} docs read, {rows['corpus']:,} "
        "kept; dropped " + ", ".join(f"{n:,} {reason}" for reason, n in corpus["dropped"].items())
    )
    typer.echo("  data       data/validated/ (manifest.json has counts and hashes)")
    typer.echo(f"  validation {result['data_docs']}")
    typer.echo("  model      models/finetuned/ (pretrained LM: models/pretrained/)")
    typer.echo(f"  card       {result['model_card']}")
    exported = result["export"]
    refused = "".join(f"; {name} not published: {why}" for name, why in exported["refused"].items())
    typer.echo(f"  onnx       models/onnx/ ({', '.join(exported['variants'])}{refused})")
    typer.echo("  metrics    reports/metrics.json (dvc metrics show; dvc plots show)\n")
    from flows.training import metrics_markdown

    typer.echo(metrics_markdown(result["metrics"]))


@app.command()
@_user_errors
def stage(name: Annotated[str, typer.Argument(help="Stage name, as in dvc.yaml.")]) -> None:
    """Run one stage from params.yaml: what each stage's `cmd` in dvc.yaml calls."""
    from lmops.config import load_params
    from lmops.stages import STAGES

    if name not in STAGES:
        raise LmopsError(f"unknown stage {name!r} (known: {', '.join(STAGES)})")
    _log_to_console()
    STAGES[name](load_params(Path.cwd()), Path.cwd())


@app.command()
@_user_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serve.port).")] = None,
) -> None:
    """Serve the exported model with ONNX Runtime: /v1/predict, /v2 (Open Inference
    Protocol), /metrics. CUDA when ONNX Runtime really has it, CPU otherwise."""
    import uvicorn

    from lmops.config import load_params
    from serving.app import create_app
    from serving.engine import Engine

    _log_to_console()
    root = Path.cwd()
    cfg = load_params(root).serve
    engine = Engine(root / cfg.model_dir, cfg.require_gpu, cfg.max_batch_size, cfg.threads)
    typer.echo(
        f"serving {cfg.model_name} {engine.version} ({engine.variant}) on {engine.providers}",
        err=True,
    )
    uvicorn.run(
        create_app(cfg, engine, root),
        host=host or cfg.host,
        port=cfg.port if port is None else port,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    app()
