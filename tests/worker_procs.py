"""Real `alto worker` subprocesses for the fault and chaos tests: start, SIGKILL, restart.

Each worker is a separate OS process running the production CLI against a real Redis, so
a SIGKILL is a real crash: no drain, no lease release, entries left pending.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from bench.procs import AofRedis, WorkerProcs
from orchestrator.routing import stage_group
from orchestrator.spec import PipelineSpec
from tests.waiting import eventually
from workers.redis_transport import RedisTransport

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


RedisProc = AofRedis  # not the session server: AOF on, killed and restarted mid-test


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
            await asyncio.sleep(0.1)  # back off before reconnecting; not a synchronisation
