"""Bad input and load: API keys (401), body limit (413), admission control (429 with
Retry-After), run deadline; each answered in OpenAI's error shape, and each raising the
official SDK's matching exception class."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import (
    API_KEY,
    LiveServer,
    assert_error_shape,
    auth,
    idle,
    make_server,
    sdk,
    sim_engines,
)

LIMIT = 4096


@pytest.fixture(scope="module")
def strict() -> Iterator[LiveServer]:
    """API keys on, a small body limit, one run at a time, a short deadline, and sim
    engines at real-time speed so a long run really takes long."""
    server = make_server(
        ("toy", "slow"), time_scale=1.0, api_keys=[API_KEY, "second-key"],
        max_body_bytes=LIMIT, max_inflight_runs=1, retry_after_s=2, run_deadline_s=1.5,
        resume_grace_s=0.2,
    )
    try:
        yield server
    finally:
        server.stop()


def test_keys_are_required_on_v1(strict: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(strict, "wrong").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    r = httpx.get(f"{strict.url}/v1/models")
    assert_error_shape(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    # a bad key is refused before the body is looked at
    r = httpx.post(f"{strict.url}/v1/chat/completions", content=b"{not json",
                   headers=auth("wrong"))
    assert_error_shape(r, 401, "invalid_api_key")
    assert {m.id for m in sdk(strict).models.list()} >= {"toy", "slow"}
    assert sdk(strict, "second-key").models.list().data


def test_refusals_before_routing_are_counted_under_their_route(strict: LiveServer) -> None:
    """A 401 or 413 is answered by a middleware before the router runs: it still counts
    under its route's template, not as `unmatched` (and an unknown path still is)."""
    def count(route: str, status: str) -> float:
        for family in text_string_to_metric_families(httpx.get(f"{strict.url}/metrics").text):
            for sample in family.samples:
                if (sample.name == "alto_http_requests_total"
                        and sample.labels.get("route") == route
                        and sample.labels.get("status") == status):
                    return sample.value
        return 0.0

    before = (count("/v1/models", "401"), count("/v1/runs/{run_id}", "401"),
              count("unmatched", "401"))
    assert httpx.get(f"{strict.url}/v1/models").status_code == 401
    assert httpx.get(f"{strict.url}/v1/runs/run_x").status_code == 401
    assert httpx.get(f"{strict.url}/v1/no-such-thing").status_code == 401
    assert (count("/v1/models", "401"), count("/v1/runs/{run_id}", "401"),
            count("unmatched", "401")) == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_health_and_metrics_need_no_key(strict: LiveServer) -> None:
    assert httpx.get(f"{strict.url}/healthz").status_code == 200
    assert httpx.get(f"{strict.url}/readyz").status_code == 200
    assert httpx.get(f"{strict.url}/metrics").status_code == 200


def test_body_over_the_limit_is_413(strict: LiveServer) -> None:
    idle(strict)
    big = "x" * (LIMIT + 10)
    with pytest.raises(openai.APIStatusError) as info:
        sdk(strict).chat.completions.create(model="toy",
                                            messages=[{"role": "user", "content": big}])
    assert type(info.value) is openai.APIStatusError  # the SDK has no subclass for 413
    assert info.value.status_code == 413 and info.value.code == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the streamed size is counted
        yield b'{"input": "'
        yield b"y" * LIMIT
        yield b'"}'

    r = httpx.post(f"{strict.url}/v1/pipelines/toy/runs", content=chunked(), headers=auth())
    assert "content-length" not in r.request.headers
    assert_error_shape(r, 413, "request_too_large")
    small = httpx.post(f"{strict.url}/v1/pipelines/toy/runs", json={"input": "fits"},
                       headers=auth(), timeout=30)
    assert small.json()["output"] == "FITS"


def test_admission_control_refuses_with_429(strict: LiveServer) -> None:
    idle(strict)
    with httpx.Client(base_url=strict.url, headers=auth(), timeout=30) as http, connect_sse(
        http, "POST", "/v1/pipelines/slow/runs", json={"input": "5000"}
    ) as source:
        events = source.iter_sse()  # keep a reference: a dropped iterator closes the stream
        assert next(events).event == "run"  # the run is admitted and running
        with pytest.raises(openai.RateLimitError) as info:
            sdk(strict).chat.completions.create(
                model="toy", messages=[{"role": "user", "content": "x"}]
            )
        assert info.value.status_code == 429 and info.value.code == "too_many_runs"
        assert info.value.response.headers["retry-after"] == "2"
        r = http.post("/v1/pipelines/toy/runs", json={"input": "x"})
        assert_error_shape(r, 429, "too_many_runs")
        assert httpx.get(f"{strict.url}/healthz").status_code == 200  # not admission-bound
    idle(strict)  # leaving the stream cancelled the run and freed its slot
    done = sdk(strict).chat.completions.create(model="toy", messages=[{"role": "user",
                                                                       "content": "x"}])
    assert done.choices[0].message.content == "X"


def test_run_deadline_ends_with_an_error_event_and_cancels(strict: LiveServer) -> None:
    idle(strict)
    engine = sim_engines(strict, "slow")[0]
    before = engine.cancelled
    with httpx.Client(base_url=strict.url, headers=auth(), timeout=30) as http:
        body = http.post("/v1/pipelines/slow/runs", json={"input": "5000"}).json()
    assert body["status"] == "failed"
    assert body["error"]["code"] == "deadline_exceeded"
    # the engine saw the cancel of the still-generating draft call
    strict.call(lambda: engine.wait_until(lambda e: e.cancelled > before and e.running == 0))
    with httpx.Client(base_url=strict.url, headers=auth(), timeout=30) as http, connect_sse(
        http, "GET", f"/v1/runs/{body['id']}/events"
    ) as source:
        replay = [(s.event, s.data) for s in source.iter_sse()]
    assert replay[-1][0] == "error" and "deadline_exceeded" in replay[-1][1]
    with pytest.raises(openai.InternalServerError) as info:
        sdk(strict).chat.completions.create(model="slow",
                                            messages=[{"role": "user", "content": "5000"}])
    assert info.value.status_code == 504 and info.value.code == "deadline_exceeded"
