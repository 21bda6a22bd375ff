"""Admission and limits, through the public HTTP API: per-stage queue bounds (429 +
Retry-After), prompt length (400 `context_length_exceeded` naming the field), a
per-request deadline (`X-Alto-Deadline`, bounded; expiry cancels the run everywhere), and
the run status / cancel endpoints."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import (
    LiveServer,
    assert_error_shape,
    idle,
    make_server,
    sdk,
    sim_engines,
    wait_for,
)

MAX_PROMPT = 64


@pytest.fixture(scope="module")
def limits() -> Iterator[LiveServer]:
    """Real-time sim engines (a long `slow` run really takes long), a default deadline
    far beyond any test (so only a request's own deadline can end a run early), a small
    prompt limit and a low deadline maximum."""
    server = make_server(
        ("toy", "slow"), time_scale=1.0, run_deadline_s=600, max_run_deadline_s=900,
        max_prompt_chars=MAX_PROMPT, resume_grace_s=0.0,
    )
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------
# prompt length
# ------------------------------------------------------------------------------------------


def test_prompt_over_the_limit_is_400_naming_the_field(limits: LiveServer) -> None:
    long = "w " * MAX_PROMPT
    client = sdk(limits)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="toy", messages=[{"role": "user", "content": long}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="toy", prompt=long)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as info:  # an engine model, too
        client.chat.completions.create(model="slow/default",
                                       messages=[{"role": "user", "content": long}])
    assert info.value.param == "messages"
    r = httpx.post(f"{limits.url}/v1/pipelines/toy/runs", json={"input": long}, timeout=30)
    err = assert_error_shape(r, 400, "context_length_exceeded")
    assert err["param"] == "input" and str(MAX_PROMPT) in err["message"]
    assert limits.gateway.inflight == 0  # refused before taking a slot
    fits = client.completions.create(model="toy", prompt="w " * (MAX_PROMPT // 2 - 1))
    assert fits.choices[0].text.startswith("W W")


# ------------------------------------------------------------------------------------------
# per-request deadline
# ------------------------------------------------------------------------------------------


def test_request_deadline_fails_and_cancels_the_run(limits: LiveServer) -> None:
    idle(limits)
    engine = sim_engines(limits, "slow")[0]
    before = engine.cancelled
    client = sdk(limits)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "5000"}],
            extra_headers={"X-Alto-Deadline": "0.5"},
        )
    assert info.value.status_code == 504 and info.value.code == "deadline_exceeded"
    assert "0.5 s" in info.value.message
    limits.call(lambda: engine.wait_until(lambda e: e.cancelled > before and e.running == 0))
    idle(limits)


def test_native_deadline_is_recorded_and_enforced_on_resume(limits: LiveServer) -> None:
    idle(limits)
    with httpx.Client(base_url=limits.url, timeout=30) as http:
        body = http.post("/v1/pipelines/slow/runs", json={"input": "5000"},
                         headers={"X-Alto-Deadline": "0.4"}).json()
        assert body["status"] == "failed" and body["error"]["code"] == "deadline_exceeded"
        status = http.get(f"/v1/runs/{body['id']}").json()
        assert status["deadline_s"] == 0.4 and status["status"] == "failed"
        assert status["error"]["code"] == "deadline_exceeded"
        with connect_sse(http, "GET", f"/v1/runs/{body['id']}/events") as source:
            replay = [(s.event, s.data) for s in source.iter_sse()]
    assert replay[0][0] == "run" and '"deadline_s":0.4' in replay[0][1]
    assert replay[-1][0] == "error" and "deadline_exceeded" in replay[-1][1]


@pytest.mark.parametrize("value", ["0", "0.0", "901", "abc", "-1", "1e3", "nan", "inf"])
def test_bad_deadline_header_is_400(limits: LiveServer, value: str) -> None:
    r = httpx.post(f"{limits.url}/v1/pipelines/toy/runs", json={"input": "x"},
                   headers={"X-Alto-Deadline": value}, timeout=30)
    err = assert_error_shape(r, 400, "invalid_value")
    assert err["param"] == "X-Alto-Deadline"
    with pytest.raises(openai.BadRequestError) as info:
        sdk(limits).chat.completions.create(
            model="toy", messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Alto-Deadline": value})
    assert info.value.param == "X-Alto-Deadline"


def test_deadline_within_the_maximum_is_accepted(limits: LiveServer) -> None:
    done = sdk(limits).chat.completions.create(
        model="toy", messages=[{"role": "user", "content": "in time"}],
        extra_headers={"X-Alto-Deadline": "900"})
    assert done.choices[0].message.content == "IN TIME"


# ------------------------------------------------------------------------------------------
# status and cancel
# ------------------------------------------------------------------------------------------


def test_cancel_endpoint_stops_a_running_run(limits: LiveServer) -> None:
    idle(limits)
    engine = sim_engines(limits, "slow")[0]
    before = engine.cancelled
    with httpx.Client(base_url=limits.url, timeout=30) as http, connect_sse(
        http, "POST", "/v1/pipelines/slow/runs", json={"input": "5000"}
    ) as source:
        events = source.iter_sse()
        assert next(events).event == "run"
        assert next(events).event == "partial"
        run = source.response.headers["x-alto-run"]
        assert http.get(f"/v1/runs/{run}").json()["status"] == "running"
        out = http.post(f"/v1/runs/{run}/cancel").json()
        assert out["status"] == "cancelled" and out["error"]["code"] == "cancelled"
        last = list(events)[-1]
        assert last.event == "error" and '"cancelled"' in last.data
        # cancelling again changes nothing
        assert http.post(f"/v1/runs/{run}/cancel").json()["status"] == "cancelled"
    limits.call(lambda: engine.wait_until(lambda e: e.cancelled > before and e.running == 0))


def test_cancel_of_a_finished_run_keeps_its_outcome(limits: LiveServer) -> None:
    with httpx.Client(base_url=limits.url, timeout=30) as http:
        r = http.post("/v1/pipelines/toy/runs", json={"input": "done"})
        run = r.headers["x-alto-run"]
        assert http.post(f"/v1/runs/{run}/cancel").json()["status"] == "completed"
        assert http.get(f"/v1/runs/{run}").json()["status"] == "completed"
        assert_error_shape(http.get("/v1/runs/run_00000000000000000000000000000000"), 404,
                 "run_not_found")


# ------------------------------------------------------------------------------------------
# per-stage queue bound
# ------------------------------------------------------------------------------------------


@pytest.fixture
def bounded() -> Iterator[LiveServer]:
    """One draft slot (so a second run waits in draft's stream) and a bound of one
    queued entry on draft only; stats read on every admission (no cache) so the test
    needs no waiting for a cache to expire."""
    server = make_server(
        ("slow",), time_scale=1.0, concurrency=1, max_queue_stages={"slow.draft": 1},
        queue_stats_cache_s=0.0, resume_grace_s=0.0, retry_after_s=3,
    )
    try:
        yield server
    finally:
        server.stop()


def test_stage_queue_bound_answers_429_with_retry_after(bounded: LiveServer) -> None:
    gw = bounded.gateway
    spec = gw.pipelines["slow"]
    with httpx.Client(base_url=bounded.url, timeout=30) as http, connect_sse(
        http, "POST", "/v1/pipelines/slow/runs", json={"input": "5000"}
    ) as first, connect_sse(
        http, "POST", "/v1/pipelines/slow/runs", json={"input": "5000"}
    ) as second:
        one, two = first.iter_sse(), second.iter_sse()
        assert next(one).event == "run" and next(two).event == "run"
        wait_for(lambda: bounded.call(lambda: gw.queues.backlog(spec, "draft")) == 1,
                 what="the second run to wait in draft's queue")
        with pytest.raises(openai.RateLimitError) as info:
            sdk(bounded).chat.completions.create(
                model="slow", messages=[{"role": "user", "content": "1"}])
        assert info.value.code == "queue_full" and "draft" in info.value.message
        assert info.value.response.headers["retry-after"] == "3"
        r = http.post("/v1/pipelines/slow/runs", json={"input": "1"})
        assert_error_shape(r, 429, "queue_full")
    # both clients left: their runs are cancelled, the queue drains, runs are admitted
    wait_for(lambda: bounded.call(lambda: gw.queues.backlog(spec, "draft")) == 0,
             timeout=20, what="draft's queue to drain")
    done = sdk(bounded).chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "2"}])
    assert done.choices[0].message.content == "echo line 1\necho line 2"


def test_queue_bounds_resolve_per_stage() -> None:
    from app.admission import QueueGuard
    from tests.gateway_fixtures import pipelines
    from workers.settings import Settings

    spec = pipelines("slow")[0]
    s = Settings(max_queue=10, max_queue_stages={"expand": 0, "slow.draft": 3, "draft": 7})
    guard = QueueGuard(s, None, None)  # type: ignore[arg-type] - bound() reads settings only
    assert guard.bound(spec, "draft") == 3  # pipeline.stage beats stage
    assert guard.bound(spec, "expand") == 0  # 0: unbounded
    assert QueueGuard(Settings(max_queue=10), None, None).bound(spec, "expand") == 10  # type: ignore[arg-type]
