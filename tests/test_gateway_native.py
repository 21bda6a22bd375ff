"""The native API with httpx + httpx-sse: typed SSE events with ids, JSON runs, pipeline
listing, and replay/resume of a run's events with Last-Event-ID."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from orchestrator.tracker import event_order
from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer, assert_error_shape

ROOT = Path(__file__).resolve().parents[1]
Event = tuple[str, str, dict[str, Any]]  # (id, event type, data)


def read_events(http: httpx.Client, method: str, url: str, *, limit: int | None = None,
                **kw: Any) -> tuple[list[Event], httpx.Response]:
    out: list[Event] = []
    with connect_sse(http, method, url, **kw) as source:
        source.response.raise_for_status()
        for sse in source.iter_sse():
            out.append((sse.id, sse.event, json.loads(sse.data)))
            if limit is not None and len(out) >= limit:
                break  # leaving the block drops the connection mid-stream
        return out, source.response


def test_sse_run_typed_events(gateway: LiveServer) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        events, response = read_events(http, "POST", "/v1/pipelines/toy/runs",
                                       json={"input": "hello brave world"})
    assert response.headers["content-type"].startswith("text/event-stream")
    types = [t for _, t, _ in events]
    assert types[0] == "run" and types[-1] == "result"
    run = events[0][2]["run"]
    assert response.headers["x-alto-run"] == run
    assert all(d.get("run", run) == run for _, _, d in events)
    ids = [i for i, _, _ in events]
    assert all(ids) and sorted(ids, key=event_order) == ids and len(set(ids)) == len(ids)
    partials = [d for _, t, d in events if t == "partial"]
    assert sorted(d["text"] for d in partials if d["stage"] == "up") == ["BRAVE", "HELLO", "WORLD"]
    for d in partials:
        assert {"stage", "key", "lineage", "data", "text", "final"} <= set(d)
        assert "mid" not in d  # internal de-duplication ids stay inside
    assert [d["stage"] for _, t, d in events if t == "stage_done"] == ["split", "up", "join"]
    assert events[-1][2]["output"] == "HELLO BRAVE WORLD"


def test_alto_run_json_prints_the_native_events(gateway: LiveServer) -> None:
    """QA: `alto run --json` printed the internal `mid` and `partial` events without
    `text`; its lines are now the native SSE stream's event data, as the README says."""
    text = "hello brave world"
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        events, _ = read_events(http, "POST", "/v1/pipelines/toy/runs", json={"input": text})
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "run", str(ROOT / "tests/gateway_pipelines/toy.yaml"),
         "--input", text, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = [json.loads(line) for line in proc.stdout.splitlines()]

    def same(run: str, evs: list[dict[str, Any]]) -> list[str]:
        # the run id, its creation time (whole seconds) and deadline (the gateway's
        # default, alto run's --deadline) differ
        return sorted(json.dumps({k: "RUN" if v == run else 0 if k in ("created", "deadline_s")
                                  else v for k, v in ev.items()}, sort_keys=True) for ev in evs)

    assert same(printed[0]["run"], printed) == same(events[0][2]["run"],
                                                    [d for _, _, d in events])
    assert all("mid" not in ev for ev in printed) and printed[0]["deadline_s"] == 600
    assert {ev["text"] for ev in printed if ev["type"] == "partial" and ev["stage"] == "up"} \
        == {"HELLO", "BRAVE", "WORLD"}


