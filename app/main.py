"""The FastAPI application.

`create_app()` with no arguments reads `ALTO_*` settings (so `uvicorn app.main:create_app
--factory` works); tests and `alto serve` pass settings and pipelines explicitly.

Two modes, chosen by `settings.redis_url`:
* embedded (default): an EmbeddedTransport and a Runtime running every stage of every
  pipeline in this process, started in the lifespan;
* Redis: a RedisTransport and no runtime; `alto worker` processes serve the stages, and
  the gateway refuses runs (503) while a stage has no live worker.
A transport or runtime passed in is used as is and left for the caller to close.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.security import HTTPBearer

from app import errors
from app.engines import EnginePool
from app.gateway import Gateway
from app.metrics import Metrics
from app.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    key_digests,
)
from app.ratelimit import RateLimit
from app.responses import SSE_MODELS
from app.routes_admin import router as admin_router
from app.routes_native import router as native_router
from app.routes_openai import router as openai_router
from app.routes_ops import router as ops_router
from orchestrator.spec import EngineSpec, PipelineSpec, load_pipeline
from orchestrator.transport import Transport
from workers import tracing
from workers.redact import redact_url
from workers.runtime import Runtime
from workers.settings import Settings, get_settings, reveal

log = logging.getLogger("alto.gateway")

VERSION = "0.1.0"
DESCRIPTION = """\
alto serves compound LLM pipelines and streams partial outputs between their stages.

* OpenAI-compatible: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`
  (`model` = a pipeline or an engine model). Streamed chunks carry the run's other events
  in the extension field `alto`.
* Native: `POST /v1/pipelines/{name}/runs` (typed SSE events with ids, or JSON) and
  `GET /v1/runs/{id}/events` (replay, resume after `Last-Event-ID`).
* Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

# documents the bearer scheme on /v1/*; the check itself is AuthMiddleware's (it must run
# before the body is parsed, so a bad key is a 401 whatever the body)
bearer = HTTPBearer(auto_error=False, description="an API key from ALTO_API_KEYS")


def engine_override(settings: Settings) -> EngineSpec | None:
    if not settings.engine:
        return None
    return EngineSpec(kind=settings.engine, **dict(settings.engine_options))  # type: ignore[arg-type]


def load_pipelines(paths: Iterable[str]) -> list[PipelineSpec]:
    specs = [load_pipeline(p) for p in paths]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"several pipeline files define {dupes}")
    return specs


def create_app(
    settings: Settings | None = None,
    pipelines: Iterable[PipelineSpec] | None = None,
    transport: Transport | None = None,
    runtime: Runtime | None = None,
    tracer: Any = None,
) -> FastAPI:
    """`tracer`: an OpenTelemetry tracer for run spans (tests pass one); by default one only
    when OTEL_EXPORTER_OTLP_ENDPOINT is set (workers/tracing.py), else tracing is off."""
    settings = settings or get_settings()
    if tracer is None and tracing.configure("alto-gateway"):
        tracer = tracing._tracer()
    specs = list(pipelines) if pipelines is not None else load_pipelines(settings.pipelines)
    by_name = {s.name: s for s in specs}
    metrics = Metrics()
    override = engine_override(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t = transport
        own_transport = t is None
        if t is None:
            if redis_url := reveal(settings.redis_url):
                from workers.redis_transport import RedisTransport

                # every run a client follows holds a connection in a blocking read (up to
                # a second at a time): room for all admitted runs and all viewers of run
                # events, and 64 more for the rest (starting runs, heartbeats, the
                # supervisor's reads); the default 64 made followers beyond 64 queue
                t = RedisTransport(redis_url, max_connections=settings.max_inflight_runs
                                   + settings.max_run_viewers + 64)
                try:  # say so at once (requests would answer 503 transport_unavailable)
                    await asyncio.wait_for(t.ping(), 5.0)  # a black-holed host: don't hang
                except Exception as exc:  # noqa: BLE001 - any failure is reported alike
                    log.warning("cannot reach Redis at %s: %s: %s",
                                redact_url(redis_url), type(exc).__name__, exc)
            else:
                from orchestrator.embedded import EmbeddedTransport

                t = EmbeddedTransport()
        rt = runtime
        own_runtime = False
        if rt is None and not settings.redis_url:
            observer = metrics.observe
            if tracer is not None:  # + a span per stage call, in the run's trace
                observer = tracing.combine(observer, tracing.SpanRecorder(tracer).observe)
            rt = Runtime.embedded(t, specs, settings, engine_override=override,
                                  observer=observer)
            await rt.start()
            own_runtime = True
            for r in rt.runners:  # announce every stage before the first request arrives
                await t.heartbeat(r.group, r.instance, {"stage": r.stage.name},
                                  settings.heartbeat_ms * 5)
        gw = Gateway(settings, by_name, t, rt, metrics, EnginePool(by_name, rt, override))
        gw.tracer = tracer
        app.state.gateway = gw
        try:
            yield
        finally:
            await gw.close()
            if own_runtime and rt is not None:
                await rt.stop(drain=False)
            if own_transport:
                await t.close()

    app = FastAPI(
        title="alto",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    auth = [Depends(bearer)]
    app.include_router(openai_router, dependencies=auth)
    app.include_router(native_router, dependencies=auth)
    app.include_router(admin_router, dependencies=auth)
    app.include_router(ops_router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.rate_limit_rps > 0:
        limit = RateLimit(settings.rate_limit_rps, settings.rate_limit_burst)
        app.add_middleware(RateLimitMiddleware, limit=limit)
    keys = [reveal(k) or "" for k in settings.api_keys]
    admin_keys = [reveal(k) or "" for k in settings.admin_api_keys]
    key_digests(keys)  # a malformed `sha256:` entry fails here, not at startup
    key_digests(admin_keys, "ALTO_ADMIN_API_KEYS")
    app.add_middleware(AuthMiddleware, keys=keys, admin_keys=admin_keys)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, minus its 422 validation responses: this API answers invalid
    bodies with 400 and OpenAI's error shape, and the document must say exactly that."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in SSE_MODELS:  # described only inside SSE events, so FastAPI missed them
        extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in extra.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault(model.__name__, extra)
    doc["components"]["schemas"] = dict(sorted(schemas.items()))
    schemas = doc["components"]["schemas"]
    schemas.pop("HTTPValidationError", None)
    if '"#/components/schemas/ValidationError"' not in json.dumps(doc):
        schemas.pop("ValidationError", None)
    app.openapi_schema = doc
    return doc


def openapi_json(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"
