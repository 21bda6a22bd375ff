"""Runtime overhead over Redis: message rate and per-hop latency with *instant* stages.

What is measured, and why this way (see also BENCHMARKS.md, section "overhead"):

1. Raw Redis: `redis-benchmark XADD` (a custom command: redis-benchmark has no XADD test)
   with pipelining 1 and 16, against the same throw-away redis-server the workers use.
2. One worker's message rate: N inputs are preloaded into the entry stream of a two-stage
   tool pipeline `s1 -> s2`; then ONE real `alto worker` process for `s1` starts and drains
   them. Rate = N / (first input taken .. last input acknowledged), read from the stream's
   consumer-group state. Each input costs that worker a full runtime step: read,
   de-duplication (progress) and cancellation checks, the function, and the commits that
   publish its unit and end marker downstream with events and progress (one script call
   per batch of commits).
3. Chain rate: a k-stage chain (default 3), one worker per stage, N runs preloaded.
   A stage j receives j envelopes per run (the unit and j-1 end markers), so messages
   per run = k(k+1)/2 over all workers.
4. Per-hop latency: runs go through the chain one at a time (unloaded), then open-loop
   Poisson at a fraction of the chain's capacity (loaded). Every stage is `bench.tools:stamp`,
   which records (t_in, t_out) in the payload; a hop is t_in of stage k+1 minus t_out of stage
   k, i.e. from "stage k has its output" to "stage k+1 starts on it". Cross-check: the
   difference of median end-to-end latency of the k-stage and a 1-stage pipeline, per hop.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from bench.common import (
    BENCHMARKS_MD,
    RESULTS,
    CpuMeter,
    RedisServer,
    fnum,
    machine,
    median,
    redis_server,
    summary,
    update_markdown,
    write_json,
    write_spec,
)
from bench.floor import measure as measure_floor
from bench.procs import WorkerProcs
from orchestrator.envelope import Envelope
from orchestrator.routing import stage_group, stage_streams
from orchestrator.spec import PipelineSpec, parse_pipeline
from orchestrator.transport import Commit
from workers.client import new_run_id

Log = Callable[[str], None]


@dataclass
class OverheadConfig:
    messages: int = 20_000  # preloaded inputs for the one-worker rate
    chain_runs: int = 5_000  # preloaded runs for the chain rate
    chain_stages: int = 3
    latency_runs: int = 500  # sequential runs (unloaded latency), per pipeline
    loaded_fraction: float = 0.3  # loaded latency at this share of the chain's rate (0: skip)
    loaded_seconds: float = 5.0
    redis_requests: int = 200_000  # redis-benchmark -n (x5 with pipelining 16)
    redis_clients: int = 50  # redis-benchmark -c (its default)
    concurrency: int = 64  # stage concurrency (max inputs in flight per worker)
    sync_tools: bool = False  # plain functions (run in a thread) instead of async ones
    profile: bool = False  # py-spy the one-worker drain (a separate, second drain)
    seed: int = 1
    out_dir: Path = RESULTS
    markdown: Path | None = BENCHMARKS_MD
    tag: str = "overhead"


# ------------------------------------------------------------------------------------------
# pipelines and loading
# ------------------------------------------------------------------------------------------


def chain_spec(name: str, stages: int, concurrency: int, sync: bool = False) -> PipelineSpec:
    fn = "bench.tools:stamp_sync" if sync else "bench.tools:stamp"
    return parse_pipeline({
        "name": name,
        "stages": [
            {"name": f"s{i + 1}", "kind": "tool", "function": fn, "framing": "whole",
             "concurrency": concurrency, "to": [f"s{i + 2}"] if i + 1 < stages else []}
            for i in range(stages)
        ],
    })


def _input(spec: PipelineSpec, run: str, payload: str) -> tuple[str, Envelope]:
    env = Envelope(run=run, pipeline=spec.name, stage=spec.entry_stage, lineage=(), kind="unit",
                   credit=Fraction(1), payload=payload, context={"input": ""})
    return stage_streams(spec, spec.entry_stage)[0], env


async def preload(transport: Any, spec: PipelineSpec, n: int, batch: int = 1000) -> None:
    """N runs' inputs in the entry stream (without run events: nobody follows them)."""
    stream = stage_streams(spec, spec.entry_stage)[0]
    await transport.ensure_group(stream, stage_group(spec.name, spec.entry_stage))
    base = new_run_id()  # run ids must be unique: progress records are keyed by run
    for i in range(0, n, batch):
        c = Commit()
        for j in range(i, min(n, i + batch)):
            c.messages.append(_input(spec, f"{base}_{j:08d}", '{"h":[]}'))
        await transport.commit(c)


