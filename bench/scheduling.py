"""Prompt-aware scheduling benchmark: every policy on identical open-loop arrivals.

What it measures: a one-stage `lm` pipeline (prompt = a class prefix + a per-request
suffix) served by 4 `sim` engine instances through the real runtime (runners, router,
embedded transport; optionally once over Redis). For each workload, policy and arrival
rate it reports throughput, p50/p99 latency, the engines' prefix-cache hit rate and the
load imbalance (max/mean of the instances' time-averaged requests in service), and per
policy the throughput at a p99 latency SLO.

Why these numbers (see BENCHMARKS.md for the table):
* Each class prefix is a shared system prompt (256 tokens, common to all classes) plus a
  few-shot block, 1-4k tokens in all: the size of real few-shot prompts. Suffixes are
  48-96 tokens. Output lengths differ per class (mean 16-256 tokens, log-uniform, with
  fixed / uniform / geometric shapes).
* Popularity is Zipf(s=1.0) over K classes (K = 4, 16, 64); plus a uniform workload of
  one class (where placement cannot help and must not hurt).
* The engine is the calibrated sim (Llama-3.1-8B on an H100), max batch 32. Its prefix
  cache is scaled down to 1024 blocks of 16 tokens (16k tokens) per instance: with the
  calibrated 52 GiB every prefix of every workload here would fit on every instance and
  placement could not matter. 16k tokens holds about 6 average class prefixes: all of
  K=4, a quarter of K=16 (one instance's share of the classes) but not all of them, and
  far from all of K=64. That is the regime placement is for (prompt diversity x length
  beyond one instance's cache), stated rather than hidden.
* Time runs at `time_scale` x real time (1.0 = real time: a sim step that takes 8 ms
  sleeps 8 ms); latencies are reported in simulated seconds. The harness shares one
  CPU with the engines: the per-run CPU share is reported to show it was not saturated.

Run: `.venv/bin/python -m bench.scheduling` (about 8-10 minutes on 2 cores);
`--quick` for a smoke run; `--redis` to add one cross-check over Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import machine, percentile, write_json
from orchestrator.embedded import EmbeddedTransport
from orchestrator.scheduling import (
    CACHE_AWARE,
    LEAST_LOADED,
    POLICIES,
    PROMPT_AWARE,
    SchedOptions,
)
from orchestrator.spec import PipelineSpec, parse_pipeline
from orchestrator.transport import Transport
from workers.client import start_run
from workers.router import PolicyRouter, Router, entry_router
from workers.runner import RunnerConfig
from workers.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- scheduling:begin -->", "<!-- scheduling:end -->"

_OUT = re.compile(r"\[out=(\d+)\]")


def respond(prompt: str, params: Any) -> str:
    """The sim responder: exactly the output length the request asks for (one token per
    ' w'), so output-length distributions are the workload's, not the sim's."""
    m = _OUT.search(prompt)
    n = int(m.group(1)) if m else 16
    return " w" * n


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    instances: int = 4
    capacity: int = 32  # max batch (vLLM max-num-seqs); the runner takes no more
    cache_blocks: int = 1024  # 16k tokens of prefix cache per instance (see module doc)
    block_size: int = 16
    time_scale: float = 1.0


@dataclass(frozen=True)
class Workload:
    name: str
    classes: int
    zipf_s: float
    rates: tuple[float, ...]  # offered requests per simulated second
    preamble_tokens: int = 256  # system prompt shared by every class
    prefix_tokens: tuple[int, int] = (1024, 4096)  # whole class prefix, preamble included
    suffix_tokens: tuple[int, int] = (48, 96)
    out_mean: tuple[float, float] = (16.0, 256.0)
    seed: int = 7


@dataclass(frozen=True)
class RunConfig:
    """A staircase of rates on one long-lived runtime per (workload, policy): a service
    whose load changes, caches, statistics and plans carried over from step to step."""

    first_warmup_s: float = 5.0  # unmeasured arrivals before the first step
    warmup_s: float = 2.0  # unmeasured arrivals at the start of every later step
    # measured window of arrivals per step: at 50 req/s, 8 s is 400 requests, so the p99
    # is the 4th-worst latency rather than (at 4 s) the 2nd-worst, half as noisy
    measure_s: float = 8.0
    tail_s: float = 2.0  # a measured request not done SLO + this after its window is lost
    slo_factor: float = 2.0  # SLO = this x the p99 latency of an ideal, uncontended service
    stop_after: int = 2  # stop a staircase after this many SLO misses in a row
    heartbeat_ms: int = 250  # runner heartbeat = router refresh cadence (all policies)
    gateway_refresh_ms: int = 50  # producer-side refresh of loads (directed policies)
    # repetitions of every staircase; repetition k draws its own arrivals (seed k), the
    # same for every policy, so the spread shows both machine noise and the luck of one
    # arrival sequence (a rare class's burst), which one run cannot tell apart
    reps: int = 1


@dataclass
class ClassDef:
    index: int
    prefix: str
    prefix_tokens: int
    popularity: float
    out_kind: str
    out_mean: float


@dataclass
class Request:
    t: float  # arrival, simulated seconds from the start
    cls: int
    out_tokens: int
    text: str
    measured: bool
    step: int = 0


@dataclass
class RunResult:
    workload: str
    policy: str
    rate: float
    transport: str
    requests: int
    measured: int
    completed: int
    throughput: float
    p50_s: float
    p90_s: float
    p99_s: float
    mean_s: float
    prefix_hit_rate: float
    imbalance: float
    stolen: int
    replans: int
    cpu_share: float
    wall_s: float
    duplicates: int
    slo_s: float = math.nan
    rep: int = 0  # repetition (its arrival seed); absent in older results files: 0
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# workload
# ------------------------------------------------------------------------------------------


def _words(rng: random.Random, tag: str, n: int) -> str:
    return " ".join(f"{tag}{rng.randrange(100_000)}" for _ in range(n))


def make_classes(w: Workload) -> list[ClassDef]:
    rng = random.Random(w.seed * 1_000_003 + w.classes)
    preamble = "System: " + _words(random.Random(w.seed), "sys", w.preamble_tokens - 1)
    weights = [1.0 / (r + 1) ** w.zipf_s for r in range(w.classes)]
    total = sum(weights)
    ranks = list(range(w.classes))
    rng.shuffle(ranks)  # popularity independent of prefix length and output length
    kinds = ("fixed", "uniform", "geometric")
    out: list[ClassDef] = []
    lo, hi = w.out_mean
    # output means on a geometric ladder from lo to hi (shuffled against popularity), so
    # every K spans the same range of output lengths
    ladder = [
        math.sqrt(lo * hi) if w.classes == 1 else lo * (hi / lo) ** (c / (w.classes - 1))
        for c in range(w.classes)
    ]
    rng.shuffle(ladder)
    for c in range(w.classes):
        n = rng.randint(*w.prefix_tokens)
        body = _words(rng, f"k{c}x", max(1, n - w.preamble_tokens))
        mean = ladder[c]
        out.append(
            ClassDef(
                index=c,
                prefix=f"{preamble}\nExamples:\n{body}",
                prefix_tokens=n,
                popularity=weights[ranks[c]] / total,
                out_kind=kinds[rng.randrange(len(kinds))],
                out_mean=mean,
            )
        )
    return out


def _out_tokens(rng: random.Random, c: ClassDef) -> int:
    if c.out_kind == "fixed":
        n = c.out_mean
    elif c.out_kind == "uniform":
        n = rng.uniform(0.5, 1.5) * c.out_mean
    else:
        n = rng.expovariate(1.0 / c.out_mean)
    return max(1, min(1024, round(n)))


def arrivals(
    w: Workload, classes: list[ClassDef], rate: float, start: float, warm: float, measure: float,
    step: int, first_id: int, rep: int = 0,
) -> list[Request]:
    """Poisson arrivals of one step; the same (workload, step, rate, rep) always gives the
    same list, so every policy sees identical requests at identical times. Repetition 0
    keeps the seed string of single-run results (comparable with them); repetition k > 0
    draws another sequence of the same classes."""
    seed = f"{w.name}|{w.seed}|{step}|{rate}" + (f"|rep{rep}" if rep else "")
    rng = random.Random(seed)
    cum: list[float] = []
    acc = 0.0
    for c in classes:
        acc += c.popularity
        cum.append(acc)
    out: list[Request] = []
    t = 0.0
    i = first_id
    while True:
        t += rng.expovariate(rate)
        if t >= warm + measure:
            break
        x = rng.random() * acc
        ci = next(j for j, v in enumerate(cum) if v >= x)
        c = classes[ci]
        n_out = _out_tokens(rng, c)
        suffix = _words(rng, "u", rng.randint(*w.suffix_tokens))
        text = f"{c.prefix}\n\nRequest {i} [out={n_out}]: {suffix}"
        out.append(Request(start + t, ci, n_out, text, measured=t >= warm, step=step))
        i += 1
    return out


def slo_for(w: Workload, classes: list[ClassDef], engine: EngineConfig, factor: float) -> float:
    """The workload's p99 latency SLO: `factor` x the p99 of what an ideal service would
    take (each request alone in a full batch: output tokens x one full-batch decode
    step, prefix cached). Output lengths differ 16x between classes, so one SLO for
    every workload would be either meaningless for short outputs or unreachable for
    long ones; this one is "at most twice the uncontended latency" for each."""
    from workers.engines.sim import CALIBRATION

    step_s = (CALIBRATION.decode_base_ms + engine.capacity * CALIBRATION.decode_per_seq_ms) / 1000
    rng = random.Random(f"slo|{w.name}|{w.seed}")
    weights = [c.popularity for c in classes]
    outs = [_out_tokens(rng, c) for c in rng.choices(classes, weights, k=20_000)]
    prefill_s = (w.suffix_tokens[1] + engine.block_size) * CALIBRATION.prefill_ms_per_token / 1000
    return factor * (percentile([n * step_s for n in outs], 99) + prefill_s)


def ideal_throughput(w: Workload, classes: list[ClassDef], engine: EngineConfig) -> float:
    """Requests/s the instances could serve at best: every batch full, every prefix hit
    (only the part of a prompt after its class prefix's last full block is prefilled),
    perfect balance. No policy can beat it; the throughput at the SLO is below it by the
    queueing a p99 bound leaves room for."""
    from workers.engines.sim import CALIBRATION
    from workers.engines.tokens import count_tokens

    step_ms = CALIBRATION.decode_base_ms + engine.capacity * CALIBRATION.decode_per_seq_ms
    rng = random.Random(f"ideal|{w.name}|{w.seed}")
    reqs = arrivals(w, classes, 50.0, 0.0, 0.0, 40.0, -1, 0)
    rng.shuffle(reqs)
    cost_ms = 0.0
    for r in reqs[:1000]:
        c = classes[r.cls]
        cached = count_tokens(c.prefix) // engine.block_size * engine.block_size
        cost_ms += (r.out_tokens * step_ms / engine.capacity
                    + (count_tokens(r.text) - cached) * CALIBRATION.prefill_ms_per_token)
    return engine.instances * 1000.0 / (cost_ms / min(1000, len(reqs)))


def pipeline(engine: EngineConfig) -> PipelineSpec:
    return parse_pipeline(
        {
            "name": "schedbench",
            "engines": {
                "default": {
                    "kind": "sim",
                    "instances": engine.instances,
                    "capacity": engine.capacity,
                    "cache_blocks": engine.cache_blocks,
                    "block_size": engine.block_size,
                    "time_scale": engine.time_scale,
                    "min_tokens": 1,
                }
            },
            "stages": [
                {
                    "name": "lm",
                    "kind": "lm",
                    "prompt": "{input}",
                    "framing": "whole",
                    "max_tokens": 1024,
                    "concurrency": engine.capacity,
                    "responder": "bench.scheduling:respond",
                }
            ],
        }
    )


def sched_options(engine: EngineConfig, classes: list[ClassDef]) -> SchedOptions:
    """Defaults, except the cache-aware tree is sized like the engines' cache (in
    characters: cache tokens x the workload's characters per token) and evicted every
    2 s: SGLang's 10k-character default would forget a single 4k-token prompt, and its
    30 s interval is longer than a run, so both are set in the baseline's favour."""
    chars_per_token = sum(len(c.prefix) for c in classes) / sum(c.prefix_tokens for c in classes)
    tree = int(engine.cache_blocks * engine.block_size * chars_per_token)
    return SchedOptions(max_tree_chars=tree, eviction_interval_s=2.0 * engine.time_scale)


# ------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------


async def _publish(transport: Transport, spec: PipelineSpec, router: Router, text: str) -> str:
    """Start a run through `router` (the producer-side placement for the entry stage)."""
    return await start_run(transport, spec, text, router=router)


async def run_staircase(
    workload: Workload,
    classes: list[ClassDef],
    policy: str,
    rates: Sequence[float],
    engine: EngineConfig,
    run: RunConfig,
    *,
    slo: float,
    redis_url: str | None = None,
    log: Any = print,
    rep: int = 0,
) -> list[RunResult]:
    """One runtime serving the rates in turn; one RunResult per step that ran."""
    spec = pipeline(engine)
    opts = sched_options(engine, classes)
    ts = engine.time_scale
    steps: list[list[Request]] = []
    start = 0.0
    for k, rate in enumerate(rates):
        warm = run.first_warmup_s if k == 0 else run.warmup_s
        first = sum(len(x) for x in steps)
        steps.append(
            arrivals(workload, classes, rate, start, warm, run.measure_s, k, first, rep)
        )
        start += warm + run.measure_s
    reqs = [r for step in steps for r in step]
    index = {r.text: i for i, r in enumerate(reqs)}
    transport: Transport
    if redis_url is None:
        transport = EmbeddedTransport()
    else:
        from workers.redis_transport import RedisTransport

        transport = RedisTransport(redis_url, prefix=f"sb{uuid.uuid4().hex[:8]}:")
    loop = asyncio.get_running_loop()
    done_at: dict[int, float] = {}
    calls: dict[int, dict[str, Any]] = {}
    duplicates = 0
    left = [{i for i, r in enumerate(reqs) if r.step == k and r.measured} for k in range(len(steps))]
    measured = [set(x) for x in left]
    step_done = [asyncio.Event() for _ in steps]

    def observer(kind: str, data: dict[str, Any]) -> None:
        nonlocal duplicates
        if kind != "call":
            return
        i = index.get(str(data.get("prompt")))
        if i is None:
            return
        if i in done_at:
            duplicates += 1
            return
        done_at[i] = loop.time()
        calls[i] = data
        k = reqs[i].step
        if i in left[k]:
            left[k].discard(i)
            if not left[k]:
                step_done[k].set()

    runtime = Runtime(
        transport,
        [spec],
        config=RunnerConfig(heartbeat_ms=run.heartbeat_ms),
        observer=observer,
        policy=policy,
        sched_options=opts,
    )
    load_start = os.getloadavg()[0]
    await runtime.start()
    gateway = entry_router(spec, policy, opts)
    stop = asyncio.Event()
    halt = asyncio.Event()  # stop publishing (the staircase is past saturation)

    def routers() -> list[dict[str, Any]]:
        return [
            snap for r in runtime.runners
            if isinstance(r.router, PolicyRouter) and (snap := r.router.snapshot()) is not None
        ]

    async def refresher() -> None:
        if not isinstance(gateway, PolicyRouter):
            return
        while not stop.is_set():
            await gateway.refresh_targets(transport)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), run.gateway_refresh_ms / 1000 * ts)

    # time, inflight per instance, stolen, replans, event-loop lag (s): the harness shares
    # the CPU with everything else on the machine, and a late loop stretches every
    # simulated step, so each step reports how late its timers fired
    samples: list[tuple[float, list[int], int, int, float]] = []

    async def sampler() -> None:
        lag = 0.0
        while not stop.is_set():
            snaps = routers()
            samples.append((
                loop.time(),
                [r.inflight for r in runtime.runners],
                sum(int(x["stolen"]) for x in snaps),
                max((int(x["replans"]) for x in snaps), default=0),
                lag,
            ))
            before = loop.time()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05 * ts)
            lag = max(0.0, loop.time() - before - 0.05 * ts)

    refresh_task = asyncio.create_task(refresher())
    await asyncio.sleep(0.1)  # let runners create their groups and slots
    t0 = loop.time()
    sample_task = asyncio.create_task(sampler())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    published = [False] * len(steps)

    async def publisher() -> None:
        for k, step in enumerate(steps):
            if halt.is_set():
                return
            published[k] = True
            for r in step:
                delay = t0 + r.t * ts - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await _publish(transport, spec, gateway, r.text)

    pub_task = asyncio.create_task(publisher())
    results: list[RunResult] = []
    misses = 0
    for k, step in enumerate(steps):
        while not published[k] and not pub_task.done():
            await asyncio.sleep(0.05 * ts)
        if not published[k]:
            break
        win0 = step[0].t if step else 0.0
        mstart = min((r.t for r in step if r.measured), default=win0)
        mend = mstart + run.measure_s
        deadline = t0 + (mend + slo + run.tail_s) * ts
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(step_done[k].wait(), max(0.0, deadline - loop.time()))
        r = _step_result(workload, policy, rates[k], redis_url, step, reqs, measured[k], done_at,
                         calls, samples, t0, mstart, mend, ts, run)
        r.slo_s = slo
        r.rep = rep
        results.append(r)
        ok = r.p99_s <= slo and r.completed == r.measured
        log(
            f"{workload.name:10s} r{rep} {policy:13s} {r.transport[:5]} rate {rates[k]:6.1f}  "
            f"thr {r.throughput:6.1f}  p50 {r.p50_s:6.2f}  p99 {r.p99_s:7.2f}  "
            f"hit {r.prefix_hit_rate:5.3f}  imb {r.imbalance:5.2f}  stolen {r.stolen:4d}  "
            f"replans {r.replans:2d}  lag {r.extra['loop_lag_ms_mean']:4.1f} ms  "
            f"{'ok' if ok else f'SLO ({slo:.1f} s) miss'}"
        )
        misses = 0 if ok else misses + 1
        if misses >= run.stop_after:
            halt.set()
            break
    halt.set()
    await pub_task
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    load1 = os.getloadavg()[0]  # other processes on the machine skew every timing here
    for r in results:
        r.cpu_share = cpu / wall if wall > 0 else math.nan
        r.duplicates = duplicates
        r.extra["loadavg_1m_end"] = load1
        r.extra["loadavg_1m_start"] = load_start
    stop.set()
    await asyncio.gather(refresh_task, sample_task, return_exceptions=True)
    await runtime.stop(drain=False)
    await transport.close()
    return results


