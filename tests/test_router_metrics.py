"""/metrics reports the scheduling of LM stages: per-policy prefix-hit rate, per-instance
load and hit rate, load imbalance (read from the transport at scrape time), over a real
server whose gateway publishes entry messages through the stage's placement."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.main import create_app
from orchestrator.spec import PipelineSpec, parse_pipeline
from tests.gateway_fixtures import LiveServer
from tests.test_gateway_metrics import scrape, value
from tests.waiting import eventually_sync
from workers.router import PolicyRouter, sched_group
from workers.settings import Settings

BOOK = "Answer in the style of these examples. " + " ".join(f"ex{k}" for k in range(400))


def _spec() -> PipelineSpec:
    return parse_pipeline(
        {
            "name": "placed",
            "engines": {"default": {"kind": "sim", "instances": 2, "capacity": 4,
                                    "cache_blocks": 256}},
            "stages": [
                {"name": "answer", "kind": "lm", "prompt": "{input}", "max_tokens": 8,
                 "policy": "prompt_aware"},
            ],
        }
    )


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    app = create_app(Settings(heartbeat_ms=50), [_spec()])
    live = LiveServer(app, env={"ALTO_SIM_TIME_SCALE": "0"}).start()
    try:
        yield live
    finally:
        live.stop()


def _engine_hit_rate(server: LiveServer) -> float:
    engines = [e for (key, _), e in server.gateway.runtime.engines.items()
               if key.startswith("placed:")]
    prompt = sum(e.prompt_tokens for e in engines)
    return sum(e.cached_tokens for e in engines) / prompt if prompt else -1.0


def test_hit_rate_and_instances_match_the_engines(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for k in range(6):  # one class: after the first call the book is cached somewhere
            r = http.post("/v1/pipelines/placed/runs", json={"input": f"{BOOK}\nQ{k}"})
            assert r.status_code == 200
    # the gateway placed the inputs through the stage's policy, not the plain stream
    router = server.gateway._entry["placed"][0]
    assert isinstance(router, PolicyRouter) and router.targets["answer"].routed == 6
    expected = _engine_hit_rate(server)
    assert 0 < expected < 1

    def reported() -> bool:  # workers flush their counters at their next heartbeat
        got = value(scrape(server), "alto_router_prefix_hit_ratio", pipeline="placed",
                    stage="answer", policy="prompt_aware")
        return abs(got - expected) < 1e-9

    assert eventually_sync(reported, timeout=20)
    samples = scrape(server)
    loads = {dict(labels)["instance"]: v for (name, labels), v in samples.items()
             if name == "alto_instance_load"}
    runners = {r.instance for r in server.gateway.runtime.runners if r.stage.name == "answer"}
    assert set(loads) == runners and all(v == 0 for v in loads.values())


def test_instance_load_follows_heartbeats_and_leaves_with_the_instance(server: LiveServer) -> None:
    t = server.gateway.transport
    group = sched_group("placed", "answer")
    info = {"slot": 9, "policy": "prompt_aware", "inflight": 7, "capacity": 4}
    server.call(lambda: t.heartbeat(group, "visitor", info, 60_000))
    after = scrape(server)
    assert value(after, "alto_instance_load", pipeline="placed", stage="answer",
                 instance="visitor") == 7
    # 7 in flight on one of three instances, 0 on the others: max/mean = 7 / (7/3) = 3
    assert value(after, "alto_router_load_imbalance", pipeline="placed", stage="answer") == 3
    server.call(lambda: t.leave(group, "visitor"))
    gone = scrape(server)
    assert not any(name == "alto_instance_load" and dict(labels)["instance"] == "visitor"
                   for name, labels in gone)


def test_entry_placement_follows_the_embedded_runners() -> None:
    """ALTO_POLICY names a policy, but what the embedded runners read decides where the
    gateway publishes: lanes nobody reads would hang every run."""
    spec = _spec().model_copy(deep=True)
    spec.stages[0].policy = "pull"
    app = create_app(Settings(policy="answer=prompt_aware", heartbeat_ms=50), [spec])
    live = LiveServer(app, env={"ALTO_SIM_TIME_SCALE": "0"}).start()
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            r = http.post("/v1/pipelines/placed/runs", json={"input": "hello"})
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text
        runner = next(x for x in live.gateway.runtime.runners if x.stage.name == "answer")
        entry = live.gateway._entry["placed"][0]
        assert isinstance(entry, PolicyRouter) == isinstance(runner.router, PolicyRouter)
    finally:
        live.stop()