def test_json_run_has_result_and_all_partials(gateway: LiveServer) -> None:
    r = httpx.post(f"{gateway.url}/v1/pipelines/fanout/runs", json={"input": "z:4"}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "completed" and body["object"] == "pipeline.run"
    assert body["units"] == ["z#0", "z#1", "z#2", "z#3"]
    assert sorted(p["lineage"] for p in body["partials"]) == [f"fan.{i}" for i in range(1, 5)]
    assert all(p["final"] for p in body["partials"])
    assert body["stages_done"] == ["fan"] and body["error"] is None
    assert r.headers["x-alto-run"] == body["id"]


def test_json_run_failure_is_reported_in_the_body(gateway: LiveServer) -> None:
    body = httpx.post(f"{gateway.url}/v1/pipelines/fanout/runs", json={"input": "z:y"},
                      timeout=30).json()
    assert body["status"] == "failed" and body["output"] is None
    assert body["error"]["code"] == "stage_error" and body["error"]["stage"] == "fan"


def test_factool_sim_end_to_end(gateway: LiveServer) -> None:
    text = "Paris is the capital of France. The Danube flows into the North Sea."
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        events, _ = read_events(http, "POST", "/v1/pipelines/factool/runs", json={"input": text})
    stages = {d["stage"] for _, t, d in events if t == "partial"}
    assert stages == {"claims", "queries", "search", "verify", "report"}
    report = events[-1][2]["output"]
    assert events[-1][1] == "result" and len(report["claims"]) >= 2


def test_pipelines_listing(gateway: LiveServer) -> None:
    with httpx.Client(base_url=gateway.url) as http:
        listed = http.get("/v1/pipelines").json()
        one = http.get("/v1/pipelines/factool").json()
        missing = http.get("/v1/pipelines/nope")
    assert {p["name"] for p in listed["data"]} == {"factool", "toy", "fanout", "slow"}
    assert one["output"] == "report" and one["entry"] == "claims"
    verify = next(s for s in one["stages"] if s["name"] == "verify")
    assert verify["aggregate_by"] == ["request", "claims"] and verify["engine"] == "default"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "pipeline_not_found"


def test_resume_after_disconnect_loses_nothing(gateway: LiveServer) -> None:
    """Drop the stream after 3 events, resume with Last-Event-ID: together the two
    connections saw exactly the run's event log, each event once, and the run completed
    (the resume within the grace period kept it alive)."""
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        head, _ = read_events(http, "POST", "/v1/pipelines/slow/runs", json={"input": "300"},
                              limit=3)
        run = head[0][2]["run"]
        tail, _ = read_events(http, "GET", f"/v1/runs/{run}/events",
                              headers={"Last-Event-ID": head[-1][0]})
        full, _ = read_events(http, "GET", f"/v1/runs/{run}/events")
    assert tail[-1][1] == "result", tail[-1]
    assert head + tail == full
    outputs = [d["data"] for _, t, d in full if t == "partial" and d["stage"] == "expand"]
    assert sorted(outputs) == sorted(f"echo line {i}" for i in range(1, 301))


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_resume_from_any_id_including_derived_ones(gateway: LiveServer, cut: int) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        full, _ = read_events(http, "POST", "/v1/pipelines/toy/runs", json={"input": "a b c"})
        run = full[0][2]["run"]
        after = full[cut - 1][0]
        rest, _ = read_events(http, "GET", f"/v1/runs/{run}/events",
                              headers={"Last-Event-ID": after})
        by_query, _ = read_events(http, "GET", f"/v1/runs/{run}/events", params={"after": after})
    assert rest == full[cut:] == by_query


def test_events_of_unknown_run_and_bad_ids(gateway: LiveServer) -> None:
    with httpx.Client(base_url=gateway.url) as http:
        r = http.get("/v1/runs/run_doesnotexist/events")
        assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"
        run = http.post("/v1/pipelines/toy/runs", json={"input": "x"}).json()["id"]
        bad = http.get(f"/v1/runs/{run}/events", headers={"Last-Event-ID": "not-an-id"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
        assert bad.json()["error"]["code"] == "invalid_event_id"  # as docs/API.md says
        assert "not-an-id" in bad.json()["error"]["message"]
        by_query = http.get(f"/v1/runs/{run}/events", params={"after": "garbage"})
        assert by_query.status_code == 400 and by_query.json()["error"] == {
            "message": "not an event id of this API: 'garbage'", "type": "invalid_request_error",
            "param": "after", "code": "invalid_event_id"}


@pytest.mark.parametrize("body", [b'{"input": "\xff"}', b"[" * 100_000 + b"]" * 100_000])
def test_a_body_that_cannot_be_decoded_is_invalid_json(gateway: LiveServer, body: bytes) -> None:
    r = httpx.post(f"{gateway.url}/v1/pipelines/toy/runs", content=body,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param"),
    [({}, "input"), ({"input": 3}, "input"), ({"input": "x", "extra": 1}, "extra")],
)
def test_run_body_validation(gateway: LiveServer, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{gateway.url}/v1/pipelines/toy/runs", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_health_and_readiness(gateway: LiveServer) -> None:
    with httpx.Client(base_url=gateway.url) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["missing_workers"] == {}


def test_engine_override_applies_to_every_lm_stage() -> None:
    """`alto serve --engine sim --engine-opt ...`: one override engine for all LM stages,
    also behind the engine models."""
    from tests.gateway_fixtures import make_server

    server = make_server(("slow",), engine="sim", engine_options={"capacity": 3, "seed": 7})
    try:
        keys = {key for key, _ in server.gateway.runtime.engines}
        assert keys == {"override:sim"}
        assert all(e.capacity == 3 for e in server.gateway.runtime.engines.values())
        with httpx.Client(base_url=server.url, timeout=30) as http:
            models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
            body = http.post("/v1/pipelines/slow/runs", json={"input": "2"}).json()
        assert models["slow/default"]["alto"]["engine_kind"] == "sim"
        assert body["units"] == ["echo line 1", "echo line 2"]
    finally:
        server.stop()


def test_an_id_past_the_end_of_the_log_is_refused(gateway: LiveServer) -> None:
    """No run sent it (ids are given out as events are appended): following from it
    showed an empty stream without the run's end (QA)."""
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        full, _ = read_events(http, "POST", "/v1/pipelines/toy/runs", json={"input": "a b"})
        run = full[0][2]["run"]
        last = full[-1][0]
        past = f"{int(last.partition('-')[0]) + 1000}-0"
        by_header = http.get(f"/v1/runs/{run}/events", headers={"Last-Event-ID": past})
        by_query = http.get(f"/v1/runs/{run}/events", params={"after": past})
        after_last, _ = read_events(http, "GET", f"/v1/runs/{run}/events",
                                    headers={"Last-Event-ID": last})
    for r, param in ((by_header, "Last-Event-ID"), (by_query, "after")):
        err = assert_error_shape(r, 404, "event_not_found")
        assert err["param"] == param and "past the end" in err["message"]
    assert after_last == []  # the last id itself is fine: nothing follows it