def _step_result(
    workload: Workload, policy: str, rate: float, redis_url: str | None, step: list[Request],
    reqs: list[Request], measured: set[int], done_at: dict[int, float],
    calls: dict[int, dict[str, Any]], samples: list[tuple[float, list[int], int, int, float]],
    t0: float, mstart: float, mend: float, ts: float, run: RunConfig,
) -> RunResult:
    lat: list[float] = []
    prompt = cached = 0
    for i in measured:
        if i in done_at:
            lat.append((done_at[i] - (t0 + reqs[i].t * ts)) / ts)
            prompt += int(calls[i].get("prompt_tokens") or 0)
            cached += int(calls[i].get("cached_tokens") or 0)
        else:
            lat.append(math.inf)
    a, b = t0 + mstart * ts, t0 + mend * ts
    window = [x for x in samples if a <= x[0] <= b]
    per_instance = (
        [sum(col) / len(window) for col in zip(*(x[1] for x in window), strict=True)]
        if window else []
    )
    mean_load = sum(per_instance) / len(per_instance) if per_instance else 0.0
    finite = [x for x in lat if math.isfinite(x)]
    completed = len(finite)
    return RunResult(
        workload=workload.name,
        policy=policy,
        rate=rate,
        transport="redis" if redis_url else "embedded",
        requests=len(step),
        measured=len(measured),
        completed=completed,
        throughput=completed / run.measure_s,
        p50_s=percentile(lat, 50),
        p90_s=percentile(lat, 90),
        p99_s=percentile(lat, 99),
        mean_s=sum(finite) / len(finite) if finite else math.nan,
        prefix_hit_rate=cached / prompt if prompt else 0.0,
        imbalance=max(per_instance) / mean_load if mean_load > 0 else math.nan,
        stolen=(window[-1][2] - window[0][2]) if window else 0,
        replans=(window[-1][3] - window[0][3]) if window else 0,
        cpu_share=math.nan,
        wall_s=run.measure_s * ts,
        duplicates=0,
        extra={
            "per_instance_load": per_instance,
            "loop_lag_ms_mean": 1000 * sum(x[4] for x in window) / len(window) if window else 0,
            "loop_lag_ms_p95": 1000 * percentile([x[4] for x in window], 95) if window else 0,
        },
    )


