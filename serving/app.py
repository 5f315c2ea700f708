"""The HTTP API: `/v1/predict`, the Open Inference Protocol v2 (as Triton and KServe speak
it) and Prometheus `/metrics`. Every client error is a 4xx whose JSON `error` says which
rule was broken; the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import escape
from importlib.metadata import version as lmops_version_of
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    ORJSONResponse,
    PlainTextResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field, StrictStr

from lmops import feedback, registry
from lmops.artifacts import CorruptArtifact, DriftSummary
from lmops.config import ServeConfig, TlsConfig
from lmops.engine import Engine, ExplainRefused
from lmops.errors import LmopsError
from lmops.serving.auth import ApiKeys, Key, load_keys
from lmops.serving.batcher import MicroBatcher, Overloaded, TextRejected
from lmops.serving.challenger import Challenger, ChallengerMetrics
from lmops.serving.pages import EXAMPLE_TEXTS, landing_page, model_page, registry_index
from lmops.serving.protocol import (
    EXTENSIONS,
    HEADER_LENGTH,
    ProtocolError,
    infer_response,
    parse_infer,
)
from lmops.serving.stats import InferenceStats
from lmops.serving.swap import Following, LiveModel, StageWatcher
from lmops.serving.traffic import ShadowLog, TrafficLog
from lmops.stages import EXPERIMENTS_PAGE_DIR, LABELS_PAGE_DIR, VALIDATION_DOCS_DIR

log = logging.getLogger(__name__)


def lmops_version() -> str:
    return lmops_version_of("lmops")


class ClientError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


OPENAPI_DESCRIPTION = (
    "An lmops model behind ONNX Runtime. `POST /v1/predict` takes plain texts; the "
    "`/v2` endpoints speak the Open Inference Protocol as Triton and KServe do (tritonclient "
    "works against them). Scores are calibrated (temperature scaling)."
)
PREDICT_EXAMPLE = {
    "model": "lmops",
    "version": "v0.0.1",
    "request_id": "5f0c…",
    "predictions": [
        {
            "label": "positive",
            "score": 0.93,
            "probabilities": {"negative": 0.07, "positive": 0.93},
            "model_version": "v0.0.1",
        }
    ],
}


class PredictRequest(BaseModel):
    """Texts to classify; each is answered in the same order."""

    texts: list[StrictStr] = Field(
        description="Plain texts, at most serve.max_texts_per_request of them.",
        examples=[EXAMPLE_TEXTS],
    )


class FeedbackRequest(BaseModel):
    """The true labels of an answered request, arriving later (delayed labels)."""

    request_id: StrictStr = Field(
        description="The id /v1/predict answered with (or the x-request-id it was sent).",
        examples=["5f0c2a9e8d1b4c3f"],
    )
    labels: list[StrictStr] = Field(
        min_length=1,
        description="One true label per text of that request, in order.",
        examples=[["positive"]],
    )


class ExplainRequest(BaseModel):
    """One text whose prediction is explained token by token."""

    text: StrictStr = Field(
        description="A plain text of at most serve.explain.max_tokens tokens.",
        examples=[EXAMPLE_TEXTS[0]],
    )


class BodyLimit:
    """413 for a body over the limit, whether it announces its length or streams (chunked:
    read here up to the limit, then handed on)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _reject(self, size: int | None) -> JSONResponse:
        shown = f"{size:,} bytes" if size is not None else "more bytes than allowed"
        return JSONResponse(
            status_code=413,
            content={
                "error": f"request body is {shown}, over serve.max_body_bytes={self.max_bytes:,}"
            },
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            # The HTTP parser never hands on more than the declared length.
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._reject(int(declared))(scope, receive, send)
            return await self.app(scope, receive, send)
        body, message = b"", {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._reject(None)(scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


class RequestMetrics:
    """Counts requests by endpoint and status, and times them. A plain ASGI middleware:
    Starlette's `@app.middleware("http")` costs far more per request."""

    def __init__(self, app: Any, metrics: Metrics, state: Any) -> None:
        self.app, self.metrics, self.state = app, metrics, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def record_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.state.draining:  # clients reconnect rather than keep a closing line
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class Metrics:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmops_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lmops_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.batch_size = Histogram(
            "lmops_batch_size",
            "Texts per session run",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.queue_depth = Gauge(
            "lmops_queue_depth", "Requests waiting for a batch", registry=self.registry
        )
        self.texts = Counter("lmops_texts", "Texts predicted", registry=self.registry)
        self.model_name = model_name
        self.info = Gauge(
            "lmops_model_info",
            "The model being served and where it runs",
            ["model", "version", "variant", "provider", "device"],
            registry=self.registry,
        )
        self.info.labels(*self._info_labels(engine)).set(1)
        self.swaps = Counter(
            "lmops_model_swaps",
            "Hot swaps to the version the registry stage names, by result (ok, failed)",
            ["result"],
            registry=self.registry,
        )
        for result in ("ok", "failed"):
            self.swaps.labels(result)
        self.resolve_errors = Counter(
            "lmops_model_resolve_errors",
            "Polls where the version to serve could not be resolved (the registry unreadable)",
            registry=self.registry,
        )
        self.in_sync = Gauge(
            "lmops_model_in_sync",
            "1 while the served version is the one the followed stage names; 0 while another "
            "serves (a refused swap, or a fallback at start)",
            registry=self.registry,
        )
        self.wanted = Gauge(
            "lmops_model_wanted_info",
            "The version the followed registry stage names",
            ["stage", "version"],
            registry=self.registry,
        )
        self.traffic_log_errors = Counter(
            "lmops_traffic_log_errors",
            "Answered requests whose traffic-log records were lost, by kind (write: the disk "
            "refused them; dropped: the writer fell too far behind)",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("write", "dropped"):
            self.traffic_log_errors.labels(kind)
        self.rejected_texts = Counter(
            "lmops_rejected_texts",
            "Requests refused because the model fails on one of their texts alone",
            registry=self.registry,
        )

    def _info_labels(self, engine: Engine) -> tuple[str, ...]:
        return (self.model_name, engine.version, engine.variant, engine.providers[0], engine.device)

    def on_batch(self, size: int, depth: int) -> None:
        self.batch_size.observe(size)
        self.queue_depth.set(depth)

    def swapped(self, old: Engine, new: Engine) -> None:
        self.info.remove(*self._info_labels(old))
        self.info.labels(*self._info_labels(new)).set(1)
        self.swaps.labels("ok").inc()

    def swap_failed(self) -> None:
        self.swaps.labels("failed").inc()

    def resolve_failed(self) -> None:
        self.resolve_errors.inc()

    def following(self, status: dict[str, Any]) -> None:
        self.in_sync.set(1 if status["in_sync"] else 0)
        self.wanted.clear()
        self.wanted.labels(status["stage"] or "-", status["version"]).set(1)


def _validation_message(err: RequestValidationError) -> tuple[int, str]:
    problems = []
    for error in err.errors():
        if error["type"] == "json_invalid":
            return 400, f"invalid JSON: {error.get('ctx', {}).get('error', error['msg'])}"
        where = ".".join(str(p) for p in error["loc"] if p != "body") or "body"
        problems.append(f"{where}: {error['msg']}")
    return 422, "; ".join(problems)


def _require_json(request: Request) -> None:
    """JSON, or no content type at all (read as JSON, as Triton does: tritonclient sends
    none); the binary extension's body is octet-stream after its JSON header."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    allowed = {"", "application/json"}
    if HEADER_LENGTH in request.headers:
        allowed.add("application/octet-stream")
    if content_type not in allowed:
        raise ClientError(415, f"content type must be application/json, got {content_type!r}")


def create_app(
    cfg: ServeConfig,
    engine: Engine,
    root: Path,
    follow: Following | None = None,
    drift_dir: Path | None = None,
    challenger_follow: Following | None = None,
    challenger_engine: Engine | None = None,
    keys: list[Key] | None = None,
) -> FastAPI:
    """Serve `engine`, its restricted endpoint groups behind `keys` (by default those of
    $LMOPS_API_KEYS and serve.auth.keys_file; serving/auth.py). Given `follow`, follow the version
    it names every `serve.poll_seconds` with a hot swap (serving/swap.py). The registry's pages read
    `root`'s git tags, and its latest drift verdict `drift_dir` (monitor.reports_dir). Given
    `challenger_follow`, a challenger (`challenger_engine`, None until its version loads) follows
    that stage beside prod, in the shadow and as a canary (serving/challenger.py)."""
    metrics = Metrics(engine, cfg.model_name)
    traffic = TrafficLog(
        root / cfg.traffic.dir,
        cfg.traffic.store_text,
        cfg.traffic.rotate_mb,
        on_error=lambda kind: metrics.traffic_log_errors.labels(kind).inc(),
        redact_pii=cfg.traffic.redact_pii,
    )
    live_model = LiveModel(engine)
    stats = InferenceStats()

    def timed_predict(texts: list[str]) -> list[Any]:
        started = time.perf_counter_ns()
        answers = live_model.predict(texts)
        stats.executed(time.perf_counter_ns() - started)
        return answers

    def load(version: str, model_dir: Path) -> Engine:
        return Engine(model_dir, cfg.require_gpu, cfg.max_batch_size, cfg.threads, version=version)

    watcher = (
        None
        if follow is None
        else StageWatcher(
            live_model,
            follow.resolve,
            follow.load or load,
            metrics,
            wanted=follow.wanted,
            problem=follow.problem,
        )
    )

    def stage_status() -> dict[str, Any] | None:
        """What the server follows beside what it serves: the gap a refused swap or a
        fallback at start leaves, where a user looks (metadata, metrics, `lmops models`)."""
        if watcher is None:
            return None
        serving = live_model.engine.version
        wanted = watcher.wanted or serving
        return {
            "stage": follow.stage if follow else None,
            "version": wanted,
            "serving": serving,
            "in_sync": wanted == serving,
            "problem": watcher.problem,
        }

    batcher = MicroBatcher(
        timed_predict,
        cfg.max_batch_size,
        cfg.max_wait_ms,
        cfg.max_queue,
        on_batch=metrics.on_batch,
    )

    challenger, challenger_watcher, canary_batcher = None, None, None
    if challenger_follow is not None:
        challenger = Challenger(
            LiveModel(challenger_engine),
            challenger_follow.stage or "challenger",
            cfg,
            live_model,
            ShadowLog(
                root / cfg.traffic.dir,
                cfg.traffic.rotate_mb,
                on_error=lambda kind: metrics.traffic_log_errors.labels(kind).inc(),
            ),
            ChallengerMetrics(metrics.registry),
            prod_busy=batcher.busy,
        )
        challenger_watcher = StageWatcher(
            challenger.live,
            challenger_follow.resolve,
            challenger_follow.load or load,
            challenger,
            wanted=challenger_follow.wanted,
            problem=challenger_follow.problem,
            role="challenger",
        )
        canary_batcher = MicroBatcher(
            challenger.live.predict, cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.warm_up()
        batcher.start()
        watchers = [
            asyncio.create_task(w.run(cfg.poll_seconds))
            for w in (watcher, challenger_watcher)
            if w is not None
        ]
        if canary_batcher is not None:
            canary_batcher.start()
        app.state.ready = True
        yield
        app.state.ready = False
        for watching in watchers:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        if canary_batcher is not None:
            await canary_batcher.drain()
        await batcher.drain()
        if challenger is not None:
            challenger.close()
        traffic.close()

    # /docs from Swagger UI's files in the fastapi-offline package. No /redoc: its bundle
    # fetches Redocly's logo from a CDN (tests/e2e/test_browser.py caught it).
    app = FastAPIOffline(title="lmops", redoc_url=None, lifespan=lifespan)

    def openapi() -> dict[str, Any]:
        """The schema, its version the served model's (it changes with a hot swap)."""
        version = live_model.engine.version
        if app.openapi_schema is None or app.openapi_schema["info"]["version"] != version:
            app.openapi_schema = get_openapi(
                title=f"lmops: {cfg.model_name}",
                version=version,
                summary="Text classification on ONNX Runtime",
                description=OPENAPI_DESCRIPTION,
                routes=app.routes,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.ready = False
    # Set by the first SIGTERM (DrainingServer): not ready, still answering.
    app.state.draining = False
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    # Before the body is read, and inside the metrics, which count its 401s, 403s and 429s.
    app.add_middleware(
        ApiKeys, cfg=cfg.auth, keys=load_keys(cfg.auth, root) if keys is None else keys
    )
    app.add_middleware(RequestMetrics, metrics=metrics, state=app.state)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, err: ClientError) -> JSONResponse:
        return JSONResponse(
            status_code=err.status, content={"error": err.message}, headers=err.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(err)
        return JSONResponse(status_code=status, content={"error": message})

    @app.exception_handler(TextRejected)
    async def rejected(request: Request, err: TextRejected) -> JSONResponse:
        metrics.rejected_texts.inc()
        return JSONResponse(status_code=422, content={"error": str(err)})

    @app.exception_handler(Exception)
    async def server_fault(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(
            status_code=500, content={"error": f"server fault: {type(err).__name__}: {err}"}
        )

    async def predict(texts: list[str], request_id: str) -> list[Any]:
        if not texts:
            raise ClientError(422, "texts must hold at least one text")
        if len(texts) > cfg.max_texts_per_request:
            raise ClientError(
                422,
                f"{len(texts)} texts, over serve.max_texts_per_request={cfg.max_texts_per_request}",
            )
        for index, text in enumerate(texts):
            if len(text) > cfg.max_chars_per_text:
                raise ClientError(
                    422,
                    f"text {index} has {len(text):,} characters, over "
                    f"serve.max_chars_per_text={cfg.max_chars_per_text:,}",
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate such as "\\ud800" in the JSON
                raise ClientError(
                    422,
                    f"text {index} is not valid Unicode: {err.reason} at character {err.start}",
                ) from None
        started = time.perf_counter()
        predictions = None
        if challenger is not None and challenger.takes_canary():
            predictions = await canary(texts)
        answered_by_canary = predictions is not None
        if predictions is None:
            predictions = await by_prod(texts, started)
        latency_ms = (time.perf_counter() - started) * 1000
        stats.succeeded(len(texts), int(latency_ms * 1e6))
        traffic.append(request_id, texts, predictions, latency_ms)
        metrics.texts.inc(len(texts))
        if challenger is not None and not answered_by_canary:
            challenger.shadow(request_id, texts, predictions, latency_ms)
        return predictions

    async def by_prod(texts: list[str], started: float) -> list[Any]:
        """Prod's answers; `started`: when the request began (a failed canary try first)."""
        began = time.perf_counter()  # what the canary judge compares: prod's own time
        try:
            predictions = await batcher.submit(texts)
        except Exception as err:  # overloaded, a text the model refuses, a broken engine
            stats.failed(int((time.perf_counter() - started) * 1e9))
            if not isinstance(err, Overloaded):
                if challenger is not None and not isinstance(err, TextRejected):
                    challenger.prod_answered(False, (time.perf_counter() - began) * 1000)
                raise
            raise ClientError(
                503,
                "server overloaded: the request queue is full (serve.max_queue"
                f"={cfg.max_queue}); retry shortly",
                headers={"Retry-After": "1"},
            ) from None
        if challenger is not None:
            challenger.prod_answered(True, (time.perf_counter() - began) * 1000)
        return predictions

    async def canary(texts: list[str]) -> list[Any] | None:
        """The challenger's answers, or None for prod to answer: a canary's fault (or its
        full queue) never reaches the caller, only the judge."""
        assert challenger is not None and canary_batcher is not None
        started = time.perf_counter()
        try:
            answers = await canary_batcher.submit(texts)
        except Overloaded:
            return None
        except Exception as err:
            challenger.canary_answered(False, (time.perf_counter() - started) * 1000, err)
            return None
        challenger.canary_answered(True, (time.perf_counter() - started) * 1000, None)
        return answers

    def _checked_id(request_id: str, where: str) -> str:
        if len(request_id) > cfg.max_request_id_chars:
            raise ClientError(
                400,
                f"{where} is {len(request_id):,} characters, over "
                f"serve.max_request_id_chars={cfg.max_request_id_chars}",
            )
        return request_id

    def _request_id(request: Request) -> str:
        given = request.headers.get("x-request-id")
        return _checked_id(given, "x-request-id") if given else uuid.uuid4().hex

    @app.get("/", include_in_schema=False)
    async def landing(request: Request) -> HTMLResponse:
        engine = live_model.engine
        return HTMLResponse(
            landing_page(
                cfg.model_name,
                engine.version,
                engine.labels,
                engine.variant,
                engine.providers,
                stage_status(),
                str(request.base_url).rstrip("/"),
            )
        )

    async def _page_of(build: Any, *args: Any) -> HTMLResponse:
        """A registry page, built off the event loop (git and GTO take a while): a user's
        error (no registry here, an unknown version) is a 404 page that names it."""
        try:
            return HTMLResponse(await run_in_threadpool(build, *args))
        except LmopsError as err:
            return HTMLResponse(f"<!doctype html><p>{escape(str(err))}</p>", status_code=404)

    def _index() -> str:
        return registry_index(cfg.model_name, registry.versions(root), live_model.engine.version)

    def _version(version: str) -> str:
        facts = registry.version_page(root, version)
        drift, problem = None, None
        latest = drift_dir / DriftSummary.LATEST if drift_dir else None
        try:
            drift = DriftSummary.read(latest) if latest and latest.is_file() else None
        except CorruptArtifact as err:
            problem = str(err)
        return model_page(cfg.model_name, facts, live_model.engine.version, drift, problem)

    @app.get("/models", include_in_schema=False)
    async def models_index() -> HTMLResponse:
        return await _page_of(_index)

    @app.get("/models/{version}", include_in_schema=False)
    async def models_version(version: str) -> HTMLResponse:
        return await _page_of(_version, version)

    @app.get("/models/{version}/plots/{name}", include_in_schema=False)
    async def models_picture(version: str, name: str) -> Response:
        def read() -> bytes | None:
            return registry.picture_at(root, registry.commit_of(root, version), name)

        try:
            picture = await run_in_threadpool(read)
        except LmopsError as err:
            return PlainTextResponse(str(err), status_code=404)
        if picture is None:
            return PlainTextResponse(f"no picture {name} in {version}", status_code=404)
        return Response(picture, media_type="image/png")

    # The reports the pages and the Prefect artifacts link to, over http (a browser blocks
    # file:// links from an http page): the validation's Data Docs, the label issues beside
    # them, the experiments compared (lmops exp show) and the drift reports.
    for url, folder in (
        ("/reports/validation", root / VALIDATION_DOCS_DIR),
        ("/reports/labels", root / LABELS_PAGE_DIR),
        ("/reports/experiments", root / EXPERIMENTS_PAGE_DIR),
        ("/reports/drift", drift_dir),
    ):
        if folder is not None:
            app.mount(url, StaticFiles(directory=folder, html=True, check_dir=False))

    @app.post(
        "/v1/predict",
        dependencies=[Depends(_require_json)],
        responses={200: {"content": {"application/json": {"example": PREDICT_EXAMPLE}}}},
    )
    async def v1_predict(body: PredictRequest, request: Request) -> ORJSONResponse:
        """The label and the calibrated probability of every label, for each text.

        A text the model cannot take gets a 422 naming its index; over-long requests 413;
        a full queue 503 with Retry-After. `x-request-id` is echoed and logged."""
        request_id = _request_id(request)
        predictions = await predict(body.texts, request_id)
        return ORJSONResponse(
            {
                "model": cfg.model_name,
                # One request is answered in one batch, so by one engine.
                "version": predictions[0].model_version,
                "request_id": request_id,
                "predictions": [
                    {
                        "label": p.label,
                        "score": p.score,
                        "probabilities": p.probabilities,
                        "model_version": p.model_version,
                    }
                    for p in predictions
                ],
            }
        )

    # One explanation at a time: each is a session run of n+1 texts, and predictions must
    # keep the rest of the cores.
    explaining = asyncio.Semaphore(1)

    @app.post("/v1/feedback", dependencies=[Depends(_require_json)])
    async def v1_feedback(body: FeedbackRequest, request: Request) -> ORJSONResponse:
        """Delayed labels, joined to the traffic log by request id (lmops/feedback.py): 200
        stored, 404 no such request in the log, 422 labels that do not fit it, 507 the
        feedback file cannot be written. The monitor reports the realized accuracy."""
        _checked_id(body.request_id, "request_id")
        try:
            (verdict,) = await run_in_threadpool(
                feedback.submit,
                root / cfg.traffic.dir,
                [(body.request_id, body.labels)],
                live_model.engine.labels,
                "api",
                request.state.api_key,
            )
        except OSError as err:
            raise ClientError(507, f"the feedback could not be stored: {err}") from None
        if verdict.status != 200:
            raise ClientError(verdict.status, verdict.detail)
        return ORJSONResponse({"request_id": body.request_id, "stored": len(body.labels)})

    @app.post("/v1/explain", dependencies=[Depends(_require_json)])
    async def v1_explain(body: ExplainRequest) -> ORJSONResponse:
        """The predicted label and, for each token, how much its probability falls when that
        token alone is left out (occlusion on the served engine; negative: the label gains
        without it). More than serve.explain.max_tokens tokens is a 422."""
        if len(body.text) > cfg.max_chars_per_text:
            raise ClientError(
                422,
                f"the text has {len(body.text):,} characters, over "
                f"serve.max_chars_per_text={cfg.max_chars_per_text:,}",
            )
        try:
            body.text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate such as "\\ud800" in the JSON
            raise ClientError(
                422, f"the text is not valid Unicode: {err.reason} at character {err.start}"
            ) from None
        engine = live_model.engine
        started = time.perf_counter()
        async with explaining:
            try:
                answer = await run_in_threadpool(engine.explain, body.text, cfg.explain.max_tokens)
            except ExplainRefused as err:
                raise ClientError(422, str(err)) from None
        seconds = time.perf_counter() - started
        return ORJSONResponse({"model": cfg.model_name, **answer, "seconds": round(seconds, 4)})

    def _known(name: str, version: str | None = None) -> Engine:
        """The engine answering for NAME (and VERSION, when the path names one)."""
        if name != cfg.model_name:
            raise ClientError(404, f"unknown model {name!r}; this server serves {cfg.model_name!r}")
        engine = live_model.engine
        if version is not None and version != engine.version:
            raise ClientError(
                404,
                f"model {name!r} has no version {version!r} here; it serves {engine.version!r}",
            )
        return engine

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "lmops", "version": lmops_version(), "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    def traffic_log_status() -> dict[str, Any]:
        if traffic.degraded is None:
            return {"status": "ok", "errors": traffic.errors}
        return {"status": "degraded", "error": traffic.degraded, "errors": traffic.errors}

    def is_ready() -> bool:
        return app.state.ready and not app.state.draining

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        # A degraded traffic log does not make the server unready: predictions still work.
        return JSONResponse(
            status_code=200 if is_ready() else 503,
            content={
                "ready": is_ready(),
                "draining": app.state.draining,
                "traffic_log": traffic_log_status(),
            },
        )

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        engine = _known(name, version)
        return {
            "name": cfg.model_name,
            "versions": [engine.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(engine.labels)]},
            ],
            "parameters": {
                "labels": engine.labels,
                "variant": engine.variant,
                "providers": engine.providers,
                "device": engine.device,
                "max_length": engine.max_length,
                "traffic_log": traffic_log_status(),
                "following": stage_status(),
                "challenger": challenger.status() if challenger is not None else None,
            },
        }

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        _known(name, version)
        return JSONResponse(
            status_code=200 if is_ready() else 503, content={"name": name, "ready": is_ready()}
        )

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model-configuration extension, from what this server really runs."""
        engine = _known(name, version)
        return {
            "name": cfg.model_name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": [engine.version]}},
            # Batching happens inside the server (micro-batching), not in the tensor shape.
            "max_batch_size": 0,
            "input": [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1]}],
            "output": [
                {"name": "label", "data_type": "TYPE_STRING", "dims": [-1]},
                {
                    "name": "probabilities",
                    "data_type": "TYPE_FP32",
                    "dims": [-1, len(engine.labels)],
                    "label_filename": "",
                },
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(cfg.max_wait_ms * 1000),
                "preferred_batch_size": [cfg.max_batch_size],
            },
            "instance_group": [
                {"count": 1, "kind": "KIND_GPU" if engine.device == "cuda" else "KIND_CPU"}
            ],
            "parameters": {
                "labels": {"string_value": ",".join(engine.labels)},
                "variant": {"string_value": engine.variant},
                "max_length": {"string_value": str(engine.max_length)},
            },
        }

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics extension: counts and cumulative nanoseconds since start."""
        engine = _known(name, version)
        return {"model_stats": [stats.triton(cfg.model_name, engine.version)]}

    @app.post("/v2/models/{name}/infer", dependencies=[Depends(_require_json)])
    @app.post("/v2/models/{name}/versions/{version}/infer", dependencies=[Depends(_require_json)])
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        _known(name, version)
        try:
            parsed = parse_infer(
                await request.body(),
                request.headers.get(HEADER_LENGTH),
                ["label", "probabilities"],
            )
        except ProtocolError as err:
            stats.failed(0)
            raise ClientError(err.status, str(err)) from None
        request_id = _checked_id(parsed.id, "id") if parsed.id else _request_id(request)
        predictions = await predict(parsed.texts, request_id)
        labels = list(predictions[0].probabilities)
        body, header_length = infer_response(
            cfg.model_name,
            predictions[0].model_version,
            parsed.id,
            {
                "label": ("BYTES", [len(predictions)], [p.label for p in predictions]),
                "probabilities": (
                    "FP32",
                    [len(predictions), len(labels)],
                    np.array(
                        [[p.probabilities[label] for label in labels] for p in predictions],
                        dtype=np.float32,
                    ),
                ),
            },
            parsed.outputs,
        )
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(batcher.queue.qsize())
        if (following := stage_status()) is not None:
            metrics.following(following)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_server(
    app: FastAPI, host: str, port: int, drain_seconds: float, tls: TlsConfig | None = None
) -> None:
    """Run `app` under uvicorn (over HTTPS given `tls`), draining on the first SIGTERM or Ctrl-C the
    way a load balancer expects: `/v2/health/ready` answers 503 at once, every request is still
    answered for `drain_seconds` (with `Connection: close`, so clients reconnect rather than keep a
    line that is about to close), then uvicorn's graceful shutdown lets the requests in flight
    finish. A second signal stops at once."""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if app.state.draining or not drain_seconds:
                return super().handle_exit(sig, frame)
            app.state.draining = True
            log.warning("draining for %g s (serve.drain_seconds), then stopping", drain_seconds)
            stop = threading.Timer(drain_seconds, super().handle_exit, (sig, frame))
            stop.daemon = True
            stop.start()
            return None

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=30,
        ssl_certfile=tls.certfile if tls else None,
        ssl_keyfile=tls.keyfile if tls else None,
    )
    DrainingServer(config).run()
