"""/metrics: Prometheus text with requests, runs, per-stage latency and tokens, queue
depth/lag and live instances per stage, errors; each app has its own registry."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer
from workers.engines.tokens import count_tokens


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:  # noqa: ANN001
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_the_traffic(gateway: LiveServer) -> None:
    before = scrape(gateway)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/pipelines/slow/runs", json={"input": "4"}).status_code == 200
        assert http.post("/v1/pipelines/fanout/runs", json={"input": "q:x"}).status_code == 200
        assert http.get("/v1/pipelines/nope").status_code == 404
    after = scrape(gateway)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"method": "POST", "route": "/v1/pipelines/{name}/runs", "status": "200"}
    assert grew("alto_http_requests_total", **route) == 2
    assert grew("alto_http_requests_total", method="GET", route="/v1/pipelines/{name}",
                status="404") == 1
    assert grew("alto_runs_total", pipeline="slow", outcome="completed") == 1
    assert grew("alto_runs_total", pipeline="fanout", outcome="failed") == 1
    assert grew("alto_stage_errors_total", pipeline="fanout", stage="fan") == 1
    assert grew("alto_dead_letters", pipeline="fanout") == 1  # the failed input, unresolved
    assert grew("alto_run_seconds_count", pipeline="slow") == 1
    # per-stage engine calls (the runtime's observer hook): 1 draft + 4 expand
    assert grew("alto_stage_call_seconds_count", pipeline="slow", stage="draft") == 1
    assert grew("alto_stage_call_seconds_count", pipeline="slow", stage="expand") == 4
    draft_text = "".join(f"line {i}\n" for i in range(1, 5))  # what the draft responder wrote
    assert grew("alto_stage_tokens_total", pipeline="slow", stage="draft",
                kind="completion") == count_tokens(draft_text)
    assert grew("alto_stage_done_seconds_count", pipeline="slow", stage="expand") == 1
    assert grew("alto_errors_total", code="http_404") == 1
    # scrape-time gauges, one series per stage
    for stage in ("claims", "queries", "search", "verify", "report"):
        assert ("alto_queue_lag", (("pipeline", "factool"), ("stage", stage))) in after
        assert value(after, "alto_queue_lag", pipeline="factool", stage=stage) == 0
    assert value(after, "alto_stage_instances", pipeline="factool", stage="claims") == 4
    assert value(after, "alto_stage_instances", pipeline="toy", stage="up") == 1
    assert value(after, "alto_runs_inflight") == 0


def test_each_app_has_its_own_registry() -> None:
    from app.main import create_app
    from workers.settings import Settings

    a = create_app(Settings(), pipelines=[])
    b = create_app(Settings(), pipelines=[])
    assert a.state.metrics.registry is not b.state.metrics.registry
    a.state.metrics.rejected.inc()
    assert b.state.metrics.rejected._value.get() == 0
