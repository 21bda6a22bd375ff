"""End to end over Redis with every stage in real `alto worker` processes.

Two workers per stage; the result must equal the embedded run (and the sequential
reference). A second test kills one worker of the aggregating stage with SIGKILL in the
middle of a run: its partitions' leases expire, the survivor claims their pending entries,
rebuilds the aggregation state and the run still completes exactly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import WorkerProcs
from orchestrator.embedded import EmbeddedTransport
from orchestrator.routing import stage_group
from orchestrator.spec import PipelineSpec, load_pipeline
from tests.toy.oracle import evaluate
from tests.waiting import eventually
from tests.worker_procs import wait_for_members
from workers.client import follow_run, run_to_completion, start_run
from workers.redis_transport import RedisTransport
from workers.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "toy" / "pipeline4.yaml"
TEXT = "the quick brown fox jumps over the lazy dog"
pytestmark = pytest.mark.redis

WORKER_ENV = {
    "ALTO_CLAIM_IDLE_MS": "500",
    "ALTO_LEASE_TTL_MS": "600",
    "ALTO_HEARTBEAT_MS": "100",
}


@pytest.fixture
def workers(redis_url: str) -> Iterator[WorkerProcs]:
    w = WorkerProcs(redis_url, PIPELINE, WORKER_ENV)
    try:
        yield w
    finally:
        w.stop()


async def embedded_result(spec: PipelineSpec, text: str) -> list[object]:
    t = EmbeddedTransport()
    rt = Runtime(t, [spec])
    await rt.start()
    try:
        _, events = await run_to_completion(t, spec, text, deadline_s=60)
    finally:
        await rt.stop()
    return events[-1]["units"]


async def test_worker_processes_match_embedded(workers: WorkerProcs, redis_t: RedisTransport) -> None:
    spec = load_pipeline(PIPELINE)
    for stage in spec.by_name:
        workers.start(stage, 2)
    await wait_for_members(redis_t, spec, 2)
    expected = evaluate(spec, TEXT)
    assert await embedded_result(spec, TEXT) == expected
    runs = await asyncio.gather(*(run_to_completion(redis_t, spec, f"{TEXT} {i}", deadline_s=60)
                                  for i in range(5)))
    for i, (_, events) in enumerate(runs):
        assert events[-1]["type"] == "result", events[-1]
        assert events[-1]["units"] == evaluate(spec, f"{TEXT} {i}")
        done = [e["stage"] for e in events if e["type"] == "stage_done"]
        assert sorted(done) == sorted(spec.by_name)


async def test_killed_aggregator_worker_is_taken_over(workers: WorkerProcs, redis_t: RedisTransport) -> None:
    spec = load_pipeline(PIPELINE)
    for stage in ("split", "expandx5", "final"):
        workers.start(stage, 1)
    workers.start("group", 2)
    await wait_for_members(redis_t, spec, 1)
    # hold the runs back: the first stage is stopped until both group workers hold state
    victim = workers.procs["group"][0]
    texts = [f"{TEXT} run{i}" for i in range(6)]
    runs = [await start_run(redis_t, spec, t) for t in texts]

    async def first_partial_at_group(run: str) -> None:
        async for _, ev in follow_run(redis_t, spec, run, deadline_s=60):
            if ev["type"] == "partial" and ev["stage"] == "expandx5":
                return

    await asyncio.gather(*(first_partial_at_group(r) for r in runs))
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    for run, text in zip(runs, texts, strict=True):
        events = [ev async for _, ev in follow_run(redis_t, spec, run, deadline_s=60)]
        assert events[-1]["type"] == "result", events[-1]
        assert events[-1]["units"] == evaluate(spec, text)


def test_worker_exits_nonzero_with_a_clear_message_when_redis_is_unreachable() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--pipeline", str(PIPELINE), "--stage", "split",
         "--redis-url", f"redis://127.0.0.1:{port}/0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1
    assert "cannot reach Redis" in proc.stderr


async def test_sigterm_drains_and_leaves_the_registry(workers: WorkerProcs, redis_t: RedisTransport) -> None:
    spec = load_pipeline(PIPELINE)
    workers.start("split", 1)
    group = stage_group(spec.name, "split")

    async def members() -> int:
        return len(await redis_t.members(group))

    async def registered() -> bool:
        return await members() == 1

    await eventually(registered, 60, every=0.05)
    proc = workers.procs["split"][0]
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert await members() == 0  # it left at once, without waiting for its heartbeat to expire
