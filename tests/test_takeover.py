"""Aggregation state survives its owner (DESIGN.md, failure model).

An aggregating instance is crashed while it provably holds part of a group (its entries
pending, unacknowledged); a new instance takes the partition's lease, claims the pending
entries, rebuilds the group and fires it exactly once. Runs on both transports. (Lease
expiry after a SIGKILL is covered by tests/test_redis_workers.py.)
"""

from __future__ import annotations

import asyncio

from orchestrator.spec import parse_pipeline
from orchestrator.transport import Transport
from tests.toy import stages
from tests.waiting import eventually
from workers.client import follow_run, start_run
from workers.runner import RunnerConfig, StageRunner
from workers.runtime import Runtime, StageSelection
from workers.stagefn import StageFunction

SPEC = parse_pipeline(
    {
        "name": "takeover",
        "stages": [
            {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
             "framing": "items", "to": ["gate"]},
            {"name": "gate", "kind": "tool", "function": "tests.toy.stages:gated", "to": ["group"]},
            {"name": "group", "kind": "reduce", "function": "tests.toy.stages:collect",
             "aggregate_by": ["request"], "partitions": 2},
        ],
    }
)
CONFIG = RunnerConfig(claim_idle_ms=200, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50)


wait_until = eventually


def group_runner(transport: Transport, name: str) -> StageRunner:
    stage = SPEC.stage("group")
    return StageRunner(SPEC, "group", transport, StageFunction(SPEC, stage), instance=name,
                       config=CONFIG)


async def test_new_owner_rebuilds_group_from_pending(transport: Transport) -> None:
    upstream = Runtime(transport, [SPEC], config=CONFIG)
    await upstream.start([StageSelection("takeover", "split"), StageSelection("takeover", "gate")])
    text = "alpha beta gamma delta"
    run = "run_takeover_1"
    stages.GATES[run] = asyncio.Event()
    a = group_runner(transport, "group-a")
    stop_a = asyncio.Event()
    task_a = asyncio.create_task(a.run(stop_a))
    try:
        await start_run(transport, SPEC, text, run=run)
        await wait_until(lambda: any(len(g.got) >= 1 for g in a._groups.values()))
        held = {k: len(g.got) for k, g in a._groups.items()}
        await a.abort()  # crash: in-flight work dropped, entries stay pending
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)

        b = group_runner(transport, "group-b")
        stop_b = asyncio.Event()
        task_b = asyncio.create_task(b.run(stop_b))
        stages.GATES[run].set()
        events = [ev async for _, ev in follow_run(transport, SPEC, run, deadline_s=30)]
        stop_b.set()
        await task_b
    finally:
        stages.GATES.pop(run, None)
        await upstream.stop()
    assert held and all(n >= 1 for n in held.values())
    result = events[-1]
    assert result["type"] == "result", result
    assert result["units"] == ["group[" + ",".join(text.split()) + "]"]
    assert [e["stage"] for e in events if e["type"] == "stage_done"][-1] == "group"
    assert b.processed == 1


async def test_partition_that_leaves_and_returns_is_rebuilt(transport: Transport) -> None:
    """Membership can flap under load (a heartbeat expires): an instance loses a partition
    while holding part of a group, then gets it back; it must rebuild the group from the
    pending entries, not skip them as 'already held'."""
    import hashlib

    from orchestrator.routing import aggregation_key, partition_of, stage_group

    upstream = Runtime(transport, [SPEC], config=CONFIG)
    await upstream.start([StageSelection("takeover", "split"), StageSelection("takeover", "gate")])
    text = "alpha beta gamma"
    run = "run_takeover_flap"
    stages.GATES[run] = asyncio.Event()
    a = group_runner(transport, "group-a")
    stop = asyncio.Event()
    task = asyncio.create_task(a.run(stop))
    part = partition_of(aggregation_key(run, ()), SPEC.stage("group").partitions)
    stream = a.streams[part]

    def wins(m: str) -> bool:
        return max(["group-a", m], key=lambda x: hashlib.blake2b(f"{x}|{part}".encode()).digest()) == m

    rival = next(f"rival-{i}" for i in range(1000) if wins(f"rival-{i}"))
    group = stage_group(SPEC.name, "group")
    try:
        await start_run(transport, SPEC, text, run=run)
        await wait_until(lambda: any(len(g.got) >= 1 for g in a._groups.values()))
        await transport.heartbeat(group, rival, {}, 60_000)  # the rival appears: a lets go
        await wait_until(lambda: stream not in a.owned)
        await transport.leave(group, rival)  # ...and vanishes before taking the lease
        await wait_until(lambda: stream in a.owned)
        stages.GATES[run].set()
        events = [ev async for _, ev in follow_run(transport, SPEC, run, deadline_s=30)]
    finally:
        stop.set()
        await task
        stages.GATES.pop(run, None)
        await upstream.stop()
    assert events[-1]["type"] == "result", events[-1]
    assert events[-1]["units"] == ["group[" + ",".join(text.split()) + "]"]
