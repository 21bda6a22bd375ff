"""Exact completion: random pipelines, random delivery schedules with duplicates.

Hypothesis builds pipelines of 2-6 stages in layers (a layer of two stages makes a
diamond), with random fan-out (0-8 units per input, a deterministic function of the
input) and aggregation at random depths, and runs them through the real runtime on a
transport that duplicates and reorders published messages and drops deliveries on the
floor (left pending, as a crashed consumer would) so they are claimed and re-run. Every
run must end with exactly the result of a sequential reference interpreter: each
aggregator fired once per key with exactly its descendants, each unit counted once —
in streaming and barrier mode alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.embedded import EmbeddedTransport
from orchestrator.spec import PipelineSpec, parse_pipeline, with_streaming
from orchestrator.transport import Commit, Delivery
from tests.toy.oracle import evaluate
from workers.client import run_to_completion
from workers.runner import RunnerConfig
from workers.runtime import Runtime

FANOUT = "tests.toy.stages:hash_fanout"
COLLECT = "tests.toy.stages:collect"


class ChaosTransport(EmbeddedTransport):
    """An embedded transport with a hostile schedule: published messages are reordered
    and some published twice (a producer re-running after a crash); some deliveries are
    withheld from the consumer and stay pending until claimed (a consumer crash)."""

    def __init__(self, seed: int, dup: float, drop: float):
        super().__init__()
        self.rng = random.Random(seed)
        self.dup = dup
        self.drop = drop
        self.duplicated = 0
        self.dropped = 0

    async def commit(self, commit: Commit) -> bool:
        msgs = list(commit.messages)
        extra = [m for m in msgs if self.rng.random() < self.dup]
        self.duplicated += len(extra)
        msgs += extra
        self.rng.shuffle(msgs)
        # the same commit (fence and guard included) with its messages duplicated/reordered
        return await super().commit(dataclasses.replace(commit, messages=msgs))

    async def consume(
        self, streams: Sequence[str], group: str, consumer: str, count: int, block_ms: int
    ) -> list[Delivery]:
        got = await super().consume(streams, group, consumer, count, block_ms)
        kept = []
        for d in got:
            if self.rng.random() < self.drop:
                self.dropped += 1  # delivered, never processed: pending until claimed
            else:
                kept.append(d)
        return kept


@st.composite
def pipelines(draw: st.DrawFn) -> dict[str, Any]:
    n_layers = draw(st.integers(2, 5))
    layers: list[list[str]] = []
    count = 0
    for li in range(n_layers):
        width = 1 if li in (0, n_layers - 1) or count >= 5 else draw(st.integers(1, 2))
        layer = []
        for _ in range(width):
            top = draw(st.integers(0, 8))
            layer.append(f"s{count}x{top}")
            count += 1
        layers.append(layer)
    stages: list[dict[str, Any]] = []
    # stages usable as an aggregation scope here: on every path, and not dropped from the
    # lineage by an aggregator since
    available: list[str] = []
    for li, layer in enumerate(layers):
        nxt = layers[li + 1] if li + 1 < len(layers) else []
        for name in layer:
            st_: dict[str, Any] = {
                "name": name,
                "kind": "tool",
                "function": FANOUT,
                "framing": "items",
                "to": list(nxt),
            }
            if li > 0 and len(layer) == 1 and draw(st.booleans()):
                depth = draw(st.integers(0, len(available)))
                scope = available[:depth]
                st_.update(kind="reduce", function=COLLECT, aggregate_by=["request", *scope])
                available = list(scope)
            stages.append(st_)
        if len(layer) == 1:
            available.append(layer[0])
    return {"name": "rand", "stages": stages}


async def _run(spec: PipelineSpec, transport: EmbeddedTransport, text: str) -> list[Any]:
    runtime = Runtime(transport, [spec], config=RunnerConfig(claim_idle_ms=20, block_ms=20))
    await runtime.start()
    try:
        _, events = await run_to_completion(transport, spec, text, deadline_s=60)
    finally:
        await runtime.stop()
    last = events[-1]
    assert last["type"] == "result", last
    return last["units"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=pipelines(),
    text=st.sampled_from(["a", "b c", "d e f g"]),
    seed=st.integers(0, 2**32 - 1),
    streaming=st.booleans(),
    dup=st.sampled_from([0.0, 0.3]),
    drop=st.sampled_from([0.0, 0.2]),
)
def test_random_pipelines_complete_exactly(
    raw: dict[str, Any], text: str, seed: int, streaming: bool, dup: float, drop: float
) -> None:
    spec = with_streaming(parse_pipeline(raw), streaming)
    expected = evaluate(spec, text)
    transport = ChaosTransport(seed, dup, drop)
    got = asyncio.run(_run(spec, transport, text))
    assert got == expected


def test_aggregator_sees_every_descendant_once_under_heavy_duplication() -> None:
    raw = {
        "name": "deep",
        "stages": [
            {
                "name": "s0x4",
                "kind": "tool",
                "function": FANOUT,
                "framing": "items",
                "to": ["s1x5"],
            },
            {
                "name": "s1x5",
                "kind": "tool",
                "function": FANOUT,
                "framing": "items",
                "to": ["s2x6"],
            },
            {"name": "s2x6", "kind": "tool", "function": FANOUT, "framing": "items", "to": ["g"]},
            {
                "name": "g",
                "kind": "reduce",
                "function": COLLECT,
                "aggregate_by": ["request", "s0x4"],
                "to": ["h"],
            },
            {"name": "h", "kind": "reduce", "function": COLLECT, "aggregate_by": ["request"]},
        ],
    }
    spec = parse_pipeline(raw)
    text = "alpha beta"
    expected = evaluate(spec, text)
    transport = ChaosTransport(7, dup=0.9, drop=0.3)
    assert asyncio.run(_run(spec, transport, text)) == expected
    assert transport.duplicated > 0 and transport.dropped > 0
    # one output, naming each s0 unit's group exactly once
    (out,) = expected
    assert out.startswith("h[") and out.count("g[") == len([1 for _ in out.split("g[")]) - 1


@pytest.mark.parametrize("streaming", [True, False])
def test_streaming_and_barrier_agree_on_a_fixed_pipeline(streaming: bool) -> None:
    raw = {
        "name": "fixed",
        "stages": [
            {
                "name": "s0x3",
                "kind": "tool",
                "function": FANOUT,
                "framing": "items",
                "to": ["s1x2", "s2x4"],
            },
            {"name": "s1x2", "kind": "tool", "function": FANOUT, "framing": "items", "to": ["j"]},
            {"name": "s2x4", "kind": "tool", "function": FANOUT, "framing": "items", "to": ["j"]},
            {
                "name": "j",
                "kind": "reduce",
                "function": COLLECT,
                "aggregate_by": ["request", "s0x3"],
            },
        ],
    }
    spec = with_streaming(parse_pipeline(raw), streaming)
    for text in ["x", "y z", "one two three four"]:
        assert asyncio.run(_run(spec, EmbeddedTransport(), text)) == evaluate(spec, text)


@pytest.mark.redis
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=pipelines(), text=st.sampled_from(["a", "b c", "d e f g"]), streaming=st.booleans())
def test_redis_transport_gives_the_same_results(
    redis_server: str, raw: dict[str, Any], text: str, streaming: bool
) -> None:
    from workers.redis_transport import RedisTransport

    spec = with_streaming(parse_pipeline(raw), streaming)

    async def go() -> list[Any]:
        transport = RedisTransport(redis_server, prefix=f"alto-prop-{uuid.uuid4().hex[:8]}:")
        try:
            return await _run(spec, transport, text)  # type: ignore[arg-type]
        finally:
            await transport.close()

    assert asyncio.run(go()) == evaluate(spec, text)
