"""Prometheus metrics and health endpoints of one `alto worker` process.

A worker hosts one stage, usually as one runner instance, so per-process numbers are
per-instance numbers: Prometheus' own `instance`/`pod` target labels tell instances apart,
and the metrics carry only `pipeline` and `stage` (a random consumer name as a label would
make a new series at every restart; `alto_worker_info` maps the pod to its Redis consumer
names). A worker running several runners (`--instances N`) reports their sum: the counters
add up by themselves, and `alto_stage_inflight`/`alto_stage_capacity` are summed at scrape
time (the process's load against the process's slots).

Names follow the gateway's (app/metrics.py) where the meaning is the same, so one
dashboard covers embedded and distributed deployments: the per-call series come from
workers when stages run there and from the gateway when they run embedded, never both.
Queue gauges are the consumer group's, read from Redis at scrape time; every instance of
a stage reports the same value (aggregate them with `max by (pipeline, stage)`).

The HTTP server is a few lines of asyncio on the worker's own event loop, not a thread:
`/healthz` answering at all proves the loop is not stuck, which is what a liveness probe
should test. `/readyz` says the stage's runner is started, alive, and Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

log = logging.getLogger("alto.worker.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STAGE = ["pipeline", "stage"]


@functools.lru_cache(maxsize=4096)
def _child(metric: Histogram | Counter, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: prometheus_client validates the labels and takes
    a lock on every lookup, a few microseconds paid several times per call on a hot path.
    Only for series that are never removed (per-call histograms and counters)."""
    return metric.labels(*labels)


def record_call(data: dict[str, Any], labels: tuple[str, str], *, seconds: Histogram,
                first_unit: Histogram, tokens: Counter, units: Counter) -> None:
    """One finished call (a runner's "call" event) into the per-call series. Shared with the
    gateway (app/metrics.py) so a call counts the same whether its stage runs embedded or
    in a worker."""
    _child(seconds, *labels).observe(float(data.get("seconds") or 0.0))
    if data.get("first_unit_s") is not None:
        _child(first_unit, *labels).observe(float(data["first_unit_s"]))
    for kind in ("prompt", "completion", "cached"):
        n = data.get(f"{kind}_tokens") or 0
        if n:
            _child(tokens, *labels, kind).inc(n)
    if data.get("units"):
        _child(units, *labels).inc(int(data["units"]))


