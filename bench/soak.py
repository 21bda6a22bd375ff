"""Soak: steady load at ~80% of measured capacity, first without faults, then with a worker
SIGKILLed (and restarted) every few seconds and one Redis restart; every run's result is
checked against the fault-free result of the same inputs.

What it reports (issue #7): runs completed, runs errored (with reasons), units lost (an
expected output unit missing from a completed run, or every unit of a run that never
ended), duplicates (an output unit beyond its expected count, or a raw event repeated with
*different* content under one message id), entries left unacknowledged after the drain,
and latency percentiles for runs started in the fault-free and in the faulty phase.

Why a deterministic pipeline: the sim engine's text depends only on the prompt, and the
tools are pure, so an embedded run of the same inputs without faults is the exact oracle.
Why subprocesses: a SIGKILL has to hit a real `alto worker` process, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    REPO,
    fault_free_units,
    fnum,
    machine,
    summary,
    update_markdown,
    write_json,
)
from bench.procs import AofRedis, WorkerProcs
from orchestrator.spec import PipelineSpec, parse_pipeline
from orchestrator.template import StageContext

SECTION = "soak"
TITLE = "Soak: faults under load"


# ---- the workload -----------------------------------------------------------------------


def first_words(value: Any, ctx: StageContext) -> list[str]:
    """Up to three words of a sentence, as units (a pure function: the oracle is exact)."""
    return [w.strip(".,").lower() for w in str(value).split()[:3] if w.strip(".,")]


def collect(items: list[Any], ctx: StageContext) -> str:
    return f"{ctx.stage}[{','.join(str(i) for i in items)}]"


def gather(items: list[Any], ctx: StageContext) -> list[Any]:
    """The run's per-sentence results, one output unit each (so loss is counted per unit)."""
    return list(items)


def soak_spec(time_scale: float, capacity: int = 64) -> PipelineSpec:
    """An LM stage (sim engine) streaming sentences, a fan-out tool, and aggregation at two
    depths (per sentence, then per request) so kills hit partition leases too."""
    return parse_pipeline({
        "name": "soak",
        "engines": {"default": {"kind": "sim", "capacity": capacity, "time_scale": time_scale}},
        "stages": [
            {"name": "draft", "kind": "lm", "framing": "sentences", "max_tokens": 48,
             "prompt": "Notes about {input}:", "to": ["words"], "concurrency": capacity},
            {"name": "words", "kind": "tool", "function": "bench.soak:first_words",
             "framing": "items", "to": ["group"]},
            {"name": "group", "kind": "reduce", "function": "bench.soak:collect",
             "aggregate_by": ["request", "draft"], "partitions": 4, "to": ["final"]},
            {"name": "final", "kind": "reduce", "function": "bench.soak:gather",
             "framing": "items", "aggregate_by": ["request"], "partitions": 2},
        ],
    })


def inputs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    topics = ["rivers", "bridges", "volcanoes", "libraries", "comets", "forests", "trains",
              "glaciers", "markets", "lighthouses", "deserts", "harbours"]
    return [f"{rng.choice(topics)} {rng.choice(topics)} #{i}" for i in range(n)]


# ---- driver -------------------------------------------------------------------------------


@dataclass
class SoakConfig:
    duration_s: float = 60.0  # per phase (fault-free, then faulty)
    probe_s: float = 15.0
    probe_clients: int = 48
    load: float = 0.8  # share of the measured capacity offered
    kill_every_s: float = 6.0
    redis_restart: bool = True
    workers_per_stage: int = 2
    time_scale: float = 0.5
    claim_idle_ms: int = 1_000
    lease_ttl_ms: int = 1_500
    heartbeat_ms: int = 200
    run_deadline_s: float = 120.0
    seed: int = 7
    out_dir: Path = field(default_factory=lambda: REPO / "bench" / "results")
    markdown: Path | None = REPO / "BENCHMARKS.md"
    tag: str = "soak"


@dataclass
class Outcome:
    run: str
    text: str
    phase: str
    started: float
    ended: float | None = None
    status: str = "hung"  # result | error | hung
    reason: str | None = None
    units: list[Any] | None = None
    raw: list[dict[str, Any]] = field(default_factory=list)


