"""A client that disconnects cancels the run's remaining work: the engine sees the cancel
of the call in progress, and the run gets no engine call after that.

The `slow` pipeline has `draft` (writes N lines, one engine call) streaming each line to
`expand` (one engine call per line), both on one SimEngine at real-time speed, so a run of
2000 lines is still writing when the client leaves. The sim responders record every
engine call per run (`CALLS`). "No later call" is checked after a probe run through the
same stages has completed: streams are consumed in order, so by then every message the
cancelled run had queued has been taken and dropped (or called, which would fail here).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import CALLS, LiveServer, make_server, sim_engines, wait_for

LINES = 2000  # about 40 s of engine time at time_scale 1: far longer than any test


@pytest.fixture(scope="module")
def realtime() -> Iterator[LiveServer]:
    server = make_server(("slow",), time_scale=1.0, resume_grace_s=0.3)
    try:
        yield server
    finally:
        server.stop()


def engine_idle_after_cancel(server: LiveServer, cancelled_before: int) -> None:
    """Wait, in the server's loop, until the engine has cancelled a request and holds
    nothing (no running or queued sequence)."""
    engine = sim_engines(server, "slow")[0]
    server.call(lambda: engine.wait_until(
        lambda e: e.cancelled > cancelled_before and e.running == 0 and e.queued == 0,
        timeout=10,
    ))


def probe_and_count(server: LiveServer, run: str) -> int:
    """Run a short request through the same stages to completion; return the cancelled
    run's engine calls counted after it."""
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    done = c.chat.completions.create(model="slow", messages=[{"role": "user", "content": "3"}])
    assert done.choices[0].message.content == "echo line 1\necho line 2\necho line 3"
    return len(CALLS[run])


def last_event(server: LiveServer, run: str) -> tuple[str, str]:
    with httpx.Client(base_url=server.url, timeout=30) as http, connect_sse(
        http, "GET", f"/v1/runs/{run}/events"
    ) as source:
        events = [(s.event, s.data) for s in source.iter_sse()]
    return events[-1]


def test_chat_stream_disconnect_cancels_the_run(realtime: LiveServer) -> None:
    engine = sim_engines(realtime, "slow")[0]
    before = engine.cancelled
    c = openai.OpenAI(base_url=f"{realtime.url}/v1", api_key="x", max_retries=0)
    stream = c.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": str(LINES)}], stream=True
    )
    run = ""
    contents = 0
    for chunk in stream:
        alto = (chunk.model_extra or {}).get("alto") or {}
        if alto.get("event") == "run":
            run = alto["run"]
        if chunk.choices and chunk.choices[0].delta.content:
            contents += 1
            if contents == 2:
                break
    stream.close()  # the client goes away mid-run
    assert run and CALLS[run][0] == "draft"

    engine_idle_after_cancel(realtime, before)  # the draft call was cancelled
    calls_at_cancel = len(CALLS[run])
    assert probe_and_count(realtime, run) == calls_at_cancel  # nothing called since
    assert CALLS[run].count("draft") == 1
    assert calls_at_cancel < 1 + LINES  # most of the run's work never happened
    kind, data = last_event(realtime, run)
    assert kind == "error" and '"code":"cancelled"' in data
    wait_for(lambda: realtime.gateway.inflight == 0, what="the slot to be released")


def test_native_sse_disconnect_cancels_after_the_grace_period(realtime: LiveServer) -> None:
    engine = sim_engines(realtime, "slow")[0]
    before = engine.cancelled
    with httpx.Client(base_url=realtime.url, timeout=30) as http, connect_sse(
        http, "POST", "/v1/pipelines/slow/runs", json={"input": str(LINES)}
    ) as source:
        run = source.response.headers["x-alto-run"]
        outputs = 0
        for sse in source.iter_sse():
            if sse.event == "partial" and '"stage":"expand"' in sse.data:
                outputs += 1
                if outputs == 2:
                    break
    # nobody resumes: after resume_grace_s the run is cancelled
    engine_idle_after_cancel(realtime, before)
    calls_at_cancel = len(CALLS[run])
    assert probe_and_count(realtime, run) == calls_at_cancel
    assert calls_at_cancel < 1 + LINES
    kind, data = last_event(realtime, run)
    assert kind == "error" and "resume grace period" in data


def test_non_streaming_disconnect_cancels_the_run(realtime: LiveServer) -> None:
    engine = sim_engines(realtime, "slow")[0]
    before = engine.cancelled
    seen = len(CALLS)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and disconnects
        httpx.post(f"{realtime.url}/v1/chat/completions", timeout=0.5,
                   json={"model": "slow", "messages": [{"role": "user", "content": str(LINES)}]})
    engine_idle_after_cancel(realtime, before)
    runs = [r for r in list(CALLS)[seen:] if r.startswith("run_")]
    assert len(runs) == 1
    calls_at_cancel = len(CALLS[runs[0]])
    assert probe_and_count(realtime, runs[0]) == calls_at_cancel
    kind, data = last_event(realtime, runs[0])
    assert kind == "error" and '"code":"cancelled"' in data


def test_engine_model_stream_disconnect_cancels_the_engine_call(realtime: LiveServer) -> None:
    engine = sim_engines(realtime, "slow")[0]
    before = engine.cancelled
    c = openai.OpenAI(base_url=f"{realtime.url}/v1", api_key="x", max_retries=0)
    stream = c.chat.completions.create(
        model="slow/default", messages=[{"role": "user", "content": "go"}], max_tokens=20000,
        stream=True,
    )
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    stream.close()
    engine_idle_after_cancel(realtime, before)
