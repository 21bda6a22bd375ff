"""What the gateway pays to look after runs nobody follows (app/supervisor.py), on Redis.

A dropped native stream or a replayed dead letter is watched by the gateway's supervisor,
which reads every such run's log each tick (TICK_S) to see it end. The question: how does
a sweep cost grow with the number of watched runs, reading run by run (one XREAD round
trip each, the first version) against reading them in bulk (`read_events_many`: one
pipeline of XREADs per RUNS_PER_READ runs)?

One trial: a throw-away redis-server holding `runs` started runs that never progress (no
workers: the case of idle detached runs). Both ways of reading are timed on the same runs
in the same process, alternating, `reps` times; then, for `idle_s` seconds each, the first
version's ticks (one read per run every TICK_S) and the supervisor itself at its real tick
run, and the gateway process' CPU (and Redis' commands/s under the supervisor) are
measured. Medians are reported; the ratio is per-run over bulk.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.supervisor import EVENTS_PER_READ, TICK_S, RunSupervisor
from bench.common import fnum, machine, median, redis_server, update_markdown, write_json
from orchestrator.spec import parse_pipeline
from workers.client import fail_run, start_run
from workers.redis_transport import RedisTransport

SPEC = parse_pipeline({"name": "idle", "stages": [
    {"name": "s", "kind": "tool", "function": "tests.toy.stages:upper"}]})


@dataclass
class SweepConfig:
    runs: list[int] = field(default_factory=lambda: [64, 256, 1024])
    reps: int = 5
    idle_s: float = 5.0
    out_dir: Path = Path("bench/results")
    markdown: Path | None = Path("BENCHMARKS.md")
    tag: str = "supervisor-sweep"


class _Slot:
    def release(self) -> None:
        pass


async def _per_run(t: RedisTransport, cursors: dict[str, str | None]) -> None:
    for run, cursor in cursors.items():
        await t.read_events(run, cursor, EVENTS_PER_READ, 0)


async def _trial(url: str, n: int, cfg: SweepConfig) -> dict[str, Any]:
    t = RedisTransport(url)
    try:
        await t._r.flushdb()
        runs = [await start_run(t, SPEC, "x") for _ in range(n)]
        last = {r: await t.last_event_id(r) for r in runs}  # read from the end, as a tick does

        async def fail(run: str, code: str, message: str) -> None:
            await fail_run(t, run, code, message, 60)

        async def expire(run: str) -> None:
            await t.expire_run(run, 60)

        sup = RunSupervisor(t, fail, expire, lambda w: None)
        per_run: list[float] = []
        bulk: list[float] = []
        for _ in range(cfg.reps):
            t0 = time.perf_counter()
            await _per_run(t, last)
            per_run.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await t.read_events_many(last, EVENTS_PER_READ)
            bulk.append(time.perf_counter() - t0)
        # the first version's ticks: every TICK_S, one read per run, for as long
        stop = time.perf_counter() + cfg.idle_s
        cpu0, w0 = time.process_time(), time.perf_counter()
        while time.perf_counter() < stop:
            await asyncio.sleep(TICK_S)
            await _per_run(t, last)
        cpu_per_run = (time.process_time() - cpu0) / (time.perf_counter() - w0)
        for r in runs:  # the supervisor at its real tick, every run watched
            sup.watch(SPEC, r, deadline_s=3600, total_s=3600, slot=_Slot())  # type: ignore[arg-type]
        await sup.sweep()  # the first look reads each log from its start
        c0 = (await t._r.info("stats"))["total_commands_processed"]
        cpu0, w0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(cfg.idle_s)
        wall = time.perf_counter() - w0
        cpu = (time.process_time() - cpu0) / wall
        cmds = ((await t._r.info("stats"))["total_commands_processed"] - c0) / wall
        await sup.close()
        return {"runs": n, "per_run_ms": median(per_run) * 1000, "bulk_ms": median(bulk) * 1000,
                "ratio": median(per_run) / max(1e-9, median(bulk)),
                "idle_gateway_cores_run_by_run": cpu_per_run, "idle_gateway_cores": cpu,
                "idle_redis_cmds_per_s": cmds}
    finally:
        await t.close()


def render_markdown(data: dict[str, Any], files: list[Path]) -> str:
    lines = [
        "Run by `alto bench supervisor`; source `bench/supervisor_sweep.py`. One read of "
        "every watched run's log (a supervisor tick's reads), run by run (one XREAD round "
        "trip each) and in bulk (`read_events_many`, one pipeline), medians of "
        f"{data['config']['reps']} alternating reps. Then, {data['config']['idle_s']:g} s "
        "each with every run watched: the first version's ticks (one read per run every "
        "0.25 s) and the supervisor itself. Redis still runs one XREAD per run and tick (the "
        "commands/s column); what bulk reading saves is the round trips, hence the "
        "gateway's CPU and the time one look takes.",
        "",
        "| watched runs | one look, run by run (ms) | one look, bulk (ms) | ratio | gateway "
        "CPU idle, run by run (cores) | gateway CPU idle, supervisor (cores) | Redis "
        "commands/s, supervisor |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['runs']} | {fnum(r['per_run_ms'])} | {fnum(r['bulk_ms'])} | "
                     f"{fnum(r['ratio'])}x | {fnum(r['idle_gateway_cores_run_by_run'], 3)} | "
                     f"{fnum(r['idle_gateway_cores'], 3)} | "
                     f"{fnum(r['idle_redis_cmds_per_s'], 0)} |")
    m = data["machine"]
    lines += ["", f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), Redis "
              f"{m.get('redis')}, load {fnum(data['loadavg_1m'])} at the start, "
              f"{m.get('date')}. Files: " + ", ".join(f"`{p}`" for p in files) + "."]
    return "\n".join(lines)


def main(cfg: SweepConfig, log: Any = print) -> dict[str, Any]:
    rows = []
    load = os.getloadavg()[0]
    with redis_server() as server:
        for n in cfg.runs:
            row = asyncio.run(_trial(server.url, n, cfg))
            log(f"{n} runs: run by run {row['per_run_ms']:.1f} ms, bulk {row['bulk_ms']:.1f} ms "
                f"({row['ratio']:.1f}x); idle {row['idle_gateway_cores_run_by_run']:.3f} -> "
                f"{row['idle_gateway_cores']:.3f} cores, "
                f"{row['idle_redis_cmds_per_s']:.0f} Redis commands/s")
            rows.append(row)
    data = {"benchmark": "supervisor_sweep", "config": {"reps": cfg.reps, "idle_s": cfg.idle_s,
            "runs": cfg.runs}, "machine": machine(), "loadavg_1m": load, "rows": rows}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    path = write_json(cfg.out_dir / f"{cfg.tag}.json", data)
    if cfg.markdown is not None:
        update_markdown(cfg.markdown, cfg.tag, render_markdown(data, [path]),
                        title="Supervisor: looking after runs nobody follows")
    return {**data, "files": [str(path)]}
