"""A challenger beside prod (`lmops serve --stage prod --challenger staging`): shadow and
canary, so that a new version proves itself on live traffic before it takes over.

Shadow: once prod has answered a request, a share of requests (serve.shadow.share) is
queued for the challenger, which scores it on one thread of its own at the lowest CPU
priority, and only once prod has nothing to do. The answer never waits for it; work that
waits too long for prod to be idle, or finds the queue full, is skipped (counted). So a
slow or broken challenger cannot fail a prod answer, and it takes the cores prod leaves
idle (what it still costs prod is measured in reports/bench/shadow.json). Agreement,
latency and the estimated accuracy of both (mean calibrated confidence, CBPE) go to
`/metrics` and to `<traffic dir>/shadow-*.jsonl`, which `lmops promote` reads for its
live gates.

Canary: serve.canary.share of requests are answered by the challenger, each answer naming
its model version. A challenger answer that fails is answered by prod instead. The judge
compares the two sides over their last requests and switches the canary off by itself,
logged and counted, when its error rate or median latency is worse than prod's beyond the
params' limits. A new challenger version (its stage moved) starts afresh.

The challenger follows its stage like prod does (serving/swap.py); while it names the
version prod serves there is nothing to compare, and both modes rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmops.config import CanaryConfig, ServeConfig
from lmops.engine import Engine, Prediction
from lmops.serving.swap import LiveModel
from lmops.serving.traffic import ShadowedRequest, ShadowLog

log = logging.getLogger(__name__)

# The lowest scheduling priority (nice 19) for the shadow thread: prod's threads come first.
SHADOW_NICENESS = 19
# Shadow work waits for prod to be idle at most this long, then is skipped (stale by then).
SHADOW_MAX_WAIT_S = 5.0
# How often it looks: each look takes the GIL, which prod's event loop needs.
SHADOW_POLL_S = 0.001
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class _Outcome:
    ok: bool
    latency_ms: float


class CanaryJudge:
    """The canary against prod over the last `window` requests each side answered."""

    def __init__(self, cfg: CanaryConfig) -> None:
        self.cfg = cfg
        self.sides: dict[str, deque[_Outcome]] = {
            side: deque(maxlen=cfg.window) for side in ("prod", "canary")
        }
        # Why the canary was switched off (None: it is on).
        self.switched_off: str | None = None

    def record(self, side: str, ok: bool, latency_ms: float) -> str | None:
        """Note one request; the reason when this one switches the canary off."""
        self.sides[side].append(_Outcome(ok, latency_ms))
        if side != "canary" or self.switched_off is not None:
            return None
        self.switched_off = self.verdict()
        return self.switched_off

    def verdict(self) -> str | None:
        """Why the canary is worse than prod, or None while it is not (or too few requests
        say yet)."""
        canary, prod = self.sides["canary"], self.sides["prod"]
        if len(canary) < self.cfg.min_requests:
            return None
        canary_errors = sum(not o.ok for o in canary) / len(canary)
        prod_errors = sum(not o.ok for o in prod) / len(prod) if prod else 0.0
        if canary_errors > prod_errors + self.cfg.max_error_rate_increase:
            return (
                f"error rate {canary_errors:.1%} over its last {len(canary)} requests, against "
                f"prod's {prod_errors:.1%} (serve.canary.max_error_rate_increase="
                f"{self.cfg.max_error_rate_increase})"
            )
        canary_ms = [o.latency_ms for o in canary if o.ok]
        prod_ms = [o.latency_ms for o in prod if o.ok]
        if canary_ms and prod_ms:
            ratio = statistics.median(canary_ms) / max(statistics.median(prod_ms), 1e-6)
            if ratio > self.cfg.max_latency_ratio:
                return (
                    f"median latency {statistics.median(canary_ms):.2f} ms, {ratio:.2f}x prod's "
                    f"{statistics.median(prod_ms):.2f} ms (serve.canary.max_latency_ratio="
                    f"{self.cfg.max_latency_ratio})"
                )
        return None


class ChallengerMetrics:
    """The challenger's part of `/metrics`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.info = Gauge(
            "lmops_challenger_info",
            "The challenger served beside prod, and the stage it follows",
            ["stage", "version"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            "lmops_shadow_requests",
            "Requests prod answered, by what the shadow did with them (scored; skipped: prod "
            "stayed busy or the shadow's queue was full; failed: the challenger raised; idle: it "
            "serves prod's version)",
            ["result"],
            registry=registry,
        )
        for result in ("scored", "skipped", "failed", "idle"):
            self.shadow_requests.labels(result)
        self.shadow_texts = Counter(
            "lmops_shadow_texts",
            "Texts scored in the shadow, by whether the challenger's label agreed with prod's",
            ["agreement"],
            registry=registry,
        )
        for agreement in ("agree", "disagree"):
            self.shadow_texts.labels(agreement)
        self.shadow_latency = Histogram(
            "lmops_shadow_latency_seconds",
            "Per shadowed request: prod's latency as the caller saw it, and the challenger's "
            "session time for the same texts",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.agreement = Gauge(
            "lmops_shadow_agreement",
            "Share of shadowed texts where the challenger's label is prod's (this challenger)",
            registry=registry,
        )
        self.estimated_accuracy = Gauge(
            "lmops_shadow_estimated_accuracy",
            "Accuracy estimated without labels (mean calibrated confidence, CBPE) of each "
            "model on the same shadowed texts (this challenger)",
            ["model", "version"],
            registry=registry,
        )
        self.canary_requests = Counter(
            "lmops_canary_requests",
            "Requests sent to the canary, by result (answered; failed: prod answered instead)",
            ["result"],
            registry=registry,
        )
        for result in ("answered", "failed"):
            self.canary_requests.labels(result)
        self.canary_enabled = Gauge(
            "lmops_canary_enabled",
            "1 while the challenger answers serve.canary.share of requests",
            registry=registry,
        )
        self.canary_switched_off = Counter(
            "lmops_canary_switched_off",
            "Times a canary was switched off for being worse than prod",
            registry=registry,
        )


def lowest_priority() -> None:
    """Put the calling thread at the lowest niceness (Linux: per thread). Measured against
    SCHED_IDLE and no change (reports/bench/shadow.json): SCHED_IDLE slowed prod more, since
    a starved thread holding the GIL stalls the event loop."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICENESS)


class Challenger:
    """The challenger engine (following its stage), its shadow worker and its canary."""

    def __init__(
        self,
        live: LiveModel,
        stage: str,
        cfg: ServeConfig,
        prod: LiveModel,
        shadow_log: ShadowLog,
        metrics: ChallengerMetrics,
        prod_busy: Callable[[], bool] = lambda: False,
    ) -> None:
        """`live.engine` may be None: the stage's version could not load yet (the watcher
        keeps trying). `prod_busy`: whether prod is computing or has requests waiting."""
        self.live, self.stage, self.cfg, self.prod = live, stage, cfg, prod
        self.prod_busy = prod_busy
        self.shadow_log, self.metrics = shadow_log, metrics
        self.judge = CanaryJudge(cfg.canary)
        self._pending: queue.Queue[Any] = queue.Queue(maxsize=cfg.shadow.max_pending)
        self._random = random.Random()
        self._reset()
        self._worker = threading.Thread(target=self._shadow_loop, name="shadow", daemon=True)
        self._worker.start()

    # --- which version, and whether there is anything to compare -------------------------
    @property
    def version(self) -> str | None:
        return self.live.engine.version if self.live.engine is not None else None

    def active(self) -> bool:
        """Loaded, and another version than prod's."""
        return self.live.engine is not None and self.version != self.prod.engine.version

    def _reset(self) -> None:
        """A new challenger version: its own figures, and a canary judged afresh."""
        self.texts = self.agreed = 0
        self.confidence_sums = {"prod": 0.0, "challenger": 0.0}
        self.judge = CanaryJudge(self.cfg.canary)
        self.metrics.info.clear()
        self.metrics.estimated_accuracy.clear()
        self.metrics.agreement.set(0)
        if self.version is not None:
            self.metrics.info.labels(self.stage, self.version).set(1)
        self.metrics.canary_enabled.set(1 if self.cfg.canary.share > 0 else 0)

    # The StageWatcher's events (serving/swap.py SwapEvents).
    def swapped(self, old: Engine | None, new: Engine) -> None:
        self._reset()

    def swap_failed(self) -> None:
        pass

    def resolve_failed(self) -> None:
        pass

    # --- canary -----------------------------------------------------------------------
    def takes_canary(self) -> bool:
        """Whether the challenger answers this request."""
        return (
            self.cfg.canary.share > 0
            and self.judge.switched_off is None
            and self.active()
            and self._random.random() < self.cfg.canary.share
        )

    def canary_answered(self, ok: bool, latency_ms: float, error: Exception | None) -> None:
        self.metrics.canary_requests.labels("answered" if ok else "failed").inc()
        if error is not None:
            log.warning("canary %s failed a request (prod answered it): %r", self.version, error)
        self._judge("canary", ok, latency_ms)

    def prod_answered(self, ok: bool, latency_ms: float) -> None:
        if self.cfg.canary.share > 0:
            self._judge("prod", ok, latency_ms)

    def _judge(self, side: str, ok: bool, latency_ms: float) -> None:
        reason = self.judge.record(side, ok, latency_ms)
        if reason is not None:
            self.metrics.canary_enabled.set(0)
            self.metrics.canary_switched_off.inc()
            log.error(
                "CANARY SWITCHED OFF: %s (%s) is worse than prod %s: %s; prod answers every "
                "request (the shadow goes on)",
                self.version,
                self.stage,
                self.prod.engine.version,
                reason,
            )

    # --- shadow -----------------------------------------------------------------------
    def shadow(
        self, request_id: str, texts: list[str], answers: list[Prediction], latency_ms: float
    ) -> None:
        """Queue a request prod answered for the challenger; never blocks, never raises."""
        if self.cfg.shadow.share <= 0 or self._random.random() >= self.cfg.shadow.share:
            return
        if not self.active():
            self.metrics.shadow_requests.labels("idle").inc()
            return
        try:
            self._pending.put_nowait((request_id, texts, answers, latency_ms))
        except queue.Full:
            self.metrics.shadow_requests.labels("skipped").inc()

    def _shadow_loop(self) -> None:
        lowest_priority()
        while True:
            item = self._pending.get()
            try:
                if item is None:
                    return
                if not self._wait_for_idle_prod():
                    self.metrics.shadow_requests.labels("skipped").inc()
                    continue
                self._score(*item)
            except Exception as err:  # the worker must outlive any challenger fault
                self.metrics.shadow_requests.labels("failed").inc()
                log.warning("shadow: %s failed on a request: %r", self.version, err)
            finally:
                self._pending.task_done()

    def _wait_for_idle_prod(self) -> bool:
        """Wait for a moment prod has nothing to do; False after SHADOW_MAX_WAIT_S."""
        deadline = time.monotonic() + SHADOW_MAX_WAIT_S
        while self.prod_busy():
            if time.monotonic() > deadline:
                return False
            time.sleep(SHADOW_POLL_S)
        return True

    def _score(
        self, request_id: str, texts: list[str], answers: list[Prediction], latency_ms: float
    ) -> None:
        engine = self.live.engine
        if engine is None or engine.version == answers[0].model_version:
            self.metrics.shadow_requests.labels("idle").inc()
            return
        started = time.perf_counter()
        probabilities = engine.probabilities(texts)
        challenger_ms = (time.perf_counter() - started) * 1000
        self.shadow_log.append_shadowed(
            ShadowedRequest(
                datetime.now(UTC),
                request_id,
                answers,
                latency_ms,
                engine.version,
                engine.labels,
                probabilities,
                challenger_ms,
            )
        )
        picked = probabilities.argmax(axis=1)
        agreed = sum(engine.labels[i] == a.label for i, a in zip(picked, answers, strict=True))
        self.texts += len(answers)
        self.agreed += agreed
        self.confidence_sums["prod"] += sum(a.score for a in answers)
        self.confidence_sums["challenger"] += float(probabilities.max(axis=1).sum())
        metrics = self.metrics
        metrics.shadow_requests.labels("scored").inc()
        metrics.shadow_texts.labels("agree").inc(agreed)
        metrics.shadow_texts.labels("disagree").inc(len(answers) - agreed)
        metrics.shadow_latency.labels("prod").observe(latency_ms / 1000)
        metrics.shadow_latency.labels("challenger").observe(challenger_ms / 1000)
        metrics.agreement.set(self.agreed / self.texts)
        for model, version in (("prod", answers[0].model_version), ("challenger", engine.version)):
            metrics.estimated_accuracy.labels(model, version).set(
                self.confidence_sums[model] / self.texts
            )

    def flush(self) -> None:
        """Wait until the queued shadow work is done (tests, shutdown)."""
        self._pending.join()
        self.shadow_log.flush()

    def close(self) -> None:
        self._pending.put(None)
        self._worker.join(timeout=10)
        self.shadow_log.close()

    def status(self) -> dict[str, Any]:
        """What `/v2/models/NAME` says about the challenger."""
        texts = self.texts
        return {
            "stage": self.stage,
            "version": self.version,
            "active": self.active(),
            "shadow": {
                "share": self.cfg.shadow.share,
                "texts": texts,
                "agreement": round(self.agreed / texts, 5) if texts else None,
                "estimated_accuracy": {
                    model: round(total / texts, 5) if texts else None
                    for model, total in self.confidence_sums.items()
                },
            },
            "canary": {
                "share": self.cfg.canary.share,
                "enabled": self.cfg.canary.share > 0 and self.judge.switched_off is None,
                "switched_off": self.judge.switched_off,
            },
        }