# ------------------------------------------------------------------------------------------
# sweeps and summaries
# ------------------------------------------------------------------------------------------


def slo_throughput(rows: Sequence[RunResult], slo: float) -> tuple[float, float]:
    """(best measured throughput among rates meeting the SLO, the SLO-crossing rate
    interpolated linearly in p99 between the last passing and first failing rate)."""
    rows = sorted(rows, key=lambda r: r.rate)
    best = 0.0
    interp = 0.0
    for k, r in enumerate(rows):
        if r.p99_s <= slo and r.completed == r.measured:
            best = max(best, r.throughput)
            interp = max(interp, r.rate)
            nxt = rows[k + 1] if k + 1 < len(rows) else None
            if nxt is not None and not (nxt.p99_s <= slo and nxt.completed == nxt.measured):
                hi = nxt.p99_s if math.isfinite(nxt.p99_s) else 10 * slo
                frac = (slo - r.p99_s) / (hi - r.p99_s) if hi > r.p99_s else 0.0
                interp = max(interp, r.rate + max(0.0, min(1.0, frac)) * (nxt.rate - r.rate))
        else:
            continue
    return best, interp


async def sweep(
    workloads: Sequence[Workload],
    policies: Sequence[str],
    engine: EngineConfig,
    run: RunConfig,
    *,
    log: Any = print,
) -> list[RunResult]:
    """Every (workload, repetition, policy) staircase. Repetitions are the middle loop so
    that each one runs its policies back to back: a slow spell of the shared machine then
    hits one repetition's policies alike, not one policy's repetitions."""
    results: list[RunResult] = []
    for w in workloads:
        classes = make_classes(w)
        slo = slo_for(w, classes, engine, run.slo_factor)
        for rep in range(max(1, run.reps)):
            for policy in policies:
                results += await run_staircase(
                    w, classes, policy, w.rates, engine, run, slo=slo, log=log, rep=rep
                )
    return results