async def wait_drained(transport: Any, spec: PipelineSpec, stage: str, expect: int,
                       on_start: Callable[[], None] | None = None,
                       check: Callable[[], None] | None = None,
                       timeout_s: float = 600.0, poll_s: float = 0.002) -> tuple[float, float]:
    """(t_first_taken, t_all_acked) on perf_counter for a stage that will receive `expect`
    entries in all, by polling its consumer group: the drain is done once `expect` entries
    have been delivered to the group (`entries_read`) and none is pending (all acknowledged).

    Counted by what the group read, not by stream length, because the workers' trim janitor
    drops acknowledged entries mid-run. `entries_read` is exact here: every benchmark
    pipeline has a fresh name, so its streams and groups are new (see StreamStats)."""
    stream = stage_streams(spec, stage)[0]
    group = stage_group(spec.name, stage)
    t0: float | None = None
    deadline = time.monotonic() + timeout_s
    while True:
        st = await transport.stats(stream, group)
        now = time.perf_counter()
        if st.entries_read is None:
            raise RuntimeError(f"{stream}: the transport cannot count entries read: {st}")
        if t0 is None and st.entries_read > 0:
            t0 = now
            if on_start is not None:
                on_start()
        if t0 is not None and st.entries_read >= expect and st.pending == 0:
            return t0, now
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"stage {stage} not drained in {timeout_s}s: {st}")
        await asyncio.sleep(poll_s)


# ------------------------------------------------------------------------------------------
# redis-benchmark
# ------------------------------------------------------------------------------------------


def redis_benchmark_xadd(server: RedisServer, n: int, clients: int, pipeline: int) -> dict[str, Any]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark not found on PATH")
    cmd = [binary, "-h", "127.0.0.1", "-p", str(server.port), "-n", str(n), "-c", str(clients),
           "-P", str(pipeline), "--csv", "XADD", "bench:xadd", "*", "f", "v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    if not rows:
        raise RuntimeError(f"cannot parse redis-benchmark output: {res.stdout!r}")
    row = rows[-1]
    subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(server.port), "DEL",
                    "bench:xadd"], capture_output=True, timeout=30)
    return {
        "command": " ".join(cmd[:-5] + ["XADD", "bench:xadd", "'*'", "f", "v"]),
        "requests": n, "clients": clients, "pipeline": pipeline,
        "rps": float(row["rps"]),
        "p50_ms": float(row.get("p50_latency_ms") or "nan"),
        "p99_ms": float(row.get("p99_latency_ms") or "nan"),
    }


