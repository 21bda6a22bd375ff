"""Viewers of run events are bounded: every open `GET /v1/runs/{id}/events` stream holds a
bus connection in a blocking read, and nothing bounded them (the gateway's Redis pool is
sized for the admitted runs and ALTO_MAX_RUN_VIEWERS viewers). One more gets 429
`too_many_viewers` with Retry-After; a closed viewer makes room again. Over a real uvicorn
server, with httpx and httpx-sse."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import connect_sse

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer, assert_error_shape, make_server, wait_for
from tests.test_gateway_metrics import scrape, value
from tests.toy import faulty

RUNS = "/v1/pipelines/stuck/runs"


@pytest.fixture
def server() -> Iterator[LiveServer]:
    faulty.HANGING.add("hold")  # the run never ends on its own
    server = make_server(("stuck",), max_run_viewers=1, retry_after_s=3)
    try:
        yield server
    finally:
        server.stop()
        faulty.HANGING.discard("hold")


def test_one_viewer_more_than_the_bound_gets_429_until_one_leaves(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http, connect_sse(
        http, "POST", RUNS, json={"input": "hold"}
    ) as own:
        own_events = own.iter_sse()  # the run's own stream: not a viewer
        run = next(own_events).json()["run"]
        events = f"/v1/runs/{run}/events"
        with connect_sse(http, "GET", events) as viewer:
            seen = viewer.iter_sse()
            assert next(seen).event == "run"  # the one viewer allowed follows the run
            assert value(scrape(server), "alto_run_viewers") == 1
            refused = http.get(events)
            assert_error_shape(refused, 429, "too_many_viewers")
            assert refused.headers["retry-after"] == "3"
            assert server.gateway.inflight == 1  # the run itself goes on
        wait_for(lambda: server.gateway.viewers == 0, 30, "the viewer to leave")
        with connect_sse(http, "GET", events) as again:
            assert next(again.iter_sse()).event == "run"
        wait_for(lambda: server.gateway.viewers == 0, 30, "the second viewer to leave")
        assert value(scrape(server), "alto_run_viewers") == 0
