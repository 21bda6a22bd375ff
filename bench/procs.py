"""Real subprocesses for the benchmarks and the tests: redis-server and `alto worker`.

Why here: bench/ must not import from tests/, while tests already import bench helpers, so
the one launcher both need lives on this side. Nothing here mocks anything; every helper
starts a real process and waits (bounded) until it answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; closes its pipes."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


# ------------------------------------------------------------------------------------------
# redis-server
# ------------------------------------------------------------------------------------------


def start_redis(port: int, *, args: Sequence[str] = (), aof: bool = False,
                workdir: str | Path | None = None, client: redis.Redis | None = None,
                timeout_s: float = 10.0, capture: bool = False) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:`port` that has answered PING; raises RuntimeError if it
    exits or stays silent for `timeout_s` (with its output when `capture`).

    No RDB snapshots; AOF off, or (`aof`) on with fsync on every write as the Helm chart runs
    it, so the server can be SIGKILLed and restarted without losing acknowledged writes.
    `args` come last, so they can add options (--requirepass, --tls-port) or override one
    (`--port 0` for a TLS-only server). `client` is the redis.Redis used for the PING, for
    servers a default client cannot reach (password, TLS)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found on PATH (install Redis >= 7.0)")
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
    if workdir is not None:
        cmd += ["--dir", str(workdir)]
    cmd += args
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    pinger = client if client is not None else redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            try:
                if pinger.ping():
                    return proc
            except redis.RedisError:  # refused, or still loading the AOF
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)  # polling a process we cannot await; bounded by the deadline
    finally:
        if client is None:
            pinger.close()
    code = proc.poll()
    if code is None:
        proc.kill()
        proc.wait()
    text = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.stdout:
        proc.stdout.close()
    why = f"exited with {code}" if code is not None else f"did not answer within {timeout_s}s"
    raise RuntimeError(f"redis-server {' '.join(args)} on port {port} {why}:\n{text}".rstrip())


class AofRedis:
    """A redis-server of our own with AOF on and fsync on every write, on a fixed port, so
    it can be SIGKILLed (a crash, no shutdown save) and restarted mid-run on the same URL."""

    def __init__(self, prefix: str = "alto-redis-aof-") -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self, timeout_s: float = 20.0) -> None:
        self.proc = start_redis(self.port, aof=True, workdir=self.dir, timeout_s=timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# alto worker
# ------------------------------------------------------------------------------------------


class WorkerProcs:
    """`alto worker` processes (the production CLI) per stage of one pipeline file, so a
    SIGKILL is a real crash: no drain, no lease release, entries left pending."""

    def __init__(self, url: str, pipeline: Path, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.pipeline = pipeline
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.kills = 0

    def _spawn(self, stage: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--pipeline", str(self.pipeline),
             "--stage", stage, "--redis-url", self.url],
            cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM all first (they drain in parallel), then wait for each."""
        for ps in self.procs.values():
            for p in ps:
                if p.poll() is None:
                    p.terminate()
        for ps in self.procs.values():
            for p in ps:
                stop_process(p, timeout_s)
