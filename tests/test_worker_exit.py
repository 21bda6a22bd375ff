"""How an `alto worker` process ends when a plain function it runs never returns.

Python joins the threads of plain-function calls at exit, and nothing can stop such a
thread: a worker would stay alive after SIGTERM until killed. A second SIGTERM ends a drain
that a hung call holds, and a worker whose runtime has stopped exits without waiting for
those threads. Either way the hung call's input is not acknowledged: it stays pending for
another worker (or, past its timeout, the run has failed visibly); nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.procs import Worker, WorkerProcs
from orchestrator.routing import stage_group, stage_streams
from orchestrator.spec import PipelineSpec, load_pipeline
from tests.waiting import eventually
from workers.client import start_run
from workers.redis_transport import RedisTransport

pytestmark = pytest.mark.redis

ENV = {"ALTO_HEARTBEAT_MS": "100"}


def _pipeline(tmp_path: Path, extra: str = "") -> Path:
    f = tmp_path / "stuck.yaml"
    f.write_text("name: stuck\nstages:\n"
                 f"  - {{name: stuck, kind: tool, function: 'tests.toy.faulty:hang_in_thread'{extra}}}\n")
    return f


async def _started(marker: Path) -> None:
    async def written() -> bool:
        return marker.exists()

    await eventually(written, 60, every=0.02)


async def _logged(log: Path, text: str) -> None:
    async def found() -> bool:
        return text in log.read_text(errors="replace")

    await eventually(found, 60, every=0.02)


@contextlib.asynccontextmanager
async def _hung_call(tmp_path: Path, redis_url: str, redis_t: RedisTransport, extra: str = ""
                     ) -> AsyncIterator[tuple[PipelineSpec, Worker, str]]:
    """A worker of the one-stage pipeline whose plain function hangs, and a run whose call
    has started (it wrote its marker)."""
    marker = tmp_path / "started"
    pipeline = _pipeline(tmp_path, extra)
    spec = load_pipeline(pipeline)
    pool = WorkerProcs(redis_url, pipeline, {**ENV, "ALTO_TEST_HANG_MARKER": str(marker)},
                       logdir=tmp_path)
    try:
        [worker] = pool.start("stuck")
        await pool.wait_ready(redis_t)
        run = await start_run(redis_t, spec, "the input")
        await _started(marker)
        assert worker.log is not None
        yield spec, worker, run
    finally:
        pool.stop()


async def test_second_sigterm_ends_a_drain_held_by_a_hung_call(
        tmp_path: Path, redis_url: str, redis_t: RedisTransport) -> None:
    async with _hung_call(tmp_path, redis_url, redis_t) as (spec, worker, run):
        assert worker.log is not None
        worker.proc.send_signal(signal.SIGTERM)
        await _logged(worker.log, "draining")  # the drain waits for the hung call ...
        assert worker.proc.poll() is None
        worker.proc.send_signal(signal.SIGTERM)  # ... until a second signal
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
        log = worker.log.read_text(errors="replace")
        assert "second signal" in log
        assert "exiting without waiting" in log and "1 of stage 'stuck'" in log
        # the input was neither acknowledged nor failed: another worker can take it
        stats = await redis_t.stats(stage_streams(spec, "stuck")[0], stage_group(spec.name, "stuck"))
        assert stats.pending == 1
        events = await redis_t.read_events(run, None, 100, 0)
        assert not [e for _, e in events if e.get("type") in ("error", "result")]


async def test_worker_exits_after_its_drain_though_a_timed_out_call_still_hangs(
        tmp_path: Path, redis_url: str, redis_t: RedisTransport) -> None:
    async with _hung_call(tmp_path, redis_url, redis_t, ", timeout_s: 0.5") as (_, worker, run):

        async def failed() -> bool:
            events = await redis_t.read_events(run, None, 100, 0)
            return any(e.get("type") == "error" for _, e in events)

        await eventually(failed, 60, every=0.05)  # the run failed visibly (stage_timeout)
        worker.proc.send_signal(signal.SIGTERM)  # one signal: nothing is in flight any more
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
        assert worker.log is not None
        log = worker.log.read_text(errors="replace")
        assert "second signal" not in log
        assert "exiting without waiting" in log and "1 of stage 'stuck'" in log


def test_embedded_alto_run_past_its_deadline_exits_though_a_call_hangs(tmp_path: Path) -> None:
    """`alto run` without Redis: the deadline cancels the run, the runtime stops without a
    drain (nothing outlives the process) and the process exits without the hung thread."""
    from tests.worker_procs import ROOT

    marker = tmp_path / "started"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "run", str(_pipeline(tmp_path)), "--input", "x",
         "--deadline", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "ALTO_TEST_HANG_MARKER": str(marker)},
    )
    assert marker.exists()  # the call did start and hang
    assert proc.returncode == 1, proc.stderr
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "did not finish within" in out and "exiting without waiting" in out
