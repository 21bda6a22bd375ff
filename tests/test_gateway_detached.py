"""Runs no client follows are still the gateway's: a replayed dead letter gets the run
deadline (enforced although nobody reads it) and the run metrics, and a native stream
the client dropped keeps its admission slot while the run goes on (QA: 30 dropped SSE
runs ran at once under a limit of 4; a replayed run hung 35 s past a 5 s deadline)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer, assert_error_shape, make_server, wait_for
from tests.test_gateway_metrics import scrape, value
from tests.toy import faulty
from workers.client import start_run

RUNS = "/v1/pipelines/stuck/runs"


@pytest.fixture
def words() -> Iterator[tuple[set[str], set[str]]]:
    faulty.BROKEN.clear()
    faulty.HANGING.clear()
    yield faulty.BROKEN, faulty.HANGING
    faulty.BROKEN.clear()
    faulty.HANGING.clear()


def _events(server: LiveServer, run: str) -> list[dict[str, Any]]:
    t = server.gateway.transport
    return [ev for _, ev in server.call(lambda: t.read_events(run, None, 100, 0))]


def test_a_replayed_run_gets_the_deadline_and_the_metrics(
        words: tuple[set[str], set[str]]) -> None:
    broken, hanging = words
    server = make_server(("stuck",), run_deadline_s=1.0)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            broken.add("w")
            failed = http.post(RUNS, json={"input": "w"}).json()
            assert failed["status"] == "failed", failed
            broken.clear()
            hanging.add("w")  # the "fix" makes the input hang instead
            before = scrape(server)
            replayed = http.post("/v1/pipelines/stuck/dead-letters/replay",
                                 json={"all": True})
            assert replayed.status_code == 200, replayed.text
            [run] = set(replayed.json()["runs"].values())

            def timed_out() -> bool:
                return any(ev.get("type") == "error" and ev.get("code") == "deadline_exceeded"
                           for ev in _events(server, run))

            # nobody asks about the run: the gateway itself must end it at its deadline
            wait_for(timed_out, 30, "the replayed run to be failed at its deadline")
            assert _events(server, run)[0]["deadline_s"] == 1.0

            def counted() -> bool:
                return value(scrape(server), "alto_runs_total", pipeline="stuck",
                             outcome="timeout") == value(before, "alto_runs_total",
                                                         pipeline="stuck", outcome="timeout") + 1

            wait_for(counted, 30, "the replayed run's outcome in alto_runs_total")
            errors = value(scrape(server), "alto_errors_total", code="run_deadline_exceeded")
            assert errors == value(before, "alto_errors_total", code="run_deadline_exceeded") + 1
            started = value(scrape(server), "alto_runs_started_total", pipeline="stuck")
            assert started == value(before, "alto_runs_started_total", pipeline="stuck") + 1
    finally:
        server.stop()


def test_a_dropped_stream_keeps_its_slot_until_the_run_ends(
        words: tuple[set[str], set[str]]) -> None:
    _, hanging = words
    hanging.add("hold")
    server = make_server(("stuck",), max_inflight_runs=1, resume_grace_s=600)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with connect_sse(http, "POST", RUNS, json={"input": "hold"}) as source:
                first = next(iter(source.iter_sse()))
                run = first.json()["run"]
            # the client is gone, the run goes on (it may resume within the grace period)
            wait_for(lambda: value(scrape(server), "alto_runs_total", pipeline="stuck",
                                   outcome="detached") == 1, 30, "the stream to detach")
            refused = http.post(RUNS, json={"input": "free"})
            assert_error_shape(refused, 429, "too_many_runs")
            assert value(scrape(server), "alto_runs_inflight") == 1

            cancelled = http.post(f"/v1/runs/{run}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            wait_for(lambda: server.gateway.inflight == 0, 30, "the slot to come back")
            after = http.post(RUNS, json={"input": "free"})
            assert after.status_code == 200 and after.json()["status"] == "completed"
    finally:
        server.stop()


def test_a_replay_takes_admission_slots_and_leaves_what_does_not_fit(
        words: tuple[set[str], set[str]]) -> None:
    """Replayed runs are admitted as requests' runs are: no more than the free slots (30
    replayed runs ran under a limit of 1, and a request then got in and hung)."""
    broken, hanging = words
    server = make_server(("stuck",), max_inflight_runs=2)
    letters = "/v1/pipelines/stuck/dead-letters"
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            broken.update({"a", "b", "c"})
            for word in "abc":
                assert http.post(RUNS, json={"input": word}).json()["status"] == "failed"
            broken.clear()
            hanging.update({"a", "b", "c"})
            first = http.post(f"{letters}/replay", json={"all": True})
            assert first.status_code == 200, first.text
            runs = sorted(set(first.json()["runs"].values()))
            assert len(runs) == 2 and first.json()["unresolved"] == 1
            assert server.gateway.inflight == 2
            assert_error_shape(http.post(RUNS, json={"input": "free"}), 429, "too_many_runs")
            assert_error_shape(http.post(f"{letters}/replay", json={"all": True}), 429,
                               "too_many_runs")

            for run in runs:
                assert http.post(f"/v1/runs/{run}/cancel").status_code == 200
            wait_for(lambda: server.gateway.inflight == 0, 30, "the replayed runs' slots")
            rest = http.post(f"{letters}/replay", json={"all": True}).json()
            assert len(rest["runs"]) == 1 and rest["unresolved"] == 0
            assert http.get(letters).json()["data"] == []
    finally:
        server.stop()


def _error_codes(server: LiveServer, run: str) -> list[str]:
    return [ev.get("code") for ev in _events(server, run) if ev.get("type") == "error"]


def _drop_after_first_event(http: httpx.Client, method: str, url: str,
                            **kw: Any) -> dict[str, Any]:
    with connect_sse(http, method, url, **kw) as source:
        return dict(next(iter(source.iter_sse())).json())


def test_a_viewer_dropping_a_replayed_runs_stream_does_not_cancel_it(
        words: tuple[set[str], set[str]]) -> None:
    """The replay is the gateway's own run: a client that opens its stream and drops it
    asked for a grace period that cancelled it (nobody was registered as following it)."""
    broken, hanging = words
    server = make_server(("stuck",), resume_grace_s=0.2)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            broken.add("r")
            assert http.post(RUNS, json={"input": "r"}).json()["status"] == "failed"
            broken.clear()
            hanging.update({"r", "control"})
            replayed = http.post("/v1/pipelines/stuck/dead-letters/replay",
                                 json={"all": True}).json()
            [run] = set(replayed["runs"].values())
            _drop_after_first_event(http, "GET", f"/v1/runs/{run}/events")
            # a client's own run, dropped after the viewer: its grace ends later
            _drop_control_run_until(http, server, "cancelled")
            assert _error_codes(server, run) == []
            assert http.get(f"/v1/runs/{run}").json()["status"] == "running"
    finally:
        server.stop()


def test_a_resumed_stream_dropped_again_keeps_the_runs_own_deadline(
        words: tuple[set[str], set[str]]) -> None:
    """Dropping a resumed stream set the gateway's default deadline, counted from the drop,
    not the run's own: a run started with a longer X-Alto-Deadline was failed early."""
    _, hanging = words
    hanging.update({"long", "control"})
    server = make_server(("stuck",), run_deadline_s=1.0, resume_grace_s=600)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            # started by another gateway (which then died) with X-Alto-Deadline: 600
            spec = server.gateway.pipelines["stuck"]
            t = server.gateway.transport
            run = server.call(lambda: start_run(t, spec, "long", meta={"deadline_s": 600.0}))
            _drop_after_first_event(http, "GET", f"/v1/runs/{run}/events")
            # started after that drop with the default 1 s: its deadline passes later than
            # a default deadline counted from the drop would have
            _drop_control_run_until(http, server, "deadline_exceeded")
            assert _error_codes(server, run) == []
    finally:
        server.stop()


def _drop_control_run_until(http: httpx.Client, server: LiveServer, code: str) -> None:
    """Start a run of the hanging input "control", drop its stream after the first event,
    and wait until the gateway ends it with `code`: the moment by which the run under test
    would have been ended too, had it been treated like this one."""
    control = _drop_after_first_event(http, "POST", RUNS, json={"input": "control"})["run"]
    wait_for(lambda: _error_codes(server, control) == [code], 30,
             f"the control run to end with {code}")
