"""Real `alto worker` subprocesses for the fault and chaos tests: start, SIGKILL, restart.

Each worker is a separate OS process running the production CLI against a real Redis, so
a SIGKILL is a real crash: no drain, no lease release, entries left pending.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from bench.procs import AofRedis, WorkerProcs
from orchestrator.routing import stage_group
from orchestrator.spec import PipelineSpec
from orchestrator.transport import Transport
from tests.waiting import eventually
from workers.client import follow_run
from workers.redis_transport import RedisTransport
from workers.runner import dead_letter_stream

ROOT = Path(__file__).resolve().parents[1]

FAST_ENV = {  # small timeouts so faults heal within a test's time
    "ALTO_CLAIM_IDLE_MS": "400",
    "ALTO_LEASE_TTL_MS": "600",
    "ALTO_HEARTBEAT_MS": "100",
    "ALTO_TRIM_INTERVAL_MS": "500",
}


class WorkerPool(WorkerProcs):
    """Worker processes with FAST_ENV under any `env` the test adds."""

    def __init__(self, url: str, pipeline: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(url, pipeline, {**FAST_ENV, **(env or {})})


async def wait_for_members(t: RedisTransport, spec: PipelineSpec, n: int,
                           timeout: float = 60) -> None:
    """Until every stage has at least `n` live registered workers."""

    async def ready() -> bool:
        for s in spec.by_name:
            if len(await t.members(stage_group(spec.name, s))) < n:
                return False
        return True

    await eventually(ready, timeout, every=0.05)


async def wait_exit(p: subprocess.Popen[bytes]) -> int:
    return await asyncio.to_thread(p.wait)


async def dead_letters(t: Transport, pipeline: str) -> list[dict[str, Any]]:
    """The dead-letter records of a pipeline, read through a group of their own."""
    stream = dead_letter_stream(pipeline)
    await t.ensure_group(stream, "inspect")
    return [d.envelope.payload for d in await t.consume([stream], "inspect", "t", 100, 0)]


async def follow_restarting(pool: WorkerPool, t: RedisTransport, spec: PipelineSpec, run: str,
                            stage: str, deadline_s: float = 60) -> tuple[list[Any], int]:
    """Follow a run while restarting `stage`'s first worker each time it dies, as
    Kubernetes would: (the run's events, how many times that worker died)."""
    crashes = 0

    async def supervise() -> None:
        nonlocal crashes
        while True:
            await wait_exit(pool.procs[stage][0])
            crashes += 1
            pool.restart_dead(stage)

    supervisor = asyncio.create_task(supervise())
    try:
        events = [ev async for _, ev in follow_run(t, spec, run, deadline_s=deadline_s)]
    finally:
        supervisor.cancel()
    return events, crashes


RedisProc = AofRedis  # not the session server: AOF on, killed and restarted mid-test


async def _reachable(t: RedisTransport) -> bool:
    """Redis answers again (a restart is over): the condition to resume following on."""
    import redis.exceptions

    try:
        return bool(await t.ping())
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return False


async def follow_through_outages(t: RedisTransport, spec: PipelineSpec, run: str,
                                 deadline_s: float) -> list[dict[str, object]]:
    """A run's events, resuming after the last one seen whenever Redis is unreachable
    (what a client of the gateway does with Last-Event-ID); bounded by `deadline_s`."""
    import time

    import redis

    from workers.client import follow_run

    end = time.monotonic() + deadline_s
    events: list[dict[str, object]] = []
    last: str | None = None
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"run {run} did not finish within {deadline_s} s")
        try:
            async for eid, ev in follow_run(t, spec, run, after=last, deadline_s=left):
                last = eid
                events.append(ev)
            return events
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            await eventually(lambda: _reachable(t), max(0.1, end - time.monotonic()))