def _ok(r: RunResult) -> bool:
    return r.p99_s <= r.slo_s and r.completed == r.measured


def summarize_rep(rows: Sequence[RunResult], w: Workload) -> dict[str, Any]:
    """One repetition of one workload: per policy its throughput at the SLO and the step
    at its highest passing rate; the verdict against the baselines of this repetition."""
    slo = rows[0].slo_s
    per: dict[str, Any] = {}
    for policy in sorted({r.policy for r in rows}, key=POLICIES.index):
        mine = [r for r in rows if r.policy == policy]
        best, interp = slo_throughput(mine, slo)
        passing = [r for r in mine if _ok(r)]
        at = max(passing, key=lambda r: r.rate) if passing else None
        per[policy] = {
            "throughput_at_slo": best,
            "rate_at_slo_interpolated": interp,
            "at_rate": at.rate if at else None,
            "p50_s": at.p50_s if at else None,
            "p99_s": at.p99_s if at else None,
            "prefix_hit_rate": at.prefix_hit_rate if at else None,
            "imbalance": at.imbalance if at else None,
        }
    verdict: dict[str, Any] = {}
    pa = per.get(PROMPT_AWARE)
    baselines = {p: v for p, v in per.items() if p != PROMPT_AWARE}
    if pa and baselines:
        best_base = max(baselines, key=lambda p: (baselines[p]["throughput_at_slo"],
                                                  baselines[p]["rate_at_slo_interpolated"]))
        b = baselines[best_base]["throughput_at_slo"]
        bi = baselines[best_base]["rate_at_slo_interpolated"]
        verdict["best_baseline"] = best_base
        verdict["speedup_vs_best_baseline"] = pa["throughput_at_slo"] / b if b else math.inf
        verdict["speedup_interpolated"] = pa["rate_at_slo_interpolated"] / bi if bi else math.inf
    if pa and LEAST_LOADED in per:
        ll = per[LEAST_LOADED]["throughput_at_slo"]
        verdict["vs_least_loaded"] = pa["throughput_at_slo"] / ll if ll else math.inf
    if pa and CACHE_AWARE in per:
        # hit rates compared at one rate: the highest both served within the SLO (else
        # the lowest rate, which both ran)
        by = {(r.policy, r.rate): r for r in rows}
        both = [x for x in w.rates if (PROMPT_AWARE, x) in by and (CACHE_AWARE, x) in by]
        passing = [x for x in both if _ok(by[(PROMPT_AWARE, x)]) and _ok(by[(CACHE_AWARE, x)])]
        x = max(passing) if passing else (min(both) if both else None)
        if x is not None:
            verdict["hit_rate_at"] = x
            verdict["hit_rate_prompt_aware"] = by[(PROMPT_AWARE, x)].prefix_hit_rate
            verdict["hit_rate_cache_aware"] = by[(CACHE_AWARE, x)].prefix_hit_rate
    return {"policies": per, "verdict": verdict}


