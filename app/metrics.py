"""Prometheus metrics of one gateway.

Each app gets its own CollectorRegistry (not prometheus_client's global one), so several
apps can live in one process (tests, or a gateway embedded in something else) without
"duplicated timeseries" errors and without reading each other's numbers.

Sources: the HTTP middleware (requests), the run lifecycle (runs, admission, run
latency, stage completion as the gateway sees it), the embedded Runtime's observer hook
(per-stage engine call latency and tokens; only where the stages run in this process),
and, at scrape time, the transport (queue depth, pending, lag, live instances per stage).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchestrator.spec import PipelineSpec
from orchestrator.transport import Transport
from workers.metrics import record_call
from workers.router import cluster_router_metrics
from workers.status import pipeline_status

log = logging.getLogger("alto.gateway")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def run_outcome(code: str | None) -> str:
    """The `alto_runs_total` outcome of a run that ended with an error event of `code`."""
    return {"deadline_exceeded": "timeout", "cancelled": "cancelled"}.get(code or "error",
                                                                         "failed")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "alto_http_requests", "HTTP requests by route and status",
            ["method", "route", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "alto_http_request_seconds", "Time to the end of the response (streams included)",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.errors = Counter(
            "alto_errors", "Error responses and run errors by code", ["code"], registry=r
        )
        self.runs = Counter(
            "alto_runs", "Runs by outcome (completed, failed, cancelled, timeout; detached: "
            "client gone, left to the resume grace period)",
            ["pipeline", "outcome"], registry=r,
        )
        self.runs_started = Counter("alto_runs_started", "Runs started", ["pipeline"], registry=r)
        self.run_seconds = Histogram(
            "alto_run_seconds", "Run latency, start to result", ["pipeline"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inflight = Gauge("alto_runs_inflight", "Runs and proxied calls admitted now",
                              registry=r)
        self.rejected = Counter("alto_admission_rejected", "Requests refused with 429",
                                registry=r)
        self.viewers = Gauge("alto_run_viewers", "GET /v1/runs/{id}/events streams open now",
                             registry=r)
        self.stage_done_seconds = Histogram(
            "alto_stage_done_seconds", "Time from run start until a stage has finished the run",
            ["pipeline", "stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.stage_call_seconds = Histogram(
            "alto_stage_call_seconds", "One stage call (engine or function), start to end",
            ["pipeline", "stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.stage_first_unit_seconds = Histogram(
            "alto_stage_first_unit_seconds", "One stage call, start to its first unit",
            ["pipeline", "stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.stage_tokens = Counter(
            "alto_stage_tokens", "Engine tokens by stage and kind (prompt, completion, cached)",
            ["pipeline", "stage", "kind"], registry=r,
        )
        self.stage_units = Counter("alto_stage_units", "Units (partial outputs) emitted",
                                   ["pipeline", "stage"], registry=r)
        self.stage_errors = Counter("alto_stage_errors", "Stage errors seen in run events",
                                    ["pipeline", "stage"], registry=r)
        self.stage_retries = Counter(
            "alto_stage_call_retries", "Failed calls tried again (stage retries; embedded mode)",
            ["pipeline", "stage"], registry=r,
        )
        self.queue_length = Gauge("alto_queue_length", "Entries kept in a stage's streams",
                                  ["pipeline", "stage"], registry=r)
        self.queue_pending = Gauge("alto_queue_pending", "Delivered, not yet acknowledged",
                                   ["pipeline", "stage"], registry=r)
        self.queue_lag = Gauge("alto_queue_lag", "Entries not yet delivered to the stage",
                               ["pipeline", "stage"], registry=r)
        self.instances = Gauge("alto_stage_instances", "Live instances (heartbeats) per stage",
                               ["pipeline", "stage"], registry=r)
        self.dead_letters = Gauge(
            "alto_dead_letters", "Unresolved dead letters (failed inputs; `alto dead-letters`)",
            ["pipeline"], registry=r,
        )
        self.proxy_tokens = Counter("alto_proxy_tokens", "Tokens of direct engine-model calls",
                                    ["model", "kind"], registry=r)
        # scheduling of LM stages (workers/router.py: cluster_router_metrics, from the transport)
        self.router_hit_ratio = Gauge(
            "alto_router_prefix_hit_ratio", "Prefix-cache hit rate (cached / prompt tokens) of an "
            "LM stage's calls, per scheduling policy", ["pipeline", "stage", "policy"], registry=r,
        )
        self.instance_load = Gauge(
            "alto_instance_load", "Requests in flight on one instance of a scheduled LM stage",
            ["pipeline", "stage", "instance"], registry=r,
        )
        self.instance_hit_ratio = Gauge(
            "alto_instance_prefix_hit_ratio", "Prefix-cache hit rate of one instance",
            ["pipeline", "stage", "instance"], registry=r,
        )
        self.router_imbalance = Gauge(
            "alto_router_load_imbalance", "max/mean of in-flight requests over a stage's instances",
            ["pipeline", "stage"], registry=r,
        )

    # ---- the Runtime observer hook (workers.runner.Observer) -------------------------------
    def run_error(self, pipeline: str, ev: dict[str, Any]) -> None:
        """A run's error event: `alto_errors_total{code="run_<code>"}` and, when a stage
        failed it, `alto_stage_errors_total` (for runs followed or only supervised)."""
        self.errors.labels(f"run_{ev.get('code') or 'error'}").inc()
        if ev.get("stage"):
            self.stage_errors.labels(pipeline, ev["stage"]).inc()

    def observe(self, event: str, data: dict[str, Any]) -> None:
        """Called by runners in this process after each finished call; must never raise."""
        if event not in ("call", "retry"):
            return
        try:
            labels = (str(data.get("pipeline", "")), str(data.get("stage", "")))
            if event == "retry":
                self.stage_retries.labels(*labels).inc()
                return
            record_call(data, labels, seconds=self.stage_call_seconds,
                        first_unit=self.stage_first_unit_seconds, tokens=self.stage_tokens,
                        units=self.stage_units)
        except Exception:  # noqa: BLE001 - metrics must not break a runner
            log.exception("metrics observer failed")

    # ---- scrape --------------------------------------------------------------------------
    async def refresh(self, transport: Transport, pipelines: dict[str, PipelineSpec]) -> None:
        """Read queue depth and live instances from the transport just before a scrape."""
        for spec in pipelines.values():
            status = await pipeline_status(transport, spec)
            for st in status.stages:
                self.queue_length.labels(spec.name, st.stage).set(st.length)
                self.queue_pending.labels(spec.name, st.stage).set(st.pending)
                self.queue_lag.labels(spec.name, st.stage).set(st.lag)
                self.instances.labels(spec.name, st.stage).set(st.instances)
            self.dead_letters.labels(spec.name).set(status.dead_letters)
        await self._refresh_routers(transport, pipelines)

    async def _refresh_routers(
        self, transport: Transport, pipelines: dict[str, PipelineSpec]
    ) -> None:
        """Per-policy prefix-hit rate and per-instance load of scheduled LM stages. Read
        everything first, then replace the series in one go: an instance that left must
        not keep reporting its last load."""
        rows = [(spec.name, await cluster_router_metrics(transport, spec))
                for spec in pipelines.values()]
        for gauge in (self.router_hit_ratio, self.instance_load, self.instance_hit_ratio,
                      self.router_imbalance):
            gauge.clear()
        for pipeline, stages in rows:
            for st in stages.values():
                stage = st["stage"]
                for policy, numbers in st["policies"].items():
                    if numbers.get("prefix_hit_rate") is not None:
                        self.router_hit_ratio.labels(pipeline, stage, policy).set(
                            numbers["prefix_hit_rate"])
                for name, info in st["instances"].items():
                    self.instance_load.labels(pipeline, stage, name).set(
                        float(info.get("inflight") or 0))
                    if info.get("prefix_hit_rate") is not None:
                        self.instance_hit_ratio.labels(pipeline, stage, name).set(
                            info["prefix_hit_rate"])
                if st["load_imbalance"] is not None:
                    self.router_imbalance.labels(pipeline, stage).set(st["load_imbalance"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