async def _follow(t: Any, spec: PipelineSpec, o: Outcome, deadline_s: float) -> None:
    """Follow one run to its end, resuming across Redis outages (as a client would with
    Last-Event-ID); a run that does not end by its deadline stays `hung`."""
    import redis

    from workers.client import follow_run

    end = o.started + deadline_s
    last: str | None = None
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        try:
            async for eid, ev in follow_run(t, spec, o.run, after=last, deadline_s=left):
                last = eid
                if ev["type"] == "result":
                    o.status, o.units, o.ended = "result", ev["units"], time.monotonic()
                elif ev["type"] == "error":
                    o.status, o.ended = "error", time.monotonic()
                    o.reason = f"{ev.get('code')}: {ev.get('stage')}: {ev.get('message')}"
            return
        except TimeoutError:
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            await asyncio.sleep(0.2)  # Redis is restarting: back off, then resume


async def _start(t: Any, spec: PipelineSpec, text: str) -> str:
    """Start a run, retrying while Redis is unreachable (a gateway would answer 503)."""
    import redis

    from workers.client import start_run

    while True:
        try:
            return await start_run(t, spec, text)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            await asyncio.sleep(0.2)


async def _soak(cfg: SoakConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from orchestrator.routing import stage_group, stage_streams
    from workers.redis_transport import RedisTransport
    from workers.runner import dead_letter_stream

    spec = soak_spec(cfg.time_scale)
    rng = random.Random(cfg.seed)
    workdir = Path(tempfile.mkdtemp(prefix="alto-soak-"))
    spec_file = workdir / "soak.yaml"
    raw = spec.model_dump(mode="json", exclude_defaults=True)
    raw["name"] = spec.name
    spec_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    server = AofRedis(prefix="alto-soak-redis-")
    server.start()
    env = {"ALTO_CLAIM_IDLE_MS": str(cfg.claim_idle_ms), "ALTO_LEASE_TTL_MS": str(cfg.lease_ttl_ms),
           "ALTO_HEARTBEAT_MS": str(cfg.heartbeat_ms)}
    workers = WorkerProcs(server.url, spec_file, env)
    t = RedisTransport(server.url, max_connections=1024)
    outcomes: list[Outcome] = []
    faults: list[str] = []
    texts_iter = iter(inputs(100_000, cfg.seed))
    began = time.monotonic()
    try:
        for stage in spec.by_name:
            workers.start(stage, cfg.workers_per_stage)
        while True:  # until every worker has registered
            groups = [await t.members(stage_group(spec.name, s)) for s in spec.by_name]
            if all(len(g) >= cfg.workers_per_stage for g in groups):
                break
            await asyncio.sleep(0.1)

        # 1. capacity: closed loop, `probe_clients` runs always in flight
        log(f"probing capacity for {cfg.probe_s:.0f} s with {cfg.probe_clients} clients")
        probe_end = time.monotonic() + cfg.probe_s
        probe_done = 0
        followers: list[asyncio.Task[None]] = []

        async def client() -> None:
            nonlocal probe_done
            while time.monotonic() < probe_end:
                o = Outcome(await _start(t, spec, next(texts_iter)), "", "probe", time.monotonic())
                await _follow(t, spec, o, cfg.run_deadline_s)
                probe_done += o.status == "result"

        await asyncio.gather(*(client() for _ in range(cfg.probe_clients)))
        capacity = probe_done / cfg.probe_s
        rate = cfg.load * capacity
        log(f"capacity {capacity:.1f} runs/s; offering {rate:.1f} runs/s")

        # 2. open loop at `rate`: a fault-free phase, then a faulty one
        async def chaos() -> None:
            stages = list(spec.by_name)
            kills = int(cfg.duration_s // cfg.kill_every_s)
            restart_at = kills // 2 if cfg.redis_restart else -1
            for k in range(kills):
                await asyncio.sleep(cfg.kill_every_s)
                if k == restart_at:
                    faults.append(f"{time.monotonic() - began:.1f}s redis restart")
                    await asyncio.to_thread(server.restart)
                    continue
                stage, i = rng.choice(stages), rng.randrange(cfg.workers_per_stage)
                faults.append(f"{time.monotonic() - began:.1f}s kill {stage}[{i}]")
                await asyncio.to_thread(workers.kill, stage, i)

        for phase in ("fault-free", "faults"):
            log(f"phase {phase}: {cfg.duration_s:.0f} s")
            chaos_task = asyncio.create_task(chaos()) if phase == "faults" else None
            phase_end = time.monotonic() + cfg.duration_s
            next_at = time.monotonic()
            while next_at < phase_end:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                text = next(texts_iter)
                o = Outcome(await _start(t, spec, text), text, phase, time.monotonic())
                outcomes.append(o)
                followers.append(asyncio.create_task(_follow(t, spec, o, cfg.run_deadline_s)))
                next_at += rng.expovariate(rate)
            if chaos_task is not None:
                await chaos_task
        log(f"draining {len(followers)} runs")
        await asyncio.gather(*followers)

        # 3. what is left behind, and the raw event logs (for duplicate checks)
        left = 0
        left_by_stream: dict[str, dict[str, int]] = {}
        for _ in range(100):  # stragglers may still be acknowledging for a moment
            left_by_stream = {}
            for s in spec.by_name:
                for name in stage_streams(spec, s):
                    st = await t.stats(name, stage_group(spec.name, s))
                    if st.pending or st.lag:
                        left_by_stream[name] = {"pending": st.pending, "lag": st.lag,
                                                "length": st.length}
            left = sum(v["pending"] + v["lag"] for v in left_by_stream.values())
            if not left:
                break
            await asyncio.sleep(0.1)
        dead = int(await t._r.xlen(t._stream_key(dead_letter_stream(spec.name))))
        for o in outcomes:
            o.raw = [ev for _, ev in await t.read_events(o.run, None, 100_000, 0)]
    finally:
        workers.stop(timeout_s=15)
        await t.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    # 4. the oracle and the verdict
    oracle_spec = soak_spec(0.0)
    expected = await fault_free_units(oracle_spec, [o.text for o in outcomes])
    lost = dup = conflicting = redelivered = 0
    for o in outcomes:
        want = Counter(json.dumps(u, sort_keys=True) for u in expected[o.text])
        if o.status == "result":
            got = Counter(json.dumps(u, sort_keys=True) for u in o.units or [])
            lost += sum((want - got).values())
            dup += sum((got - want).values())
        elif o.status == "hung":
            lost += sum(want.values())
        seen: dict[str, set[str]] = defaultdict(set)
        for ev in o.raw:
            if ev.get("mid") is None or ev.get("type") not in ("credit", "partial"):
                continue
            body = json.dumps({k: ev.get(k) for k in ("stage", "credit", "data", "lineage")},
                              sort_keys=True)
            redelivered += bool(seen[ev["mid"]])
            seen[ev["mid"]].add(body)
        conflicting += sum(len(b) > 1 for b in seen.values())
    by_phase: dict[str, dict[str, Any]] = {}
    for phase in ("fault-free", "faults"):
        os_ = [o for o in outcomes if o.phase == phase]
        lat = [o.ended - o.started for o in os_ if o.status == "result" and o.ended]
        by_phase[phase] = {
            "runs": len(os_),
            "completed": sum(o.status == "result" for o in os_),
            "errored": sum(o.status == "error" for o in os_),
            "hung": sum(o.status == "hung" for o in os_),
            "latency_s": summary(lat),
        }
    reasons = Counter(o.reason for o in outcomes if o.status == "error")
    return {
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "capacity_runs_per_s": capacity,
        "offered_runs_per_s": rate,
        "faults": faults,
        "phases": by_phase,
        "runs": len(outcomes),
        "completed": sum(o.status == "result" for o in outcomes),
        "errored": sum(o.status == "error" for o in outcomes),
        "error_reasons": dict(reasons),
        "hung": sum(o.status == "hung" for o in outcomes),
        "units_expected": sum(len(expected[o.text]) for o in outcomes),
        "units_lost": lost,
        "duplicate_units": dup,
        "conflicting_duplicate_events": conflicting,
        "harmless_redelivered_events": redelivered,
        "unacknowledged_after_drain": left,
        "unacknowledged_by_stream": left_by_stream,
        "dead_letters": dead,
        "wall_s": time.monotonic() - began,
    }


def markdown(r: dict[str, Any], cfg: SoakConfig) -> str:
    ff, fa = r["phases"]["fault-free"], r["phases"]["faults"]
    ok = (r["units_lost"] == 0 and r["duplicate_units"] == 0
          and r["conflicting_duplicate_events"] == 0 and r["hung"] == 0)
    m = r["machine"]
    reasons = "; ".join(f"{n}× {why}" for why, n in r["error_reasons"].items()) or "none"
    kills = sum("kill" in f for f in r["faults"])
    restarts = sum("redis" in f for f in r["faults"])
    lines = [
        f"Measured {m['date']} on {m['cpus']} CPU cores (shared with other work); Redis "
        f"{m['redis']} with AOF, fsync always; {cfg.workers_per_stage} `alto worker` "
        f"processes per stage; pipeline: sim LM stage (sentences, time_scale "
        f"{cfg.time_scale}) → word fan-out tool → per-sentence aggregation (4 partitions) → "
        f"per-request aggregation (2 partitions). Capacity measured closed-loop "
        f"({cfg.probe_clients} clients, {cfg.probe_s:.0f} s): "
        f"**{r['capacity_runs_per_s']:.1f} runs/s**; offered Poisson load "
        f"{r['offered_runs_per_s']:.1f} runs/s ({cfg.load:.0%}) for {cfg.duration_s:.0f} s "
        f"without faults, then {cfg.duration_s:.0f} s with a worker SIGKILLed (and restarted) "
        f"every {cfg.kill_every_s:.0f} s ({kills} kills) and {restarts} Redis restart(s). "
        f"Results are checked against a fault-free embedded run of the same inputs.",
        "",
        "| | fault-free phase | faulty phase |",
        "| --- | --- | --- |",
        f"| runs started | {ff['runs']} | {fa['runs']} |",
        f"| completed | {ff['completed']} | {fa['completed']} |",
        f"| errored | {ff['errored']} | {fa['errored']} |",
        f"| hung (no end by the {cfg.run_deadline_s:.0f} s deadline) | {ff['hung']} | "
        f"{fa['hung']} |",
        f"| latency p50 (s) | {fnum(ff['latency_s']['p50'])} | {fnum(fa['latency_s']['p50'])} |",
        f"| latency p99 (s) | {fnum(ff['latency_s']['p99'])} | {fnum(fa['latency_s']['p99'])} |",
        "",
        f"Totals: **{r['completed']} completed, {r['errored']} errored** (reasons: {reasons}), "
        f"{r['hung']} hung; **units lost: {r['units_lost']}** of {r['units_expected']} "
        f"expected; **duplicates: {r['duplicate_units']}** output units, "
        f"{r['conflicting_duplicate_events']} conflicting events "
        f"({r['harmless_redelivered_events']} harmless redelivered events were dropped by "
        f"message id); entries left unacknowledged after the drain: "
        f"{r['unacknowledged_after_drain']}; dead letters: {r['dead_letters']}. "
        f"Verdict: **{'pass' if ok else 'FAIL'}**.",
        "",
        "Fault schedule: " + "; ".join(r["faults"]) + ".",
        "",
        f"Files: `bench/results/{cfg.tag}.json`.",
        "",
        f"Reproduce: `.venv/bin/alto bench soak --duration {cfg.duration_s:g} "
        f"--probe {cfg.probe_s:g} --kill-every {cfg.kill_every_s:g} --load {cfg.load:g}`",
    ]
    return "\n".join(lines)


def main(cfg: SoakConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    r = asyncio.run(_soak(cfg, log))
    files = [str(write_json(cfg.out_dir / f"{cfg.tag}.json", r))]
    if cfg.markdown is not None:
        update_markdown(cfg.markdown, cfg.tag, markdown(r, cfg), title=TITLE)
        files.append(str(cfg.markdown))
    r["files"] = files
    return r


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(SoakConfig())
