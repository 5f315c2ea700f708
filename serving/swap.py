"""Hot swap: the server follows a registry stage (`lmops serve --stage prod`).

Every `serve.poll_seconds` a resolver names the version that should serve and the local
directory of its ONNX export; it runs in a thread, since asking the registry may mean git
and DVC. A new version is loaded and warmed up beside the one serving, then switched in by
one assignment. The micro-batcher reads the engine once per batch, so a batch is answered
by one engine, and every prediction names the engine that computed it.

A version that fails to load (or to warm up) leaves the old one serving: it is logged with
the reason, counted in `/metrics`, and tried again after 2, 4, 8, … polls (at most every
`MAX_BACKOFF_POLLS`) while the resolver keeps naming it, since a fix may land under the same
name (a DVC pull that had not finished); a different answer is tried at the next poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lmops.engine import Engine, Prediction
from lmops.errors import LmopsError

log = logging.getLogger(__name__)

# Which version should serve now, and the directory of its export (manifest.json, ...).
Resolver = Callable[[], tuple[str, Path]]
# Builds the engine for a version from its export directory.
Loader = Callable[[str, Path], Engine]

MAX_BACKOFF_POLLS = 32


class SwapEvents(Protocol):
    """What the watcher reports (the app's Prometheus metrics; the challenger's figures)."""

    def swapped(self, old: Engine | None, new: Engine) -> None: ...

    def swap_failed(self) -> None: ...

    def resolve_failed(self) -> None: ...


class LiveModel:
    """The engine answering now (a challenger's is None until its version first loads)."""

    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine

    def predict(self, texts: list[str]) -> list[Prediction]:
        # `self.engine` is read once: a swap during this call changes the next batch only.
        return self.engine.predict(texts)


@dataclass
class Following:
    """What a server follows: how to ask which version should serve, how to load one
    (None: the app's plain loader), the registry stage's name for reports, and why the
    version it starts on is not the one `resolve` names (None: it is)."""

    resolve: Resolver
    load: Loader | None = None
    stage: str | None = None
    wanted: str | None = None
    problem: str | None = None


@dataclass
class _Failure:
    answer: tuple[str, Path]
    attempts: int
    polls_to_wait: int


def describe(err: Exception) -> str:
    return str(err) if isinstance(err, LmopsError) else f"{type(err).__name__}: {err}"


class StageWatcher:
    """Moves `live` to the version `resolve` names, when that one loads."""

    def __init__(
        self,
        live: LiveModel,
        resolve: Resolver,
        load: Loader,
        events: SwapEvents,
        wanted: str | None = None,
        problem: str | None = None,
        role: str = "model",
    ) -> None:
        """`wanted`, `problem`: the version the resolver named at start, and why another
        one serves (None: it is the one serving). `role` names it in the log ("model",
        "challenger")."""
        self.live, self.resolve, self.load, self.events = live, resolve, load, events
        self.role = role
        self._failure: _Failure | None = None
        # The version the resolver last named, and why another one serves (None: in sync).
        self.wanted = wanted
        self.problem = problem

    async def run(self, poll_seconds: float) -> None:
        """Poll until cancelled (at shutdown)."""
        while True:
            await asyncio.sleep(poll_seconds)
            await self.poll()

    async def poll(self) -> None:
        """Ask the resolver once; load, warm up and switch to a new version it names."""
        serving = self.live.engine.version if self.live.engine is not None else None
        try:
            answer = await asyncio.to_thread(self.resolve)
        except Exception as err:
            self.events.resolve_failed()
            log.warning(
                "%s watch: cannot tell which version to serve (%s); still serving %s",
                self.role,
                describe(err),
                serving,
                exc_info=not isinstance(err, LmopsError),
            )
            return
        version, model_dir = answer
        self.wanted = version
        if version == serving:
            self._failure, self.problem = None, None
            return
        failure = self._failure if self._failure and self._failure.answer == answer else None
        if failure is not None:
            failure.polls_to_wait -= 1
            if failure.polls_to_wait > 0:
                return
        try:
            engine = await asyncio.to_thread(self._load_warm, version, model_dir)
        except Exception as err:
            attempts = failure.attempts + 1 if failure else 1
            wait = min(2**attempts, MAX_BACKOFF_POLLS)
            self._failure = _Failure(answer, attempts, wait)
            self.problem = f"{version} cannot be served: {describe(err)}"
            self.events.swap_failed()
            log.warning(
                "%s swap to %s (%s) failed, still serving %s: %s (next try in %d polls "
                "unless the version to serve changes)",
                self.role,
                version,
                model_dir,
                serving,
                describe(err),
                wait,
            )
            return
        old, self.live.engine = self.live.engine, engine
        self._failure, self.problem = None, None
        self.events.swapped(old, engine)
        log.info(
            "%s swap: now serving %s (%s), was %s",
            self.role,
            version,
            engine.variant,
            old.version if old is not None else "none",
        )

    def _load_warm(self, version: str, model_dir: Path) -> Engine:
        engine = self.load(version, model_dir)
        engine.warm_up()
        return engine