async def command_stats(server: RedisServer) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(server.url)
    try:
        info = await r.info("commandstats")
    finally:
        await r.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def round_trips(after: dict[str, int], before: dict[str, int], n: int) -> float:
    """Client round trips per input: one per command the worker sends (a commit batch is
    one EVALSHA of the commit script, a read batch one pipeline; the commands a script runs
    are counted by Redis but cost no round trip), minus the benchmark's own polling (XLEN +
    XINFO GROUPS in one MULTI per poll, and until the group's first read a second MULTI of
    XINFO STREAM + XINFO GROUPS: see RedisTransport.stats)."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    polls = d.get("xlen", 0) + d.get("xinfo|stream", 0)
    execs = d.get("exec", 0) - polls
    in_script = {"xadd", "hset", "xack", "expire", "hget", "exists"}  # what _COMMIT runs
    outside = sum(v for k, v in d.items() if k not in in_script | {
        "multi", "exec", "xlen", "xinfo|groups", "xinfo|stream", "info"})
    # the runner's progress/cancel reads (HMGET per run + EXISTS, one pipeline) count by
    # their HMGETs: an upper bound, as concurrent reads share a pipeline
    return (execs + outside) / n


# ------------------------------------------------------------------------------------------
# latency
# ------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """Timestamps (ns) of one run through the chain."""

    t_pub: int
    t_done: int
    stamps: list[tuple[str, int, int]]


def hops_of(traces: list[Trace]) -> dict[str, list[float]]:
    """Per hop name, the latencies in ms."""
    out: dict[str, list[float]] = {}
    for tr in traces:
        st = tr.stamps
        if not st:
            continue
        out.setdefault(f"client->{st[0][0]}", []).append((st[0][1] - tr.t_pub) / 1e6)
        for (a, _ai, a_out), (b, b_in, _bo) in zip(st, st[1:], strict=False):
            out.setdefault(f"{a}->{b}", []).append((b_in - a_out) / 1e6)
        out.setdefault(f"{st[-1][0]}->result", []).append((tr.t_done - st[-1][2]) / 1e6)
        out.setdefault("end_to_end", []).append((tr.t_done - tr.t_pub) / 1e6)
    return out


def stage_hops(hops: dict[str, list[float]]) -> list[float]:
    """All worker-to-worker hop samples (the ones the targets are about)."""
    return [x for k, v in hops.items() if not k.startswith("client") and "->result" not in k
            and k != "end_to_end" for x in v]


async def one_run(transport: Any, spec: PipelineSpec, deadline_s: float = 60.0) -> Trace:
    from workers.client import follow_run, start_run

    t_pub = time.time_ns()
    run = await start_run(transport, spec, json.dumps({"h": [], "t_pub": t_pub}))
    async for _, ev in follow_run(transport, spec, run, deadline_s=deadline_s, block_ms=1000):
        if ev["type"] == "result":
            t_done = time.time_ns()
            out = ev["output"]
            stamps = [(s, int(a), int(b)) for s, a, b in out.get("h", [])]
            return Trace(t_pub, t_done, stamps)
        if ev["type"] == "error":
            raise RuntimeError(f"run {run} failed: {ev}")
    raise RuntimeError(f"run {run} ended without a result")


async def sequential(transport: Any, spec: PipelineSpec, n: int) -> list[Trace]:
    return [await one_run(transport, spec) for _ in range(n)]


async def open_loop(transport: Any, spec: PipelineSpec, rate: float, seconds: float,
                    seed: int) -> tuple[list[Trace], float]:
    """Poisson arrivals at `rate`/s for `seconds`; returns traces and the worst send lag (ms)."""
    rng = random.Random(seed)
    t, times = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        times.append(t)
    start = time.perf_counter()
    tasks: list[asyncio.Task[Trace]] = []
    worst = 0.0
    for at in times:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        worst = max(worst, (time.perf_counter() - start - at) * 1000)
        tasks.append(asyncio.create_task(one_run(transport, spec)))
    return list(await asyncio.gather(*tasks)), worst


# ------------------------------------------------------------------------------------------
# profiling (py-spy)
# ------------------------------------------------------------------------------------------


def pyspy_binary() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


def top_functions(raw: str, limit: int = 60) -> dict[str, list[dict[str, Any]]]:
    """Self and inclusive sample shares per function from py-spy's collapsed ('raw') output."""
    total = 0
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        frames = [f.split(" (", 1)[0] + " (" + f.split(" (", 1)[1].rsplit(":", 1)[0] + ")"
                  if " (" in f else f for f in frames]
        selfc[frames[-1]] = selfc.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def rows(d: dict[str, int]) -> list[dict[str, Any]]:
        best = sorted(d.items(), key=lambda kv: -kv[1])[:limit]
        return [{"function": k, "share": v / total if total else 0.0, "samples": v} for k, v in best]

    return {"total_samples": [{"samples": total}], "self": rows(selfc), "inclusive": rows(incl)}


# ------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------