class WorkerMetrics:
    """Collectors of one worker process, on their own registry (several can coexist)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        self.info = Gauge("alto_worker_info", "Always 1; names the Redis consumer of this worker",
                          [*_STAGE, "consumer"], registry=r)
        self.call_seconds = Histogram(
            "alto_stage_call_seconds", "One stage call (engine or function), start to end",
            _STAGE, buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.first_unit_seconds = Histogram(
            "alto_stage_first_unit_seconds", "One stage call, start to its first unit",
            _STAGE, buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "alto_stage_tokens", "Engine tokens by stage and kind (prompt, completion, cached)",
            [*_STAGE, "kind"], registry=r,
        )
        self.units = Counter("alto_stage_units", "Units (partial outputs) emitted", _STAGE,
                             registry=r)
        self.call_errors = Counter(
            "alto_stage_call_errors", "Inputs this instance failed (the run got an error event)",
            _STAGE, registry=r,
        )
        self.call_retries = Counter(
            "alto_stage_call_retries", "Failed calls this instance tried again (stage retries)",
            _STAGE, registry=r,
        )
        self.reclaimed = Counter(
            "alto_stage_reclaimed_messages",
            "Abandoned entries of other (dead or stuck) consumers this instance claimed",
            _STAGE, registry=r,
        )
        self.inflight = Gauge("alto_stage_inflight", "Inputs being processed by this instance",
                              _STAGE, registry=r)
        self.capacity = Gauge("alto_stage_capacity", "Inputs this instance may process at once",
                              _STAGE, registry=r)
        self.queue_length = Gauge("alto_queue_length", "Entries kept in a stage's streams",
                                  _STAGE, registry=r)
        self.queue_pending = Gauge("alto_queue_pending", "Delivered, not yet acknowledged",
                                   _STAGE, registry=r)
        self.queue_lag = Gauge("alto_queue_lag", "Entries not yet delivered to the stage",
                               _STAGE, registry=r)

    # ---- the runner observer hook (workers.runner.Observer) --------------------------------
    def observe(self, event: str, data: dict[str, Any]) -> None:
        """Called by runners after each call, failure or reclaim; must never raise."""
        try:
            labels = (str(data.get("pipeline", "")), str(data.get("stage", "")))
            if event == "call":
                record_call(data, labels, seconds=self.call_seconds,
                            first_unit=self.first_unit_seconds, tokens=self.tokens,
                            units=self.units)
            elif event == "error":
                self.call_errors.labels(*labels).inc()
            elif event == "retry":
                self.call_retries.labels(*labels).inc()
            elif event == "reclaimed":
                self.reclaimed.labels(*labels).inc(int(data.get("count") or 0))
        except Exception:  # noqa: BLE001 - metrics must not break a runner
            log.exception("metrics observer failed")

    # ---- scrape --------------------------------------------------------------------------
    async def refresh(self, runtime: Any) -> None:
        """Queue depth of each hosted stage's group and the runners' load, at scrape time."""
        from workers.status import queue_depth

        # summed per stage: one process may run several runners of a stage (--instances),
        # and each setting the same series left only the last one's load showing
        load: dict[tuple[str, str], tuple[int, int]] = {}
        specs: dict[tuple[str, str], Any] = {}
        for r in runtime.runners:
            labels = (r.spec.name, r.stage.name)
            self.info.labels(*labels, r.instance).set(1)
            inflight, capacity = load.get(labels, (0, 0))
            load[labels] = (inflight + r.inflight, capacity + r.capacity)
            specs[labels] = r.spec
        for labels, (inflight, capacity) in load.items():
            self.inflight.labels(*labels).set(inflight)
            self.capacity.labels(*labels).set(capacity)
            # the group's depth, the same for every runner of the stage: read once
            length, pending, lag = await queue_depth(runtime.transport, specs[labels],
                                                     labels[1])
            self.queue_length.labels(*labels).set(length)
            self.queue_pending.labels(*labels).set(pending)
            self.queue_lag.labels(*labels).set(lag)

    def render(self) -> bytes:
        return generate_latest(self.registry)


Handler = Callable[[], Awaitable[tuple[int, str, bytes]]]


async def _respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   routes: dict[str, Handler]) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
        parts = line.decode("latin-1").split()
        while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
            pass  # headers: nothing here needs them
        path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
        handler = routes.get(path)
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", b"method not allowed\n"
        elif handler is None:
            status, ctype, body = 404, "text/plain", b"not found\n"
        else:
            try:
                status, ctype, body = await handler()
            except Exception as exc:  # noqa: BLE001 - a failing check is an answer, not a crash
                status, ctype, body = 500, "text/plain", f"{type(exc).__name__}: {exc}\n".encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Error",
                  503: "Service Unavailable"}.get(status, "")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + (b"" if parts[0] == "HEAD" else body))
        await writer.drain()
    except (TimeoutError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve_worker_http(metrics: WorkerMetrics, runtime: Any, host: str,
                            port: int) -> asyncio.Server:
    """Start /metrics, /healthz and /readyz on `host:port`; the caller closes the server.

    `runtime.runners` is empty until the stage has started (engines loaded), so a worker
    loading a model is alive but not ready."""

    async def healthz() -> tuple[int, str, bytes]:
        return 200, "application/json", b'{"status":"ok"}'

    async def readyz() -> tuple[int, str, bytes]:
        problems: list[str] = []
        if not runtime.runners:
            problems.append("stage not started")
        if (failure := runtime.failed()) is not None:
            problems.append(f"runner failed: {failure}")
        try:
            if not await asyncio.wait_for(runtime.transport.ping(), 5):
                problems.append("transport did not answer PING")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"transport unreachable: {type(exc).__name__}: {exc}")
        body = {"status": "not_ready" if problems else "ready", "problems": problems}
        return (503 if problems else 200), "application/json", json.dumps(body).encode()

    async def scrape() -> tuple[int, str, bytes]:
        try:
            await metrics.refresh(runtime)
        except Exception:  # noqa: BLE001 - stale queue gauges beat a failed scrape
            log.warning("metrics refresh failed", exc_info=True)
        return 200, CONTENT_TYPE_LATEST, metrics.render()

    routes: dict[str, Handler] = {"/healthz": healthz, "/readyz": readyz, "/metrics": scrape}
    return await asyncio.start_server(lambda r, w: _respond(r, w, routes), host, port)


def probe(ports: list[int], timeout: float = 3.0) -> bool:
    """Whether any alto process in this container answers /healthz on one of `ports`
    (the image's HEALTHCHECK: the gateway listens on ALTO_PORT, a worker on
    ALTO_METRICS_PORT, and one image serves both roles)."""
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
                if r.status == 200:
                    return True
        except OSError:
            continue
    return False


def main() -> None:
    """`python -m workers.metrics probe`: exit 0 if healthy (docker HEALTHCHECK)."""
    if sys.argv[1:] != ["probe"]:
        print("usage: python -m workers.metrics probe", file=sys.stderr)
        sys.exit(2)
    ports = [int(os.environ[k]) for k in ("ALTO_PORT", "ALTO_METRICS_PORT")
             if os.environ.get(k, "").strip().isdigit() and int(os.environ[k]) > 0]
    sys.exit(0 if probe(ports or [8000]) else 1)


if __name__ == "__main__":
    main()
