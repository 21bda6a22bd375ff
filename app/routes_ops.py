"""Liveness, readiness and Prometheus metrics (never behind API keys: probes and scrapers
carry no secrets)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.errors import error_body
from app.gateway import Gateway
from app.schemas import Health, NotReady, Readiness

router = APIRouter(tags=["operations"])


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and serving HTTP (says nothing about Redis or workers)."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {"model": NotReady, "description": "Redis unreachable or a stage has no worker"}
    },
)
async def readyz(request: Request) -> Any:
    """Ready to run every pipeline: the transport answers (Redis reachable) and every
    stage of every pipeline has at least one live instance."""
    gw = gateway(request)
    checks: dict[str, Any] = {"transport": "redis" if gw.settings.redis_url else "embedded"}
    problems: list[str] = []
    try:
        checks["ping"] = bool(await gw.transport.ping())
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        checks["ping"] = False
        problems.append(f"transport unreachable: {type(exc).__name__}: {exc}")
    if checks["ping"]:
        missing: dict[str, list[str]] = {}
        for spec in gw.pipelines.values():
            stages = await gw.missing_stages(spec)
            if stages:
                missing[spec.name] = stages
        checks["missing_workers"] = missing
        if missing:
            problems.append(f"no worker for {missing}")
    elif not problems:
        problems.append("transport did not answer PING")
    if gw.runtime is not None and (failure := gw.runtime.failed()) is not None:
        checks["runtime"] = f"failed: {failure}"
        problems.append(f"embedded runtime failed: {failure}")
    if problems:
        body = error_body("; ".join(problems), "service_unavailable", None, "not_ready")
        return JSONResponse({**body, "checks": checks}, status_code=503)
    return Readiness(checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, runs, admission, per-stage latency and tokens, queue
    depth/pending/lag and live instances per stage, errors."""
    gw = gateway(request)
    try:
        await gw.metrics.refresh(gw.transport, gw.pipelines)
    except Exception:  # noqa: BLE001, S110 - stale queue gauges beat a failed scrape
        gw.metrics.errors.labels("metrics_refresh").inc()
    return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
