"""Real subprocesses for the benchmarks and the tests: redis-server and `alto worker`.

Why here: bench/ must not import from tests/, while tests already import bench helpers, so
the one launcher both need lives on this side. Nothing here mocks anything; every helper
starts a real process and waits (bounded) until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.routing import stage_group

if TYPE_CHECKING:
    import redis

    from orchestrator.transport import Transport

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


@dataclass
class Worker:
    """One `alto worker` process and what it takes to start it again."""

    stage: str
    pipeline: str  # the pipeline's name: the worker reads through stage_group(pipeline, stage)
    cmd: list[str]
    proc: subprocess.Popen[bytes]
    log: Path | None  # its stdout and stderr; None: discarded

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 20) -> str:
        if self.log is None:
            return "(output discarded: give WorkerProcs a logdir to keep it)"
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


class WorkerProcs:
    """`alto worker` processes (the production CLI), so a SIGKILL is a real crash: no drain,
    no lease release, entries left pending. One pool serves the tests' fault injection (start
    per stage, kill, restart the dead) and the benchmarks (several pipeline files, options per
    worker, logs whose tail explains a crash, waiting until workers have registered).

    `pipeline` is the default pipeline file; `start(..., pipeline=...)` can name another.
    `logdir` keeps each worker's output in a file there (else it is discarded).
    `code_dir` is the source tree the workers import alto from (default: this checkout); an
    A/B benchmark points it at an extracted older commit."""

    def __init__(self, url: str, pipeline: Path | None = None, env: dict[str, str] | None = None,
                 *, logdir: Path | None = None, code_dir: Path | None = None) -> None:
        self.url = url
        self.pipeline = pipeline
        self.logdir = logdir
        self.code_dir = code_dir or REPO
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(self.code_dir)}
        self.workers: list[Worker] = []
        self.kills = 0
        self._names: dict[Path, str] = {}  # pipeline file -> pipeline name
        self._spawned = 0  # numbers log files: a replacement gets a log of its own

    @property
    def procs(self) -> dict[str, list[subprocess.Popen[bytes]]]:
        """Per stage, its workers' processes in start order (a replacement keeps its slot)."""
        out: dict[str, list[subprocess.Popen[bytes]]] = {}
        for w in self.workers:
            out.setdefault(w.stage, []).append(w.proc)
        return out

    def _name(self, file: Path) -> str:
        if file not in self._names:
            import yaml

            self._names[file] = str(yaml.safe_load(file.read_text())["name"])
        return self._names[file]

    def _popen(self, cmd: list[str], stage: str, pipeline: str) -> tuple[
            subprocess.Popen[bytes], Path | None]:
        if self.logdir is None:
            return subprocess.Popen(cmd, cwd=self.code_dir, env=self.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL), None
        self._spawned += 1
        log = self.logdir / f"worker-{pipeline}-{stage}-{self._spawned}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(cmd, cwd=self.code_dir, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT)
        return proc, log

    def start(self, stage: str, n: int = 1, *, pipeline: Path | None = None,
              concurrency: int | None = None, engine: str | None = None,
              engine_opts: Sequence[str] = (), prefix: Sequence[str] = ()) -> list[Worker]:
        """`n` workers of `stage`; `prefix` goes before the interpreter (a profiler, taskset)."""
        file = pipeline if pipeline is not None else self.pipeline
        if file is None:
            raise ValueError("no pipeline file: pass one to WorkerProcs or to start()")
        cmd = [*prefix, sys.executable, "-m", "app.cli", "worker", "--pipeline", str(file),
               "--stage", stage, "--redis-url", self.url]
        if concurrency is not None:
            cmd += ["--concurrency", str(concurrency)]
        if engine is not None:
            cmd += ["--engine", engine]
        for opt in engine_opts:
            cmd += ["--engine-opt", opt]
        name = self._name(file)
        started = []
        for _ in range(n):
            proc, log = self._popen(cmd, stage, name)
            started.append(Worker(stage, name, cmd, proc, log))
            self.workers.append(started[-1])
        return started

    def _of(self, stage: str) -> list[Worker]:
        return [w for w in self.workers if w.stage == stage]

    def _respawn(self, w: Worker) -> None:
        w.proc, w.log = self._popen(w.cmd, w.stage, w.pipeline)

    def kill(self, stage: str, index: int) -> None:
        """SIGKILL one worker and start a fresh one in its place."""
        w = self._of(stage)[index]
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait(timeout=10)
        self.kills += 1
        self._respawn(w)

    def restart_dead(self, stage: str) -> int:
        """Replace workers of `stage` that have exited; returns how many."""
        dead = [w for w in self._of(stage) if w.proc.poll() is not None]
        for w in dead:
            self._respawn(w)
        return len(dead)

    def alive(self, stage: str) -> list[subprocess.Popen[bytes]]:
        return [w.proc for w in self._of(stage) if w.proc.poll() is None]

    def check(self) -> None:
        """Raise if any worker has exited (a benchmark would otherwise wait for nothing)."""
        for w in self.workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker {w.pipeline}.{w.stage} exited with "
                                   f"{w.proc.returncode}:\n{w.tail()}")

    async def wait_ready(self, transport: Transport, timeout_s: float = 60.0) -> None:
        """Until every worker has announced itself in its stage group (heartbeat)."""
        want: dict[str, int] = {}
        for w in self.workers:
            group = stage_group(w.pipeline, w.stage)
            want[group] = want.get(group, 0) + 1
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            have = {g: len(await transport.members(g)) for g in want}
            if all(have[g] >= n for g, n in want.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout_s}s: have {have}, "
                                   f"want {want}")
            await asyncio.sleep(0.05)  # registration has no event to await; bounded above

    def pids(self) -> dict[str, int]:
        return {f"worker{i}_{w.pipeline}.{w.stage}": w.pid for i, w in enumerate(self.workers)}

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM all first (they drain in parallel), then wait for each, SIGKILL what is
        left after `timeout_s` in all. The pool is empty afterwards and can start again."""
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for w in self.workers:
            stop_process(w.proc, max(0.1, deadline - time.monotonic()))
        self.workers.clear()
