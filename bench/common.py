"""What every benchmark needs: a throw-away redis-server, pipeline files for `alto worker`
subprocesses (the processes themselves: `bench.procs.WorkerProcs`), CPU accounting from
/proc, percentiles, and writing results (JSON + a section of BENCHMARKS.md).

Why subprocesses and /proc instead of in-process helpers: the benchmarks measure the real
deployment shape (one OS process per stage instance, talking to a real Redis), and on a
small machine the first thing to check about any number is whether the CPUs were saturated;
/proc gives that per process (worker, redis-server, driver) at no cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procs import free_port, start_redis, stop_process
from orchestrator.spec import PipelineSpec

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); inf values sort last; nan if empty."""
    xs = sorted(values)
    if not xs:
        return math.nan
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    if math.isinf(xs[hi]) or math.isinf(xs[lo]):
        return xs[hi] if pos > lo else xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def summary(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    out = {f"p{int(q) if float(q).is_integer() else q}": percentile(values, q) for q in qs}
    finite = [v for v in values if math.isfinite(v)]
    out["mean"] = sum(finite) / len(finite) if finite else math.nan
    out["n"] = len(values)
    return out


def jsonable(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings ("inf", "nan") so files stay valid JSON."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def restore(obj: Any) -> Any:
    """Inverse of `jsonable` for results read back from disk."""
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore(v) for v in obj]
    return obj


def fnum(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


# ------------------------------------------------------------------------------------------
# machine and output
# ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    redis_version = None
    if shutil.which("redis-server"):
        with contextlib.suppress(Exception):
            text = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                                  timeout=5).stdout
            m = re.search(r"v=(\S+)", text)
            redis_version = m.group(1) if m else text.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis": redis_version,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def update_markdown(path: Path, name: str, body: str, *, title: str | None = None) -> None:
    """Replace the marked section `name` of `path` (append it if missing); keep the rest.

    Why markers: each benchmark owns one section and may be re-run alone, so a run must
    never rewrite what other benchmarks (or people) wrote around it.
    """
    begin, end = section_markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else "# alto benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        heading = f"\n## {title}\n\n" if title else "\n"
        text = text.rstrip() + "\n" + heading + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------
# CPU accounting
# ------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    """User+system CPU seconds of a process (all threads) from /proc; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine (all processes, all cores) has been busy since boot."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


@dataclass
class CpuMeter:
    """CPU used by a set of processes over an interval, in cores; plus what everything else
    on the machine used meanwhile (`others_cores`), because on a shared machine a slow
    number is only meaningful next to the load it competed with."""

    pids: dict[str, int]
    start_wall: float = 0.0
    start: dict[str, float] = field(default_factory=dict)
    start_machine: float | None = None

    def begin(self) -> None:
        self.start_wall = time.perf_counter()
        self.start = {k: proc_cpu_s(p) or 0.0 for k, p in self.pids.items()}
        self.start_machine = machine_busy_s()

    def end(self) -> dict[str, float]:
        wall = max(1e-9, time.perf_counter() - self.start_wall)
        used = {k: (proc_cpu_s(p) or 0.0) - self.start.get(k, 0.0) for k, p in self.pids.items()}
        out = {f"{k}_cores": v / wall for k, v in used.items()}
        out["total_cores"] = sum(used.values()) / wall
        out["machine_share"] = out["total_cores"] / (os.cpu_count() or 1)
        busy = machine_busy_s()
        if busy is not None and self.start_machine is not None:
            out["machine_busy_cores"] = (busy - self.start_machine) / wall
            out["others_cores"] = max(0.0, out["machine_busy_cores"] - out["total_cores"])
        out["loadavg_1m"] = os.getloadavg()[0]
        return out


# ------------------------------------------------------------------------------------------
# redis-server
# ------------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    url: str
    port: int
    pid: int


@contextlib.contextmanager
def redis_server(timeout_s: float = 10.0) -> Iterator[RedisServer]:
    """A throw-away redis-server on a free loopback port, no persistence (as in the tests)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="alto-bench-redis-")
    try:
        proc = start_redis(port, workdir=workdir, timeout_s=timeout_s)
        try:
            yield RedisServer(f"redis://127.0.0.1:{port}/0", port, proc.pid)
        finally:
            stop_process(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# pipeline files for alto worker subprocesses
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def source_tree(ref: str) -> Iterator[Path]:
    """This repository's files at `ref`, in a temporary folder, for the workers of an A/B
    run's baseline (`WorkerProcs(code_dir=...)`). `git archive` rather than a worktree or
    checkout: it reads the object store only, so the checkout other people work in (index,
    HEAD, worktree list) is left alone."""
    tmp = Path(tempfile.mkdtemp(prefix="alto-bench-old-"))
    try:
        blob = subprocess.run(["git", "archive", ref], cwd=REPO, check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(tmp, filter="data")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_spec(spec: PipelineSpec, path: Path) -> Path:
    """A spec as YAML a worker process can load (round-trips through the same validator)."""
    raw = spec.model_dump(mode="json", exclude_defaults=True)
    raw["name"] = spec.name
    raw["streaming"] = spec.streaming
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


async def fault_free_units(
    spec: PipelineSpec, texts: list[str], concurrency: int = 64
) -> dict[str, list[Any]]:
    """Every input's units from a fault-free run: the same pipeline embedded, in this
    process (with the spec's simulated time, so a spec at time_scale 0 costs no waiting):
    the exact oracle a fault benchmark checks its results against."""
    from orchestrator.embedded import EmbeddedTransport
    from workers.client import run_to_completion
    from workers.engines.sim import TIME_SCALE_ENV
    from workers.runtime import Runtime

    saved = os.environ.pop(TIME_SCALE_ENV, None)  # it would override the spec's time scale
    t = EmbeddedTransport()
    rt = Runtime(t, [spec])
    await rt.start()
    try:
        sem = asyncio.Semaphore(concurrency)

        async def one(x: str) -> tuple[str, list[Any]]:
            async with sem:
                _, events = await run_to_completion(t, spec, x, deadline_s=120)
            if events[-1]["type"] != "result":
                raise RuntimeError(f"fault-free run failed: {events[-1]}")
            return x, events[-1]["units"]

        return dict(await asyncio.gather(*(one(x) for x in texts)))
    finally:
        await rt.stop()
        if saved is not None:
            os.environ[TIME_SCALE_ENV] = saved
