"""Real `alto worker` subprocesses for the fault and chaos tests: start, SIGKILL, restart.

Each worker is a separate OS process running the production CLI against a real Redis, so
a SIGKILL is a real crash: no drain, no lease release, entries left pending.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

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


class WorkerPool:
    def __init__(self, url: str, pipeline: Path, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.pipeline = pipeline
        self.env = {**os.environ, **FAST_ENV, **(env or {}), "PYTHONPATH": str(ROOT)}
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.kills = 0

    def _spawn(self, stage: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--pipeline", str(self.pipeline),
             "--stage", stage, "--redis-url", self.url],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self, stage: str, n: int = 1) -> None:
        for _ in range(n):
            self.procs.setdefault(stage, []).append(self._spawn(stage))

    def kill(self, stage: str, index: int) -> None:
        """SIGKILL one worker and start a fresh one in its place."""
        p = self.procs[stage][index]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        self.kills += 1
        self.procs[stage][index] = self._spawn(stage)

    def restart_dead(self, stage: str) -> int:
        """Replace workers of `stage` that have exited; returns how many."""
        n = 0
        for i, p in enumerate(self.procs.get(stage, [])):
            if p.poll() is not None:
                self.procs[stage][i] = self._spawn(stage)
                n += 1
        return n

    def alive(self, stage: str) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs.get(stage, []) if p.poll() is None]

    def stop(self) -> None:
        for ps in self.procs.values():
            for p in ps:
                if p.poll() is None:
                    p.terminate()
        for ps in self.procs.values():
            for p in ps:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


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


class RedisProc:
    """A redis-server of our own (not the session one): with AOF on and fsync on every
    write, as the Helm chart configures it, so it can be killed and restarted on the same
    port mid-test without losing anything it acknowledged."""

    def __init__(self) -> None:
        import tempfile

        from tests.conftest import _free_port

        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="alto-redis-aof-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        import shutil

        import redis

        from tests.waiting import eventually_sync

        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server not found on PATH"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1) as c:
                    return bool(c.ping())
            except redis.exceptions.RedisError:  # refused, or still loading the AOF
                return False

        assert eventually_sync(up, 20), "redis-server did not come up"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        """SIGKILL (a crash, no shutdown save) and start again on the same port."""
        self.kill()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


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
