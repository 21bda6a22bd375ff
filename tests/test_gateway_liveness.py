"""The embedded gateway's liveness check: a stage served by a runner in the gateway's own
process is live while that runner runs, whatever its heartbeat says.

Heartbeats tell other processes which instances are up; a loop stall longer than the member
TTL (a long GC pause, a loaded machine) lets them lapse although every runner is alive, and
the gateway used to answer 503 no_workers until the next beat (seen as a flaky test under a
full suite's load)."""

from __future__ import annotations

import asyncio

import httpx

from app.main import create_app
from orchestrator.embedded import EmbeddedTransport
from orchestrator.routing import stage_group
from orchestrator.spec import PipelineSpec, parse_pipeline
from tests.gateway_fixtures import LiveServer
from workers.runtime import Runtime
from workers.settings import Settings


def _spec() -> PipelineSpec:
    return parse_pipeline({
        "name": "lively",
        "engines": {"default": {"kind": "sim"}},
        "stages": [
            {"name": "shout", "kind": "tool", "function": "tests.toy.stages:upper", "to": ["answer"]},
            {"name": "answer", "kind": "lm", "prompt": "{shout}", "max_tokens": 4},
        ],
    })


def test_a_lapsed_heartbeat_of_an_in_process_runner_does_not_refuse_runs() -> None:
    spec = _spec()
    # beats an hour apart: once the members are gone, only the runners themselves say live
    app = create_app(Settings(heartbeat_ms=3_600_000), [spec])
    live = LiveServer(app, env={"ALTO_SIM_TIME_SCALE": "0"}).start()
    try:
        t = live.gateway.transport
        for r in live.gateway.runtime.runners:
            live.call(lambda r=r: t.leave(r.group, r.instance))
        assert live.call(lambda: t.members(stage_group("lively", "answer"))) == {}
        with httpx.Client(base_url=live.url, timeout=30) as http:
            r = http.post("/v1/pipelines/lively/runs", json={"input": "hello"})
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    finally:
        live.stop()


def test_a_runtime_serves_only_the_groups_of_its_running_runners() -> None:
    async def scenario() -> tuple[bool, bool, bool, bool]:
        transport = EmbeddedTransport()
        runtime = Runtime(transport, [_spec()])
        before = runtime.serves(stage_group("lively", "shout"))
        await runtime.start()
        try:
            running = runtime.serves(stage_group("lively", "shout"))
            other = runtime.serves(stage_group("lively", "nope"))
        finally:
            await runtime.stop()
        after = runtime.serves(stage_group("lively", "shout"))
        return before, running, other, after

    before, running, other, after = asyncio.run(scenario())
    assert (before, running, other, after) == (False, True, False, False)
