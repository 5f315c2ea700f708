"""Serving a registry stage (`lmops serve --stage NAME`): fetch a version's export, fetch
it again when the local copy fails its checksum, and start on the last good version when
the stage's own one cannot load, rather than not start at all.

A restart while prod names a damaged version is otherwise an outage. The fallback is a
version that was in the same stage before (never one that was only ever in staging), and
the server says so in its logs, `/metrics` and `/v2/models/NAME` until the stage's version
loads (the watcher keeps trying it, with backoff).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmops import registry
from lmops.config import ServeConfig
from lmops.engine import CorruptModel, Engine
from lmops.errors import LmopsError
from lmops.serving.swap import Following, Loader, Resolver, describe

log = logging.getLogger(__name__)


def loader(root: Path, cfg: ServeConfig, threads: int | None = None) -> Loader:
    """Build the engine of a registered version from its local copy, fetching it when
    missing, and once more when the copy fails its checksum. `threads`: ONNX Runtime's
    intra-op threads (default serve.threads)."""

    def load(version: str, _model_dir: Path) -> Engine:
        def build(model_dir: Path) -> Engine:
            return Engine(
                model_dir,
                cfg.require_gpu,
                cfg.max_batch_size,
                cfg.threads if threads is None else threads,
                version=version,
            )

        try:
            return build(registry.materialize(root, version))
        except CorruptModel as err:
            log.warning("%s: the local copy failed its check (%s); fetching it again", version, err)
            return build(registry.materialize(root, version, refetch=True))

    return load


def start(root: Path, stage: str, load: Loader) -> tuple[Engine, str, str | None]:
    """The engine to start on, the version the stage names, and why another one serves
    (None when the stage's own version does)."""
    wanted = registry.stage_version(root, stage)
    if wanted is None:
        raise LmopsError(
            f"no version of {registry.ARTIFACT} is in {stage} (run `lmops promote` first)"
        )
    try:
        return load(wanted, Path()), wanted, None
    except Exception as err:
        problem = f"{wanted} cannot be served: {describe(err)}"
    for version in registry.earlier_in_stage(root, stage):
        if version == wanted:
            continue
        try:
            engine = load(version, Path())
        except Exception as err:
            log.warning("fallback %s cannot be served either: %s", version, describe(err))
            continue
        log.error(
            "SERVING A FALLBACK: %s names %s, which %s; serving %s, which was in %s before, "
            "until %s loads",
            stage,
            wanted,
            problem.split(": ", 1)[1],
            version,
            stage,
            wanted,
        )
        return engine, wanted, problem
    raise LmopsError(
        f"cannot serve stage {stage}: {problem}; and no version that was in {stage} before "
        "loads from the local cache either"
    )


def start_challenger(
    resolve: Resolver, stage: str, load: Loader
) -> tuple[Engine | None, Following]:
    """The challenger's engine (None when the version `resolve` names cannot load yet:
    prod serves regardless, and the watcher keeps trying) and what it follows."""
    try:
        version, model_dir = resolve()
    except LmopsError as err:
        log.error("challenger: %s; serving prod alone until %s names a version", err, stage)
        return None, Following(resolve, load, stage, None, str(err))
    try:
        engine = load(version, model_dir)
        engine.warm_up()
    except Exception as err:
        problem = f"{version} cannot be served: {describe(err)}"
        log.error("challenger: %s; serving prod alone, retrying", problem)
        return None, Following(resolve, load, stage, version, problem)
    return engine, Following(resolve, load, stage, version, None)