@functools.lru_cache(maxsize=32)
def _ideal(w: Workload, engine: EngineConfig) -> float:
    """`ideal_throughput` of a workload's own classes, once per (workload, engine): it
    draws and tokenizes a thousand prompts, and every summary (and re-render) asks."""
    return ideal_throughput(w, make_classes(w), engine)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def summarize(
    results: Sequence[RunResult], workloads: Sequence[Workload], engine: EngineConfig | None = None
) -> dict[str, Any]:
    """Per workload, over its repetitions: per policy the median throughput at the SLO
    and its min-max, with the step details of the repetition nearest the median; the
    ratio prompt_aware / best baseline taken within each repetition (same arrivals, so
    the ratio cancels what the arrivals did to both), then its median and min-max.
    With one repetition every median is that repetition's number."""
    out: dict[str, Any] = {}
    for w in workloads:
        rows = [r for r in results if r.workload == w.name and r.transport == "embedded"]
        if not rows:
            continue
        reps = sorted({r.rep for r in rows})
        each = [summarize_rep([r for r in rows if r.rep == k], w) for k in reps]
        per: dict[str, Any] = {}
        for policy in sorted({r.policy for r in rows}, key=POLICIES.index):
            got = [(k, e["policies"][policy]) for k, e in zip(reps, each, strict=True)
                   if policy in e["policies"]]
            thr = [v["throughput_at_slo"] for _, v in got]
            med = _median(thr)
            k_mid, mid = min(got, key=lambda kv: abs(kv[1]["throughput_at_slo"] - med))
            per[policy] = {
                **mid,
                "throughput_at_slo": med,
                "rate_at_slo_interpolated": _median(
                    [v["rate_at_slo_interpolated"] for _, v in got]),
                "throughput_at_slo_min": min(thr),
                "throughput_at_slo_max": max(thr),
                "throughput_at_slo_reps": thr,
                "details_rep": k_mid,
            }
        verdict: dict[str, Any] = {
            "slo_s": rows[0].slo_s,
            "ideal_throughput": _ideal(w, engine or EngineConfig()),
            "reps": len(reps),
        }
        vs = [e["verdict"] for e in each]
        sp = [v["speedup_vs_best_baseline"] for v in vs if "speedup_vs_best_baseline" in v]
        if sp:
            baselines = {p: v for p, v in per.items() if p != PROMPT_AWARE}
            best_base = max(baselines, key=lambda p: (baselines[p]["throughput_at_slo"],
                                                      baselines[p]["rate_at_slo_interpolated"]))
            verdict["best_baseline"] = best_base  # by median throughput
            verdict["best_baseline_per_rep"] = [v["best_baseline"] for v in vs
                                                if "best_baseline" in v]
            verdict["speedup_vs_best_baseline"] = _median(sp)
            verdict["speedup_min"], verdict["speedup_max"] = min(sp), max(sp)
            verdict["speedup_per_rep"] = sp
            verdict["speedup_interpolated"] = _median(
                [v["speedup_interpolated"] for v in vs if "speedup_interpolated" in v])
            # how close 1.3x the best baseline is to what no policy can exceed
            verdict["target_vs_ideal"] = (1.3 * baselines[best_base]["throughput_at_slo"]
                                          / verdict["ideal_throughput"])
        ll = [v["vs_least_loaded"] for v in vs if "vs_least_loaded" in v]
        if ll:
            verdict["vs_least_loaded"] = _median(ll)
        hits = [v for v in vs if "hit_rate_at" in v]
        if hits:
            verdict["hit_rate_at"] = statistics.median_low([v["hit_rate_at"] for v in hits])
            for key in ("hit_rate_prompt_aware", "hit_rate_cache_aware"):
                verdict[key] = _median([v[key] for v in hits])
        out[w.name] = {"policies": per, "verdict": verdict}
    return out


# ------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------