async def _one_worker_rate(server: RedisServer, transport: Any, pool: WorkerProcs, tmp: Path,
                           cfg: OverheadConfig, name: str, profile_to: Path | None,
                           log: Log) -> dict[str, Any]:
    spec = chain_spec(name, 2, cfg.concurrency, cfg.sync_tools)
    f = write_spec(spec, tmp / f"{name}.yaml")
    await preload(transport, spec, cfg.messages)
    (w,) = pool.start("s1", pipeline=f)
    meter = CpuMeter({"worker": w.pid, "redis": server.pid})
    spies: list[subprocess.Popen[bytes]] = []

    def started() -> None:
        meter.begin()
        if profile_to is not None:  # attach once the drain starts: no import-time samples
            spies.append(subprocess.Popen(
                [pyspy_binary(), "record", "--pid", str(w.pid), "--format", "raw", "--rate",
                 "200", "--output", str(profile_to), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    before = await command_stats(server)
    t0, t1 = await wait_drained(transport, spec, "s1", cfg.messages, on_start=started,
                                check=pool.check)
    cpu = meter.end()
    after = await command_stats(server)
    per_input = {k: (after.get(k, 0) - before.get(k, 0)) / cfg.messages for k in after}
    per_input = {k: round(v, 3) for k, v in sorted(per_input.items(), key=lambda kv: -kv[1])
                 if v >= 0.01 and k not in ("xinfo|groups", "xinfo|stream", "xlen", "multi",
                                               "exec")}
    for spy in spies:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
    pool.stop()
    rate = cfg.messages / (t1 - t0)
    log(f"one worker: {cfg.messages} inputs in {t1 - t0:.2f}s = {rate:,.0f}/s "
        f"(worker {cpu['worker_cores']:.2f} cores, redis {cpu['redis_cores']:.2f})")
    return {"inputs": cfg.messages, "seconds": t1 - t0, "inputs_per_s": rate, "cpu": cpu,
            "worker_cpu_ms_per_input": cpu["worker_cores"] * (t1 - t0) / cfg.messages * 1000,
            "redis_commands_per_input": per_input,
            "round_trips_per_input": round_trips(after, before, cfg.messages)}


async def run_overhead(cfg: OverheadConfig, log: Log = print) -> dict[str, Any]:
    from workers.redis_transport import RedisTransport

    result: dict[str, Any] = {"benchmark": "overhead", "config": _cfg_dict(cfg),
                              "machine": machine()}
    k = cfg.chain_stages
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="alto-bench-") as tmpd:
        tmp = Path(tmpd)
        result["redis_url"] = server.url
        # 1. raw redis
        log("redis-benchmark XADD ...")
        rb1 = await asyncio.to_thread(redis_benchmark_xadd, server, cfg.redis_requests,
                                      cfg.redis_clients, 1)
        rb16 = await asyncio.to_thread(redis_benchmark_xadd, server, cfg.redis_requests * 5,
                                       cfg.redis_clients, 16)
        log(f"redis-benchmark XADD: {rb1['rps']:,.0f}/s (-P 1), {rb16['rps']:,.0f}/s (-P 16)")
        result["redis_benchmark"] = {"P1": rb1, "P16": rb16}

        transport = RedisTransport(server.url, max_connections=512)
        pool = WorkerProcs(server.url, logdir=tmp)
        try:
            # 2. one worker
            one = await _one_worker_rate(server, transport, pool, tmp, cfg, "ovh_single", None, log)
            result["one_worker"] = one
            if cfg.profile:
                prof = cfg.out_dir / f"{cfg.tag}_profile.txt"
                prof.parent.mkdir(parents=True, exist_ok=True)
                again = await _one_worker_rate(server, transport, pool, tmp, cfg, "ovh_prof",
                                               prof, log)
                raw = prof.read_text() if prof.exists() else ""
                result["profile"] = {"file": str(prof.relative_to(cfg.out_dir.parent.parent))
                                     if prof.is_relative_to(cfg.out_dir.parent.parent) else str(prof),
                                     "inputs_per_s_under_profiler": again["inputs_per_s"],
                                     **top_functions(raw)}

            # 3. chain throughput
            chain = chain_spec("ovh_chain", k, cfg.concurrency, cfg.sync_tools)
            fchain = write_spec(chain, tmp / "ovh_chain.yaml")
            workers = [w for i in range(1, k) for w in pool.start(f"s{i + 1}", pipeline=fchain)]
            await pool.wait_ready(transport)
            await preload(transport, chain, cfg.chain_runs)
            workers[:0] = pool.start("s1", pipeline=fchain)
            pids = {f"s{i + 1}": w.pid for i, w in enumerate(workers)} | {"redis": server.pid}
            meter = CpuMeter(pids)
            t0, _ = await wait_drained(transport, chain, "s1", cfg.chain_runs, on_start=meter.begin,
                                  check=pool.check)
            _, t1 = await wait_drained(transport, chain, f"s{k}", cfg.chain_runs * k,
                                     check=pool.check, timeout_s=120)
            cpu = meter.end()
            runs_s = cfg.chain_runs / (t1 - t0)
            msgs = cfg.chain_runs * k * (k + 1) // 2
            log(f"chain of {k}: {cfg.chain_runs} runs in {t1 - t0:.2f}s = {runs_s:,.0f} runs/s, "
                f"{msgs / (t1 - t0):,.0f} envelopes/s over {k} workers (CPU {cpu['total_cores']:.2f})")
            result["chain"] = {
                "stages": k, "runs": cfg.chain_runs, "seconds": t1 - t0, "runs_per_s": runs_s,
                "envelopes_per_run": k * (k + 1) // 2, "envelopes_per_s": msgs / (t1 - t0),
                "per_worker_envelopes_per_s": {f"s{j}": cfg.chain_runs * j / (t1 - t0)
                                               for j in range(1, k + 1)},
                "cpu": cpu,
            }

            # 4. latency: unloaded through the chain, then a 1-stage pipeline (cross-check)
            await sequential(transport, chain, 20)  # warm connections and code paths
            traces = await sequential(transport, chain, cfg.latency_runs)
            hops = hops_of(traces)
            lat: dict[str, Any] = {"unloaded": _hop_summary(hops)}
            log("unloaded hop latency (ms): " + _fmt_hops(lat["unloaded"]))
            floor = sorted(await measure_floor(server.url, cfg.latency_runs))
            lat["floor"] = summary(floor)
            log(f"floor (XADD -> another process's blocked XREADGROUP): p50 "
                f"{lat['floor']['p50']:.3f} p99 {lat['floor']['p99']:.3f} ms")
            if cfg.loaded_fraction > 0:
                rate = cfg.loaded_fraction * runs_s
                lmeter = CpuMeter(pids | {"driver": os.getpid()})
                lmeter.begin()
                ltr, lag = await open_loop(transport, chain, rate, cfg.loaded_seconds, cfg.seed)
                lat["loaded"] = {"rate_runs_per_s": rate, "runs": len(ltr), "send_lag_ms_max": lag,
                                 "cpu": lmeter.end(), **_hop_summary(hops_of(ltr))}
                log(f"loaded ({rate:,.0f} runs/s) hop latency (ms): " + _fmt_hops(lat["loaded"]))
            pool.stop()

            single = chain_spec("ovh_one", 1, cfg.concurrency, cfg.sync_tools)
            fone = write_spec(single, tmp / "ovh_one.yaml")
            pool.start("s1", pipeline=fone)
            await pool.wait_ready(transport)
            await sequential(transport, single, 20)
            one_tr = await sequential(transport, single, cfg.latency_runs)
            e2e_1 = median([(t.t_done - t.t_pub) / 1e6 for t in one_tr])
            e2e_k = median(hops["end_to_end"])
            lat["difference_method"] = {
                "e2e_p50_ms_1_stage": e2e_1, f"e2e_p50_ms_{k}_stages": e2e_k,
                "per_hop_ms": (e2e_k - e2e_1) / (k - 1) if k > 1 else math.nan,
            }
            log(f"difference method: ({e2e_k:.3f} - {e2e_1:.3f}) / {k - 1} = "
                f"{lat['difference_method']['per_hop_ms']:.3f} ms per hop")
            result["latency"] = lat
        finally:
            pool.stop()
            await transport.close()

    p1 = result["redis_benchmark"]["P1"]["rps"]
    p16 = result["redis_benchmark"]["P16"]["rps"]
    rate1 = result["one_worker"]["inputs_per_s"]
    un = result["latency"]["unloaded"]["stage_hops"]
    result["headline"] = {
        "one_worker_inputs_per_s": rate1,
        "redis_xadd_P1_per_s": p1,
        "redis_xadd_P16_per_s": p16,
        "worker_cpu_ms_per_input": result["one_worker"]["worker_cpu_ms_per_input"],
        "inputs_per_worker_cpu_s": 1000 / result["one_worker"]["worker_cpu_ms_per_input"],
        "others_cores_during": result["one_worker"]["cpu"].get("others_cores"),
        "ratio_vs_P1": rate1 / p1,
        "ratio_vs_P16": rate1 / p16,
        "target_ratio": 0.30,
        "ratio_target_met": rate1 / p1 >= 0.30,
        "hop_p50_ms": un["p50"], "hop_p99_ms": un["p99"],
        "floor_p50_ms": result["latency"]["floor"]["p50"],
        "floor_p99_ms": result["latency"]["floor"]["p99"],
        "hop_target_met": un["p50"] <= 1.0 and un["p99"] <= 5.0,
    }
    stem = cfg.out_dir / f"{cfg.tag}.json"
    write_json(stem, result)
    result["files"] = [str(stem)]
    if cfg.markdown is not None:
        update_markdown(cfg.markdown, cfg.tag, render_markdown(result), title="Runtime overhead")
    return result


def _cfg_dict(cfg: OverheadConfig) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _hop_summary(hops: dict[str, list[float]]) -> dict[str, Any]:
    return {"hops": {k: summary(v) for k, v in hops.items()},
            "stage_hops": summary(stage_hops(hops))}


def _fmt_hops(s: dict[str, Any]) -> str:
    parts = [f"{k} p50 {v['p50']:.3f} p99 {v['p99']:.3f}" for k, v in s["hops"].items()]
    return "; ".join(parts)


def render_markdown(r: dict[str, Any]) -> str:
    h = r["headline"]
    m = r["machine"]
    c = r["config"]
    one = r["one_worker"]
    ch = r["chain"]
    lat = r["latency"]
    lines = [
        f"Measured {m['date']} on {m['cpus']} CPU cores ({m['cpu_model']}), Redis {m['redis']}, "
        f"Python {m['python']}; redis-server on loopback, started by the benchmark.",
        "",
        "| metric | value | target | met |",
        "| --- | --- | --- | --- |",
        f"| redis-benchmark XADD, -P 1 (-c {c['redis_clients']}) | {h['redis_xadd_P1_per_s']:,.0f} /s | | |",
        f"| redis-benchmark XADD, -P 16 | {h['redis_xadd_P16_per_s']:,.0f} /s | | |",
        f"| one `alto worker`, instant tool stage: inputs/s | {h['one_worker_inputs_per_s']:,.0f} /s "
        f"| | |",
        f"| ratio to XADD -P 1 | {h['ratio_vs_P1']:.1%} | ≥ 30% | "
        f"{'yes' if h['ratio_target_met'] else '**no**'} |",
        f"| ratio to XADD -P 16 | {h['ratio_vs_P16']:.1%} | | |",
        f"| worker CPU per input | {h['worker_cpu_ms_per_input']:.3f} ms "
        f"(= {h['inputs_per_worker_cpu_s']:,.0f} inputs per CPU-second) | | |",
        f"| hop latency p50 (unloaded) | {fnum(h['hop_p50_ms'], 3)} ms | ≤ 1 ms | "
        f"{'yes' if h['hop_p50_ms'] <= 1 else '**no**'} |",
        f"| hop latency p99 (unloaded) | {fnum(h['hop_p99_ms'], 3)} ms | ≤ 5 ms | "
        f"{'yes' if h['hop_p99_ms'] <= 5 else '**no**'} |",
        f"| floor: XADD to another process's blocked XREADGROUP, p50 / p99 | "
        f"{fnum(h['floor_p50_ms'], 3)} / {fnum(h['floor_p99_ms'], 3)} ms | | |",
        f"| alto's own share of a hop, p50 (hop - floor) | "
        f"{fnum(h['hop_p50_ms'] - h['floor_p50_ms'], 3)} ms | | |",
        "",
        f"One worker: {one['inputs']:,} preloaded inputs drained in {one['seconds']:.2f} s, "
        f"using {one['cpu']['worker_cores']:.2f} cores (redis-server "
        f"{one['cpu']['redis_cores']:.2f}; other tenants of the machine "
        f"{fnum(one['cpu'].get('others_cores'))} cores, load average "
        f"{fnum(one['cpu'].get('loadavg_1m'), 1)}); stage concurrency {c['concurrency']}, "
        f"{'sync functions (thread hop)' if c['sync_tools'] else 'async functions'}. "
        "Redis commands per input (INFO commandstats): "
        + ", ".join(f"{k} {v:g}" for k, v in one["redis_commands_per_input"].items())
        + f"; {one['round_trips_per_input']:.2f} client round trips per input "
        "(a commit batch is one EVALSHA; the commands it runs cost no round trip).",
        "",
        f"Chain of {ch['stages']} workers: {ch['runs_per_s']:,.0f} runs/s = "
        f"{ch['envelopes_per_s']:,.0f} envelopes/s in total ({ch['envelopes_per_run']} envelopes "
        f"per run: stage j reads 1 unit + j-1 end markers); CPU {ch['cpu']['total_cores']:.2f} of "
        f"{m['cpus']} cores.",
        "",
        "Hop latency (ms): time from stage k having its output to stage k+1 starting on it, "
        "from timestamps taken inside the stage functions (same clock, one machine).",
        "",
        "| hop | unloaded p50 | p99 | loaded p50 | p99 |",
        "| --- | --- | --- | --- | --- |",
    ]
    loaded = lat.get("loaded", {}).get("hops", {})
    for name, s in lat["unloaded"]["hops"].items():
        ls = loaded.get(name, {})
        lines.append(f"| {name} | {fnum(s['p50'], 3)} | {fnum(s['p99'], 3)} | "
                     f"{fnum(ls.get('p50'), 3)} | {fnum(ls.get('p99'), 3)} |")
    if "loaded" in lat:
        ld = lat["loaded"]
        lines += ["", f"Loaded = open-loop Poisson at {ld['rate_runs_per_s']:,.0f} runs/s "
                  f"({c['loaded_fraction']:.0%} of the chain's preloaded rate) for "
                  f"{c['loaded_seconds']} s, each run started and followed (event stream read) by "
                  f"the Python driver on the same machine: driver + workers + redis used "
                  f"{fnum(ld['cpu']['total_cores'])} cores, other tenants "
                  f"{fnum(ld['cpu'].get('others_cores'))}; the driver fell behind its schedule by "
                  f"up to {ld['send_lag_ms_max']:.0f} ms."]
    d = lat["difference_method"]
    lines += ["", f"Cross-check (difference of median end-to-end latency, {ch['stages']}-stage vs "
              f"1-stage pipeline, per hop): {fnum(d['per_hop_ms'], 3)} ms. It is larger than the "
              "timestamp hop because each extra stage also handles end markers and writes credit "
              "events before the run can complete."]
    if "profile" in r:
        p = r["profile"]
        lines += ["", f"Profile of a second one-worker drain (py-spy at 200 Hz, "
                  f"{p['total_samples'][0]['samples']} samples, raw stacks in `{p['file']}`; "
                  f"{p['inputs_per_s_under_profiler']:,.0f} inputs/s under the profiler). "
                  "Inclusive shares of project code, and the largest self shares:", "",
                  "| function (inclusive) | share | | function (self) | share |",
                  "| --- | --- | --- | --- | --- |"]
        own = [x for x in p["inclusive"] if any(f"({d}/" in x["function"] for d in
                                                ("workers", "orchestrator", "bench"))]
        for a, b in zip(own[:12], p["self"][:12], strict=False):
            lines.append(f"| `{a['function']}` | {a['share']:.0%} | | `{b['function']}` | "
                         f"{b['share']:.0%} |")
    opts = [f"--loaded-fraction {c['loaded_fraction']:g}"]
    if c.get("profile"):
        opts.append("--profile")
    if c.get("sync_tools"):
        opts.append("--sync-tools")
    if c["concurrency"] != 64:
        opts.append(f"--concurrency {c['concurrency']}")
    lines += ["", f"Reproduce: `.venv/bin/alto bench overhead {' '.join(opts)}` "
              "(options: `--help`)."]
    return "\n".join(lines)


def main(cfg: OverheadConfig, log: Log = print) -> dict[str, Any]:
    return asyncio.run(run_overhead(cfg, log))