def plot(results: Sequence[RunResult], workloads: Sequence[Workload], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [w for w in workloads if any(r.workload == w.name for r in results)]
    fig, axes = plt.subplots(2, len(shown), figsize=(4.2 * len(shown), 7.5), squeeze=False)
    for k, w in enumerate(shown):
        ax, ax2 = axes[0][k], axes[1][k]
        slo = next(r.slo_s for r in results if r.workload == w.name)
        for n, policy in enumerate(POLICIES):
            mine = [r for r in results
                    if r.workload == w.name and r.policy == policy and r.transport == "embedded"]
            for rep in sorted({r.rep for r in mine}):  # one line per repetition
                rows = sorted((r for r in mine if r.rep == rep), key=lambda r: r.rate)
                style: dict[str, Any] = {"marker": "o", "color": f"C{n}",
                                         "alpha": 1.0 if rep == 0 else 0.45,
                                         "label": policy if rep == 0 else None}
                ax.plot([r.rate for r in rows], [min(r.p99_s, 10 * slo) for r in rows], **style)
                ax2.plot([r.rate for r in rows], [r.prefix_hit_rate for r in rows], **style)
        ax.axhline(slo, color="grey", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{w.name} (SLO {slo:.1f} s)")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("p99 latency (s, simulated)")
        ax2.set_xlabel("offered rate (req/s)")
        ax2.set_ylabel("prefix-cache hit rate")
        ax2.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("**met**" if ok else "**not met**")


def markdown(
    summary: dict[str, Any],
    results: Sequence[RunResult],
    workloads: Sequence[Workload],
    engine: EngineConfig,
    run: RunConfig,
    redis_rows: Sequence[RunResult],
    info: dict[str, Any],
    elapsed_s: float,
) -> str:
    shown = [w for w in workloads if w.name in summary]
    nrep = len({r.rep for r in results}) or 1
    cpu = max((r.cpu_share for r in results), default=math.nan)
    loads = [float(r.extra.get(k, math.nan)) for r in results
             for k in ("loadavg_1m_start", "loadavg_1m_end")]
    loads = [x for x in loads if math.isfinite(x)]
    lines = [
        "## Prompt-aware scheduling (`bench/scheduling.py`)",
        "",
        f"One `lm` stage served by {engine.instances} sim instances (calibrated "
        f"Llama-3.1-8B/H100 timing; max batch {engine.capacity}; prefix cache "
        f"{engine.cache_blocks} blocks x {engine.block_size} tokens = "
        f"{engine.cache_blocks * engine.block_size} tokens per instance), through the real "
        f"runtime (runners, routers, embedded transport), time_scale {engine.time_scale:g} "
        f"(latencies in simulated seconds). Prompts: a 256-token system prompt shared by all "
        f"classes + a per-class few-shot block (1-4k tokens in all) + a 48-96-token suffix; "
        f"per-class output means on a 16-256-token ladder (fixed, uniform or geometric "
        f"lengths); Zipf(1.0) class popularity; Poisson arrivals, identical for every "
        f"policy. Each (workload, policy) is one runtime serving a staircase of rates "
        f"({run.first_warmup_s:g} s warm-up, then per rate {run.warmup_s:g} s unmeasured + "
        f"{run.measure_s:g} s measured), stopped after {run.stop_after} SLO misses in a row; "
        + (f"every staircase ran {nrep} times (repetition k: its own Poisson arrival seed, "
           f"identical for every policy within it). " if nrep > 1 else
           "one repetition (one arrival sequence). ")
        + f"SLO: p99 <= {run.slo_factor:g}x the p99 of an ideal uncontended service (each "
        f"request alone in a full batch), with every measured request done. Throughput at SLO "
        f"= highest measured throughput among the rates meeting it (in brackets: "
        + ("the SLO-crossing rate interpolated in p99" if nrep == 1 else
           "min–max over the repetitions") + "); ideal = what no policy can exceed (every "
        f"batch full, every class prefix cached, perfect balance). Imbalance = max/mean of the instances' "
        f"time-averaged requests in service. {info.get('cpus', '?')} CPUs; harness CPU share "
        f"<= {_f(cpu)} of one core; machine load average (1 min) at the start and end of each "
        f"staircase {_f(min(loads, default=math.nan), 1)}-{_f(max(loads, default=math.nan), 1)} "
        f"(other processes share the CPUs: near the SLO boundary a step can flip between "
        f"runs); whole run {elapsed_s / 60:.1f} min.",
        "",
        "Throughput at the SLO (req/s), "
        + (f"median over {nrep} repetitions (min–max across them; the ratio is taken within "
           f"each repetition, then its median):" if nrep > 1 else "1 repetition:"),
        "",
        "| workload | SLO (s) | ideal | " + " | ".join(POLICIES)
        + f" | prompt_aware / best baseline{f' ({nrep} reps)' if nrep > 1 else ''} |",
        "|---|---|---|" + "---|" * (len(POLICIES) + 1),
    ]
    for w in shown:
        s = summary[w.name]
        per = s["policies"]
        cells = []
        for p in POLICIES:
            v = per.get(p)
            if not v:
                cells.append("—")
            elif not v.get("throughput_at_slo_max", v["throughput_at_slo"]):
                cells.append(f"none (< {min(w.rates):g})")  # missed it at the lowest rate
            elif nrep > 1:
                cells.append(f"{_f(v['throughput_at_slo'], 1)} ({_f(v['throughput_at_slo_min'], 1)}"
                             f"–{_f(v['throughput_at_slo_max'], 1)})")
            else:
                cells.append(
                    f"{_f(v['throughput_at_slo'], 1)} ({_f(v['rate_at_slo_interpolated'], 0)})"
                )
        verdict = s["verdict"]
        if nrep > 1 and "speedup_per_rep" in verdict:
            bases = ", ".join(dict.fromkeys(verdict["best_baseline_per_rep"]))
            ratio = (f"{_f(verdict['speedup_vs_best_baseline'])}x "
                     f"({_f(verdict['speedup_min'])}–{_f(verdict['speedup_max'])}) vs {bases} "
                     f"({_f(verdict.get('speedup_interpolated'))}x interpolated)")
        else:
            ratio = (f"{_f(verdict.get('speedup_vs_best_baseline'))}x vs "
                     f"{verdict.get('best_baseline', '—')} "
                     f"({_f(verdict.get('speedup_interpolated'))}x interpolated)")
        lines.append(
            f"| {w.name} | {_f(verdict.get('slo_s'), 1)} | "
            f"{_f(verdict.get('ideal_throughput'), 0)} | " + " | ".join(cells) + f" | {ratio} |"
        )
    lines += [
        "",
        "At each policy's highest rate within the SLO: p50 / p99 latency (s), prefix-cache "
        "hit rate, load imbalance"
        + (" (of the repetition whose throughput at the SLO is nearest the median)."
           if nrep > 1 else "."),
        "",
        "| workload | policy | rate | p50 | p99 | hit rate | imbalance |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in shown:
        per = summary[w.name]["policies"]
        for p in POLICIES:
            v = per.get(p)
            if v:
                lines.append(
                    f"| {w.name} | {p} | {_f(v['at_rate'], 0)} | {_f(v['p50_s'])} | "
                    f"{_f(v['p99_s'])} | {_f(v['prefix_hit_rate'], 3)} | {_f(v['imbalance'])} |"
                )
    rep_head, rep_rule = ("rep | ", "---|") if nrep > 1 else ("", "")
    lines += ["", "Every step (rate) that ran:", "",
              f"| workload | {rep_head}policy | rate | throughput | p50 | p99 | hit rate | "
              "imbalance | stolen | re-plans |", f"|---|{rep_rule}---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rep_cell = f"{r.rep} | " if nrep > 1 else ""
        lines.append(
            f"| {r.workload} | {rep_cell}{r.policy} | {_f(r.rate, 0)} | {_f(r.throughput, 1)} | "
            f"{_f(r.p50_s)} | {_f(r.p99_s)}{'' if _ok(r) else ' ✗'} | "
            f"{_f(r.prefix_hit_rate, 3)} | {_f(r.imbalance)} | {r.stolen} | {r.replans} |"
        )
    if redis_rows:
        lines += ["", "Cross-check over Redis (RedisTransport on a local redis-server, same "
                  "harness and arrivals):", "",
                  "| workload | policy | rate | throughput | p50 | p99 | hit rate |",
                  "|---|---|---|---|---|---|---|"]
        for r in redis_rows:
            lines.append(
                f"| {r.workload} | {r.policy} | {_f(r.rate, 0)} | {_f(r.throughput, 1)} | "
                f"{_f(r.p50_s)} | {_f(r.p99_s)}{'' if _ok(r) else ' ✗'} | "
                f"{_f(r.prefix_hit_rate, 3)} |"
            )
    lines += ["", "Targets (from the issue):", ""]
    for w in shown:
        v = summary[w.name]["verdict"]
        if w.classes > 1:
            sp = v.get("speedup_vs_best_baseline")
            hp, hc = v.get("hit_rate_prompt_aware"), v.get("hit_rate_cache_aware")
            spread = (f", median of {nrep} repetitions, {_f(v['speedup_min'])}–"
                      f"{_f(v['speedup_max'])}" if nrep > 1 and "speedup_min" in v else "")
            lines.append(
                f"- {w.name}: prompt_aware throughput at SLO = {_f(sp, 4)}x the best baseline "
                f"({v.get('best_baseline', '—')}{spread}); target >= 1.3x: "
                f"{_met(None if sp is None else sp >= 1.3)}. Prefix-hit rate at "
                f"{_f(v.get('hit_rate_at'), 0)} req/s: {_f(hp, 3)} vs cache_aware "
                f"{_f(hc, 3)}; target >=: {_met(None if hp is None or hc is None else hp >= hc)}."
            )
        else:
            x = v.get("vs_least_loaded")
            lines.append(
                f"- {w.name}: prompt_aware / least_loaded throughput at SLO = {_f(x)}; "
                f"target >= 0.95: {_met(None if x is None else x >= 0.95)}."
            )
    lines += [
        "",
        *_reading(summary, shown, engine, run, results),
        "",
        "![scheduling benchmark](bench/results/scheduling.png)", "",
    ]
    lines += [
              "Raw numbers: `bench/results/scheduling.json`; re-run with "
              "`.venv/bin/python -m bench.scheduling`."]
    return "\n".join(lines)


def _contrast(results: Sequence[RunResult], shown: Sequence[Workload]) -> list[str]:
    """Per skewed workload: cache_aware and prompt_aware at the first rate where one of
    them misses the SLO and the other does not (where the difference shows)."""
    out = []
    for w in shown:
        if w.classes == 1:
            continue
        # repetition 0 (a contrast is one pair of steps on the same arrivals)
        by = {(r.policy, r.rate): r for r in results if r.workload == w.name and r.rep == 0}
        for x in w.rates:
            ca, pa = by.get((CACHE_AWARE, x)), by.get((PROMPT_AWARE, x))
            if ca is None or pa is None or _ok(ca) == _ok(pa):
                continue
            out.append(
                f"{w.name} at {x:g} req/s: cache_aware p99 {_f(ca.p99_s)} s, hits "
                f"{_f(ca.prefix_hit_rate, 3)}, imbalance {_f(ca.imbalance)}; prompt_aware "
                f"p99 {_f(pa.p99_s)} s, hits {_f(pa.prefix_hit_rate, 3)}, imbalance "
                f"{_f(pa.imbalance)}"
            )
            break
    return out


def _reading(
    summary: dict[str, Any], shown: Sequence[Workload], engine: EngineConfig, run: RunConfig,
    results: Sequence[RunResult] = (),
) -> list[str]:
    """The paragraphs under the tables: the ceiling, the cache-size caveat, the planner."""
    ceiling = []
    for w in shown:
        v = summary[w.name]["verdict"]
        if w.classes > 1 and v.get("best_baseline"):
            best = summary[w.name]["policies"][v["best_baseline"]]["throughput_at_slo"]
            ceiling.append(
                f"{w.name}: best baseline {_f(best, 0)} req/s = "
                f"{_f(100 * best / v['ideal_throughput'], 0)} % of the ideal "
                f"{_f(v['ideal_throughput'], 0)}, so 1.3x it would be "
                f"{_f(100 * v['target_vs_ideal'], 0)} % of the ideal"
            )
    cache = engine.cache_blocks * engine.block_size
    nrep = len({r.rep for r in results}) or 1
    return [
        "How to read this.",
        "",
        "- **The ceiling.** No policy can serve more than the ideal column (every batch "
        "full, every class prefix cached, perfect balance), and a p99 SLO leaves some "
        "queueing headroom below it. " + "; ".join(ceiling) + ". Where the best baseline "
        "already runs near the ideal, 1.3x it is not there to take by any placement; the "
        "target can only be met where the baselines lose most of the capacity to misses.",
        "- **Where they differ.** SGLang's router balances by request counts and only "
        "past its thresholds (here 32 outstanding requests and 1.1x): until then a hot "
        "class stays on its instance, whose queue grows; past them it sends requests to "
        "the least-loaded instance, where their prefix is cold (a miss, and an eviction of "
        "that instance's own classes). prompt_aware places whole classes by their work "
        "(rate x output tokens, misses priced), so near saturation it keeps both balance "
        "and hits. " + ("; ".join(_contrast(results, shown)) or "No rate separated them")
        + ". Where the caches hold well under an instance's share of the prefixes "
        "(skew-K64), every placement misses on the long tail of rare classes and the "
        "classes' rates are too noisy (most see under 1 req/s) for a model to place them "
        "much better than cache_aware's smallest-tree rule.",
        f"- **Cache size.** The engines cache {cache:,} tokens each. A real Llama-3.1-8B "
        "on an H100-80GB holds about 426k tokens of KV (the sim's calibrated default: "
        "~52 GiB left after weights and activations at gpu_memory_utilization 0.9, at "
        "128 KiB per token; (80 - 16 GB) x 0.9 / 128 KiB = 440k agrees). With that cache "
        "every class prefix of every workload here fits on every instance (skew-K64: "
        "~168k tokens) and no placement could change a hit rate. The bench shrinks the "
        "cache 26x instead of growing the prefixes 26x (26k-100k-token prefixes would cost "
        "the harness 26x the CPU, on 2 shared cores): read it as prefixes 26x longer whose "
        "misses cost 1/26 of their real prefill, which understates what locality is "
        "worth. The sim also does not pin running sequences' blocks (vLLM shares one pool "
        "between running sequences and cached prefixes), which favours placements that "
        "run many distinct prefixes at once (round_robin, least_loaded, pull).",
        "- **prompt_aware.** Per class (lane): arrival rate, output and prompt tokens, "
        "best cached tokens, from the workers' and the producer's counters in the "
        "transport. Demand = rate x (output tokens + prefill of the uncached suffix in "
        "decode-slot units). The engines announce their cache size, so a placement is "
        "priced with the misses it causes (Che's LRU approximation per instance: which "
        "classes share a cache decides how often each is evicted; a miss stalls the batch "
        "for its prefill); the plan is the cheapest of the packed plan refined by moves, a "
        "cache-priced greedy placement refined, and every instance reading every lane "
        "(pull: chosen when all prefixes fit every cache, as on skew-K4 and uniform-K1). "
        "Re-planned (at most every 2 s) on drift: an instance > 25 % over its fair share"
        + (f" by more than {SchedOptions().drift_z:g} standard errors of its estimated load"
           " (capped)" if SchedOptions().drift_z > 0 else "")
        + ", and then only if the new plan is >= 5 % better; and when new classes appear"
        + (f" (once a class's rate rests on >= {SchedOptions().min_class_arrivals:g} "
           "decayed arrivals)" if SchedOptions().min_class_arrivals > 0 else "")
        + ". An idle instance steals from any lane.",
        f"- **Noise.** {nrep} staircase{'s' if nrep > 1 else ''} per (workload, policy)"
        + (" (one per arrival seed)" if nrep > 1 else "")
        + f", {run.measure_s:g} s measured per rate; the "
        "machine is shared, so the loop lag (reported per step in the raw results) and "
        "with it p99 vary between runs: near the SLO a step can flip, and a difference of "
        "one grid step is not a result.",
        "",
        "Previous result (4 s windows, top rates below some policies' SLO crossing, planner "
        "without cache pricing): skew-K4 1.00x (least_loaded 140.8 req/s), skew-K16 1.00x "
        "(cache_aware 129.2), skew-K64 1.00x (both 48.5, capped by the grid), uniform-K1 "
        "1.00x of least_loaded.",
    ]


def update_benchmarks(body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between the scheduling markers (append them at the end if missing);
    the rest of the file belongs to other benchmarks."""
    text = path.read_text() if path.exists() else "# alto benchmarks\n"
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        a = text.index(BEGIN)
        b = text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

WORKLOADS = (
    # each grid reaches past every policy's SLO crossing (the top rates are above the
    # ideal bound, or the staircase stops on misses): a policy still passing at the top
    # rate would have its throughput capped by the grid, not measured
    Workload("skew-K4", 4, 1.0, (60, 90, 120, 140, 160)),
    Workload("skew-K16", 16, 1.0, (50, 75, 100, 125, 150, 175)),
    Workload("skew-K64", 64, 1.0, (20, 30, 40, 50, 60, 70, 80)),
    Workload("uniform-K1", 1, 1.0, (70, 80, 90, 100, 110, 120), out_mean=(128.0, 128.0)),
)


def load_results(data: dict[str, Any]) -> tuple[list[RunResult], list[Workload]]:
    """Rows and workloads of a results file. Files written before repetitions existed have
    no `rep` per row: they read as repetition 0 (one repetition)."""

    def num(x: Any) -> Any:
        return float(x) if x in ("inf", "-inf", "nan") else x

    fields = {f.name for f in dataclasses.fields(RunResult)}
    rows = [RunResult(**{k: num(v) for k, v in r.items() if k in fields}) for r in data["results"]]
    workloads = [Workload(**{**w, "rates": tuple(w["rates"]),
                             "prefix_tokens": tuple(w["prefix_tokens"]),
                             "suffix_tokens": tuple(w["suffix_tokens"]),
                             "out_mean": tuple(w["out_mean"])}) for w in data["workloads"]]
    return rows, workloads


def render(path: Path) -> None:
    """Rewrite the BENCHMARKS.md section and the plot from a results file (no run)."""
    data = json.loads(path.read_text())
    rows, workloads = load_results(data)
    embedded = [r for r in rows if r.transport == "embedded"]
    redis_rows = [r for r in rows if r.transport == "redis"]
    summary = summarize(embedded, workloads, EngineConfig(**data["engine"]))
    plot(embedded, workloads, path.with_suffix(".png"))
    update_benchmarks(markdown(summary, embedded, workloads, EngineConfig(**data["engine"]),
                               RunConfig(**data["run"]), redis_rows, data["machine"],
                               data["elapsed_s"]))


async def amain(args: argparse.Namespace) -> int:
    if args.render:
        render(Path(args.render))
        print(f"updated {BENCHMARKS_MD} from {args.render}")
        return 0
    engine = EngineConfig(time_scale=args.time_scale)
    run = RunConfig(reps=args.reps)
    workloads = list(WORKLOADS)
    if args.workloads:
        wanted = set(args.workloads.split(","))
        workloads = [w for w in workloads if w.name in wanted]
    if args.quick:
        workloads = [Workload(w.name, w.classes, w.zipf_s, w.rates[:2], out_mean=w.out_mean)
                     for w in workloads[:2]]
        run = RunConfig(first_warmup_s=2.0, warmup_s=0.5, measure_s=2.0, reps=args.reps)
    policies = args.policies.split(",") if args.policies else list(POLICIES)
    t0 = time.perf_counter()
    results = await sweep(workloads, policies, engine, run)
    redis_rows: list[RunResult] = []
    if args.redis:
        from bench.common import redis_server

        w = next((x for x in workloads if x.name == "skew-K16"), workloads[0])
        classes = make_classes(w)
        slo = slo_for(w, classes, engine, run.slo_factor)
        with redis_server() as server:
            for policy in (CACHE_AWARE, PROMPT_AWARE):
                redis_rows += await run_staircase(
                    w, classes, policy, w.rates[:3], engine, run, slo=slo,
                    redis_url=server.url,
                )
    elapsed = time.perf_counter() - t0
    summary = summarize(results, workloads, engine)
    info = machine()
    out = Path(args.out)
    if args.quick and out == RESULTS / "scheduling.json":
        out = RESULTS / "scheduling-quick.json"  # a smoke run never replaces the results
    data = {
        "engine": asdict(engine),
        "run": asdict(run),
        "workloads": [asdict(w) for w in workloads],
        "policies": policies,
        "machine": info,
        "elapsed_s": elapsed,
        "summary": summary,
        "results": [asdict(r) for r in [*results, *redis_rows]],
    }
    write_json(out, data)
    png = plot(results, workloads, out.with_suffix(".png"))
    print(f"wrote {out} and {png} in {elapsed:.0f} s")
    if not args.quick and not args.no_markdown:
        update_benchmarks(
            markdown(summary, results, workloads, engine, run, redis_rows, info, elapsed)
        )
        print(f"updated {BENCHMARKS_MD}")
    for name, s in summary.items():
        print(name, s["verdict"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run (no markdown)")
    ap.add_argument("--redis", action="store_true", help="add a cross-check over Redis")
    ap.add_argument("--workloads", default="", help="comma-separated workload names")
    ap.add_argument("--policies", default="", help="comma-separated policies (default all)")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=1,
                    help="repetitions of every staircase, each on its own arrival seed "
                    "(the summary reports medians and min-max)")
    ap.add_argument("--no-markdown", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "scheduling.json"))
    ap.add_argument("--render", metavar="JSON", default="",
                    help="only rewrite BENCHMARKS.md (and the plot) from a results file")
    return asyncio.run(amain(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
