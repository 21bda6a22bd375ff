"""Streaming vs barrier under open-loop load, for any pipeline and engine (default: FacTool
on the calibrated simulator).

Method (BENCHMARKS.md has the results and the discussion):
* Open-loop Poisson arrivals at each offered rate; the arrival times and the inputs
  (drawn from an inputs file) are generated once per (rate, repetition) from a seed and
  replayed identically for both modes. Latency counts from the *scheduled* arrival, so a
  driver that falls behind cannot hide queueing (no coordinated omission).
* Both modes run in ONE process/deployment on the SAME engine instances: the barrier
  pipeline is `with_streaming(spec, False)` under another name, so both pipelines have
  their own streams but their LM stages share the engines (embedded) or run on identical
  worker sets (Redis). Modes alternate order per repetition.
* Each point: `warmup_s` of arrivals that load the system but are not measured, then
  `duration_s` of measured arrivals, then a drain. Before the sweep, each mode runs an
  unrecorded warm-up (imports, BM25 index, prefix caches).
* Throughput = completions (of any request) inside the measured arrival window, per second;
  under overload this is the service rate. Latencies are over measured requests; a request
  that errs or does not finish by the drain deadline counts as infinitely late.
* Throughput at the SLO (the headline) = the highest OFFERED rate at which every measured
  request completed with p99 <= SLO, walking up the sweep and stopping at the first failing
  rate, interpolated linearly in p99 between the last passing and the first failing rate
  (`slo_capacity`). The completed req/s at the last passing rate is reported beside it.
* Workload (FacTool pipeline): by default each request's text carries as many facts as a
  FacTool KB-QA answer has claims (`FACTOOL_KBQA_CLAIMS`, drawn per request), built from
  the inputs file's sentences; `fanout="file"` sends the inputs as they are.
* Embedded, both modes share the engines: their prefix caches are emptied before every
  point, or the mode measured second would find the first mode's prompts cached.
* Before the sweep (embedded), `timeline` lone requests per mode are profiled: when each
  stage's first/last call started and ended, i.e. the critical path without queueing.
* Time: the sim engine sleeps `step * time_scale` of real time per simulated step. Every
  rate and latency is reported in simulated seconds (= what the modelled deployment sees)
  and the wall-clock values are in the JSON. The orchestrator's own overhead is real time
  and therefore shrinks by `time_scale` in simulated units: time_scale = 1 keeps it exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCHMARKS_MD,
    REPO,
    RESULTS,
    CpuMeter,
    fnum,
    machine,
    median,
    percentile,
    redis_server,
    update_markdown,
    write_json,
    write_spec,
)
from bench.procs import WorkerProcs
from orchestrator.routing import stage_group, stage_streams
from orchestrator.spec import EngineSpec, PipelineSpec, load_pipeline, with_streaming

Log = Callable[[str], None]
MODES = ("streaming", "barrier")


@dataclass
class StreamingConfig:
    pipeline: Path = REPO / "examples" / "factool" / "pipeline.sim.yaml"
    inputs: Path = REPO / "examples" / "factool" / "inputs.jsonl"
    transport: str = "embedded"  # embedded | redis
    engine: str | None = None  # override every LM stage's engine kind
    engine_opts: list[str] = field(default_factory=list)  # KEY=VALUE (JSON values)
    rates: list[float] = field(default_factory=lambda: [4.0, 8.0, 12.0, 16.0, 20.0])
    duration_s: float = 8.0  # measured arrivals per point (simulated seconds)
    warmup_s: float = 3.0  # unmeasured arrivals before them, per point
    requests: int | None = None  # instead: exactly this many arrivals, all measured
    reps: int = 3
    slo_s: float = 4.0  # p99 latency SLO, simulated seconds
    time_scale: float = 2.0  # sim engine only (wall seconds per simulated second)
    instances: int | None = None  # engine instances (embedded) / workers per LM stage (redis)
    tool_workers: int = 1  # redis: workers per tool/reduce stage
    concurrency: int | None = None  # override every stage's concurrency
    partitions: int | None = None  # override every aggregating stage's partition count
    fixed_rate: float | None = None  # where to compare p99 (default: barrier's SLO load)
    drain_s: float = 12.0  # after the last arrival, how long to wait for completions
    prewarm_s: float = 3.0  # unrecorded warm-up per mode before the sweep
    seed: int = 7
    # "factool": each request's text has as many facts as a FacTool KB-QA response has claims
    # (drawn from that dataset's distribution, see FACTOOL_KBQA_CLAIMS); "file": inputs as is
    fanout: str = "factool"
    timeline: int = 4  # embedded: before the sweep, this many lone requests per mode, profiled
    out_dir: Path = RESULTS
    markdown: Path | None = BENCHMARKS_MD
    tag: str | None = None  # output names; default streaming_<transport>[_<engine>]
    progress: bool = True

    def name(self) -> str:
        if self.tag:
            return self.tag
        parts = ["streaming", self.transport]
        if self.engine:
            parts.append(self.engine)
        return "_".join(parts)


# ------------------------------------------------------------------------------------------
# workload
# ------------------------------------------------------------------------------------------


def load_inputs(path: Path) -> list[str]:
    """Texts from a .jsonl file ({"text": ...} per line) or a plain file (one per line)."""
    texts: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            d = json.loads(line)
            texts.append(str(d.get("text") or d.get("input") or d.get("prompt")))
        else:
            texts.append(line)
    if not texts:
        raise ValueError(f"no inputs in {path}")
    return texts


# Claims per response in FacTool's knowledge-based QA set (GAIR-NLP/factool,
# datasets/knowledge_qa/knowledge_qa.jsonl: 50 ChatGPT answers, 234 annotated claims, i.e.
# what FacTool's claim extractor is evaluated on): count -> number of responses.
FACTOOL_KBQA_CLAIMS: dict[int, int] = {1: 3, 2: 6, 3: 11, 4: 9, 5: 5, 6: 5, 7: 4, 8: 1,
                                       9: 2, 10: 3, 11: 1}


def sentence_pool(texts: list[str]) -> list[list[str]]:
    """Each input text as its list of sentences (the example's texts are one fact each)."""
    from examples.factool.sim_responders import _sentences

    return [s for s in (_sentences(t) for t in texts) if s]


def compose(rng: random.Random, pool: list[list[str]]) -> str:
    """A request text with k facts, k drawn from FACTOOL_KBQA_CLAIMS: whole example texts
    (consecutive, from a random one) until k sentences, cut at k. Whole texts keep each
    pronoun after the sentence that names it, as in the example inputs."""
    k = rng.choices(list(FACTOOL_KBQA_CLAIMS), weights=list(FACTOOL_KBQA_CLAIMS.values()))[0]
    i = rng.randrange(len(pool))
    out: list[str] = []
    while len(out) < k:
        out.extend(pool[i % len(pool)])
        i += 1
    return " ".join(out[:k])


@dataclass(frozen=True)
class Arrival:
    at_s: float  # simulated seconds from the start of the point
    text: str
    measured: bool


def arrivals(cfg: StreamingConfig, rate: float, rep: int, texts: list[str]) -> list[Arrival]:
    """The point's arrival sequence: a function of (seed, rate, rep) only, never of mode."""
    rng = random.Random(f"{cfg.seed}:{rate}:{rep}")
    if cfg.fanout == "factool":
        pool = sentence_pool(texts)

        def pick() -> str:
            return compose(rng, pool)
    elif cfg.fanout == "file":
        def pick() -> str:
            return rng.choice(texts)
    else:
        raise ValueError(f"unknown fanout {cfg.fanout!r} (factool | file)")
    out: list[Arrival] = []
    t = 0.0
    if cfg.requests is not None:
        for _ in range(cfg.requests):
            t += rng.expovariate(rate)
            out.append(Arrival(t, pick(), True))
        return out
    end = cfg.warmup_s + cfg.duration_s
    while True:
        t += rng.expovariate(rate)
        if t > end:
            return out
        out.append(Arrival(t, pick(), t > cfg.warmup_s))


# ------------------------------------------------------------------------------------------
# deployments (embedded / redis)
# ------------------------------------------------------------------------------------------


def _opts(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt in items:
        k, _, v = opt.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def prepare_specs(cfg: StreamingConfig) -> tuple[dict[str, PipelineSpec], EngineSpec | None, float]:
    """(spec per mode, the shared engine override, time_scale in effect).

    The barrier spec gets its own name (own streams); engines are made one shared override
    where the pipeline has a single engine, so both modes run on the very same instances.
    """
    base = load_pipeline(cfg.pipeline)
    lm_engines = {base.stage(s).engine or "default" for s in base.by_name
                  if base.stage(s).kind == "lm"}
    override: EngineSpec | None = None
    if cfg.engine or len(lm_engines) == 1:
        src = base.engines[next(iter(lm_engines))] if lm_engines else EngineSpec()
        raw = src.model_dump()
        if cfg.engine and cfg.engine != src.kind:
            raw = {"kind": cfg.engine, "instances": src.instances}
        raw.update(_opts(cfg.engine_opts))
        if cfg.instances is not None:
            raw["instances"] = cfg.instances
        if raw.get("kind", "sim") == "sim":
            raw["time_scale"] = cfg.time_scale
        override = EngineSpec.model_validate(raw)
    time_scale = cfg.time_scale if (override is None or override.kind == "sim") else 1.0
    if cfg.partitions is not None:
        raw_base = base.model_dump()
        for st in raw_base["stages"]:
            if st.get("aggregate_by") is not None:
                st["partitions"] = cfg.partitions
        base = PipelineSpec.model_validate(raw_base)
    streaming = with_streaming(base, True)
    barrier = with_streaming(base, False)
    barrier = PipelineSpec.model_validate({**barrier.model_dump(), "name": f"{base.name}_barrier"})
    return {"streaming": streaming, "barrier": barrier}, override, time_scale


class Deployment:
    """Where the pipelines run; the driver only needs `transport`, `specs` and `pids`."""

    transport: Any
    specs: dict[str, PipelineSpec]
    observed: list[dict[str, Any]]

    def pids(self) -> dict[str, int]:
        return {"driver": os.getpid()}

    async def close(self) -> None: ...

    def check(self) -> None: ...


class EmbeddedDeployment(Deployment):
    def __init__(self, cfg: StreamingConfig, specs: dict[str, PipelineSpec],
                 override: EngineSpec | None):
        from orchestrator.embedded import EmbeddedTransport

        self.cfg = cfg
        self.specs = specs
        self.override = override
        self.transport = EmbeddedTransport()
        self.observed = []
        self.runtime: Any = None
        self.slept = [0.0, 0.0]

    async def start(self) -> None:
        from workers.runtime import Runtime

        def observe(kind: str, data: dict[str, Any]) -> None:
            if kind == "call":
                self.observed.append({**data, "t_end": time.perf_counter()})

        self.runtime = Runtime(self.transport, list(self.specs.values()),
                               engine_override=self.override, concurrency=self.cfg.concurrency,
                               observer=observe)
        await self.runtime.start()
        for engine in self.engines():
            self._time_sleeps(engine)

    def _time_sleeps(self, engine: Any) -> None:
        """Measure how much longer the sim engines' steps really took than they asked for
        (event-loop lag on a busy CPU stretches simulated time). Instrumentation only: the
        engine's injectable `sleep` is wrapped, its timing model is untouched."""
        inner = getattr(engine, "_sleep", None)
        if inner is None:
            return

        async def timed(seconds: float) -> Any:
            t = time.perf_counter()
            try:
                return await inner(seconds)
            finally:
                self.slept[0] += seconds
                self.slept[1] += time.perf_counter() - t

        engine._sleep = timed

    def dilation(self) -> tuple[float, float]:
        """(requested, actual) seconds of engine step sleeps so far."""
        return self.slept[0], self.slept[1]

    def check(self) -> None:
        failure = self.runtime.failed() if self.runtime is not None else None
        if failure is not None:
            raise RuntimeError(f"a stage runner failed: {failure!r}")

    def engines(self) -> list[Any]:
        return list(self.runtime.engines.values()) if self.runtime is not None else []

    def reset_caches(self) -> None:
        """Empty the sim engines' prefix caches (when idle). Both modes share the engines
        and replay the very same inputs, so without this the mode measured second would find
        every prompt of the first one cached (measured: 8 vs 137 uncached prompt tokens per
        `verify` call). Each point starts cold; the prompts' shared instructions are cached
        again by the first calls, as on a server that has been up for a while."""
        from workers.engines.sim import PrefixCache

        for e in self.engines():
            cache = getattr(e, "cache", None)
            if isinstance(cache, PrefixCache):
                e.cache = PrefixCache(cache.block_size, cache.capacity_blocks)

    async def close(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop(drain=False)
        await self.transport.close()


class RedisDeployment(Deployment):
    """A redis-server and `alto worker` processes: per LM stage `instances` workers (each one
    engine instance), per tool/reduce stage `tool_workers`; for both modes at once."""

    def __init__(self, cfg: StreamingConfig, specs: dict[str, PipelineSpec],
                 override: EngineSpec | None, time_scale: float):
        self.cfg = cfg
        self.specs = specs
        self.override = override
        self.time_scale = time_scale
        self.observed = []
        self._stack = contextlib.ExitStack()
        self.pool: WorkerProcs | None = None
        self.server: Any = None
        self.transport: Any = None

    async def start(self, log: Log) -> None:
        from workers.engines.sim import TIME_SCALE_ENV
        from workers.redis_transport import RedisTransport

        self.server = self._stack.enter_context(redis_server())
        tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="alto-bench-")))
        env = {TIME_SCALE_ENV: str(self.time_scale)}
        self.pool = WorkerProcs(self.server.url, env=env, logdir=tmp)
        self.transport = RedisTransport(self.server.url, max_connections=8192)
        per_lm = self.cfg.instances or (self.override.instances if self.override else 1)
        for mode, spec in self.specs.items():
            raw = spec.model_dump()
            if self.override is not None:  # workers read engines from the file
                eng = self.override.model_dump()
                eng["instances"] = 1
                raw["engines"] = {name: eng for name in raw["engines"]}
            path = write_spec(PipelineSpec.model_validate(raw), tmp / f"{mode}.yaml")
            for stage in spec.topo_order:
                n = per_lm if spec.stage(stage).kind == "lm" else self.cfg.tool_workers
                self.pool.start(stage, n, pipeline=path, concurrency=self.cfg.concurrency)
        log(f"started {len(self.pool.workers)} `alto worker` processes; waiting for them")
        await self.pool.wait_ready(self.transport, timeout_s=180)

    def pids(self) -> dict[str, int]:
        out = {"driver": os.getpid()}
        if self.server is not None:
            out["redis"] = self.server.pid
        if self.pool is not None:
            out |= self.pool.pids()
        return out

    def check(self) -> None:
        if self.pool is not None:
            self.pool.check()

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        if self.transport is not None:
            await self.transport.close()
        self._stack.close()


async def wait_idle(dep: Deployment, timeout_s: float = 120.0) -> dict[str, int]:
    """Until no stage has undelivered entries and no non-aggregating stage has entries in
    flight, and the aggregating stages' pending counts have stopped changing. Returns the
    entries still pending at aggregating stages (state of runs that never completed)."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, int] | None = None
    while True:
        dep.check()
        busy = False
        held: dict[str, int] = {}
        for spec in dep.specs.values():
            for stage in spec.topo_order:
                agg = spec.stage(stage).aggregates
                for s in stage_streams(spec, stage):
                    try:
                        st = await dep.transport.stats(s, stage_group(spec.name, stage))
                    except LookupError:
                        continue
                    if st.lag > 0 or (not agg and st.pending > 0):
                        busy = True
                    if agg:
                        held[s] = st.pending
        engines = getattr(dep, "engines", lambda: [])()
        if any(getattr(e, "load", lambda: 0)() for e in engines):
            busy = True
        if not busy and held == last:
            return {k: v for k, v in held.items() if v}
        last = None if busy else held
        if time.monotonic() > deadline:
            raise TimeoutError("the deployment did not go idle")
        await asyncio.sleep(0.25)


# ------------------------------------------------------------------------------------------
# one point
# ------------------------------------------------------------------------------------------


@dataclass
class Record:
    scheduled: float  # perf_counter of the scheduled arrival
    measured: bool
    sent: float = math.nan
    first_partial: float | None = None
    first_by_stage: dict[str, float] = field(default_factory=dict)
    last_by_stage: dict[str, float] = field(default_factory=dict)
    done: float | None = None
    ok: bool = False
    error: str | None = None
    run: str | None = None


async def _track(dep: Deployment, spec: PipelineSpec, a: Arrival, scheduled: float,
                 deadline: float, rec: Record) -> None:
    from workers.client import follow_run, start_run

    try:
        rec.run = await start_run(dep.transport, spec, a.text)
        rec.sent = time.perf_counter()
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        async for _, ev in follow_run(dep.transport, spec, rec.run, deadline_s=left, block_ms=500):
            now = time.perf_counter()
            kind = ev.get("type")
            if kind == "partial":
                if rec.first_partial is None:
                    rec.first_partial = now
                rec.first_by_stage.setdefault(str(ev.get("stage")), now)
                rec.last_by_stage[str(ev.get("stage"))] = now
            elif kind == "result":
                rec.done, rec.ok = now, True
                return
            elif kind == "error":
                rec.done, rec.error = now, str(ev.get("message"))
                return
    except TimeoutError:
        rec.error = "deadline"


class LoopLag:
    """How late the driver's event loop wakes up (it also runs the engines when embedded)."""

    def __init__(self, period_s: float = 0.005):
        self.period = period_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.samples.append((time.perf_counter() - t - self.period) * 1000)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return {"p50_ms": percentile(self.samples, 50), "p99_ms": percentile(self.samples, 99),
                "max_ms": max(self.samples) if self.samples else math.nan}


async def run_point(dep: Deployment, cfg: StreamingConfig, mode: str, rate: float,
                    arrs: list[Arrival], ts: float) -> dict[str, Any]:
    spec = dep.specs[mode]
    held_before = await wait_idle(dep)
    if isinstance(dep, EmbeddedDeployment):
        dep.reset_caches()
    load0 = os.getloadavg()[0]
    meter = CpuMeter(dep.pids())
    lag = LoopLag()
    meter.begin()
    lag.start()
    dil = getattr(dep, "dilation", None)
    dil0 = dil() if dil else None
    t0 = time.perf_counter() + 0.05
    last_at = arrs[-1].at_s if arrs else 0.0
    deadline = t0 + (last_at + cfg.drain_s) * ts
    recs: list[Record] = []
    tasks: list[asyncio.Task[None]] = []
    send_lag = 0.0
    for a in arrs:
        at = t0 + a.at_s * ts
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        send_lag = max(send_lag, time.perf_counter() - at)
        rec = Record(at, a.measured)
        recs.append(rec)
        tasks.append(asyncio.create_task(_track(dep, spec, a, at, deadline, rec)))
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.1, deadline - time.perf_counter() + 5))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    cpu = meter.end()
    loop_lag = await lag.stop()
    dilation = math.nan
    if dil is not None and dil0 is not None:
        req, act = (b - a for a, b in zip(dil0, dil(), strict=True))
        dilation = act / req if req > 0 else math.nan
    unfinished = [r.run for r in recs if r.run and not r.ok and r.error in (None, "deadline")]
    for run in unfinished:
        await dep.transport.cancel(run)
    m = point_metrics(cfg, recs, t0, ts, spec)
    m.update({"mode": mode, "rate": rate, "arrivals": len(arrs), "cpu": cpu,
              "loop_lag": loop_lag, "send_lag_ms_max": send_lag * 1000,
              "engine_dilation": dilation,
              "cancelled_unfinished": len(unfinished),
              "loadavg_1m": [load0, os.getloadavg()[0]],
              "held_before": sum(held_before.values())})
    return m


def point_metrics(cfg: StreamingConfig, recs: list[Record], t0: float, ts: float,
                  spec: PipelineSpec) -> dict[str, Any]:
    meas = [r for r in recs if r.measured]
    lat = [((r.done - r.scheduled) / ts) if r.ok and r.done is not None else math.inf
           for r in meas]
    ttfp = [((r.first_partial - r.scheduled) / ts) if r.first_partial is not None else math.inf
            for r in meas]
    by_stage: dict[str, list[float]] = {}
    last_by_stage: dict[str, list[float]] = {}
    for stage in spec.topo_order:
        by_stage[stage] = [((r.first_by_stage[stage] - r.scheduled) / ts)
                           if stage in r.first_by_stage else math.inf for r in meas]
        last_by_stage[stage] = [((r.last_by_stage[stage] - r.scheduled) / ts)
                                if r.ok and stage in r.last_by_stage else math.inf for r in meas]
    if cfg.requests is not None:
        done = [r.done for r in recs if r.ok and r.done is not None]
        first = min((r.scheduled for r in recs), default=t0)
        span = ((max(done) - first) / ts) if done else math.inf
        thr = len(done) / span if done and span > 0 else 0.0
    else:
        w0 = t0 + cfg.warmup_s * ts
        w1 = t0 + (cfg.warmup_s + cfg.duration_s) * ts
        inside = [r for r in recs if r.ok and r.done is not None and w0 <= r.done <= w1]
        thr = len(inside) / cfg.duration_s
    completed = sum(1 for r in meas if r.ok)
    return {
        "measured": len(meas),
        "completed": completed,
        "errors": sum(1 for r in meas if r.error not in (None, "deadline")),
        "error_samples": sorted({r.error for r in meas if r.error and r.error != "deadline"})[:3],
        "timed_out": sum(1 for r in meas if r.error == "deadline" or (not r.ok and not r.error)),
        "throughput": thr,
        "latency": {f"p{q}": percentile(lat, q) for q in (50, 95, 99)}
        | {"mean": (sum(x for x in lat if math.isfinite(x)) / completed) if completed else math.inf},
        "ttfp": {f"p{q}": percentile(ttfp, q) for q in (50, 95, 99)},
        "first_partial_by_stage_p50": {s: percentile(v, 50) for s, v in by_stage.items()},
        # when each stage emitted its LAST unit of the run: the critical path, stage by stage
        "last_partial_by_stage_p50": {s: percentile(v, 50) for s, v in last_by_stage.items()},
        "wall_latency": {f"p{q}": percentile(lat, q) * ts for q in (50, 99)},
    }


async def profile_timeline(dep: Deployment, cfg: StreamingConfig, texts: list[str],
                           ts: float) -> dict[str, Any]:
    """Lone requests (nothing else running), each in both modes: when each stage's first
    call started and its last call ended, relative to the request's arrival (simulated s),
    from the runners' observer. Medians over the requests. This is the critical path with
    no queueing: where barrier mode waits and streaming overlaps."""
    pool = sentence_pool(texts)
    per: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(cfg.timeline):
        text = compose(random.Random(f"{cfg.seed}:timeline:{i}"), pool)
        for mode in (MODES if i % 2 == 0 else tuple(reversed(MODES))):
            spec = dep.specs[mode]
            await wait_idle(dep)
            if isinstance(dep, EmbeddedDeployment):
                dep.reset_caches()
            n0 = len(dep.observed)
            at = time.perf_counter()
            rec = Record(at, True)
            await _track(dep, spec, Arrival(0.0, text, True), at, at + 120 * ts, rec)
            if not rec.ok or rec.done is None:
                raise RuntimeError(f"timeline request failed in {mode}: {rec.error}")
            calls = [c for c in dep.observed[n0:] if c["pipeline"] == spec.name]
            row: dict[str, Any] = {"latency": (rec.done - at) / ts, "stages": {}}
            for stage in spec.topo_order:
                cs = [c for c in calls if c["stage"] == stage]
                if not cs:
                    continue
                starts = [c["t_end"] - c["seconds"] for c in cs]
                row["stages"][stage] = {
                    "calls": len(cs),
                    "first_start": (min(starts) - at) / ts,
                    "last_start": (max(starts) - at) / ts,
                    "last_end": (max(c["t_end"] for c in cs) - at) / ts,
                    "busy": sum(c["seconds"] for c in cs) / ts,
                }
            per[mode].append(row)
    out: dict[str, Any] = {"requests": cfg.timeline}
    for mode, rows in per.items():
        stages = list(dep.specs[mode].topo_order)
        out[mode] = {
            "latency": median([r["latency"] for r in rows]),
            "stages": {st: {k: median([r["stages"][st][k] for r in rows if st in r["stages"]])
                            for k in ("calls", "first_start", "last_start", "last_end", "busy")}
                       for st in stages if any(st in r["stages"] for r in rows)},
        }
    return out


# ------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, rate): the median over repetitions of every reported number."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["mode"], p["rate"]), []).append(p)
    out = []
    for (mode, rate), ps in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row: dict[str, Any] = {"mode": mode, "rate": rate, "reps": len(ps)}
        row["throughput"] = median([p["throughput"] for p in ps])
        row["completed_share"] = median([p["completed"] / max(1, p["measured"]) for p in ps])
        for key in ("latency", "ttfp", "wall_latency"):
            row[key] = {q: median([p[key][q] for p in ps]) for q in ps[0][key]}
        for key in ("first_partial_by_stage_p50", "last_partial_by_stage_p50"):
            if key in ps[0]:
                row[key] = {s: median([p[key][s] for p in ps]) for s in ps[0][key]}
        row["cpu_cores"] = median([p["cpu"]["total_cores"] for p in ps])
        row["others_cores"] = median([p["cpu"].get("others_cores", math.nan) for p in ps])
        row["loop_lag_p99_ms"] = median([p["loop_lag"]["p99_ms"] for p in ps])
        row["loadavg_1m"] = [median([p.get("loadavg_1m", [math.nan] * 2)[i] for p in ps])
                             for i in (0, 1)]
        row["engine_dilation"] = median([p.get("engine_dilation", math.nan) for p in ps])
        row["measured"] = median([p["measured"] for p in ps])
        out.append(row)
    return out


def slo_capacity(cfg: StreamingConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest offered load a mode sustains within the SLO, from its rows (one per rate).

    A rate passes if every measured request completed and the p99 (median over reps) is
    within the SLO. Walking up the sweep, the capacity is the last passing rate before the
    first failing one (a pass above a failure is noise, not capacity); if the failing rate
    has a finite p99, the SLO crossing is interpolated linearly in p99 between the two
    rates. A first failure with unfinished runs (p99 infinite) is not interpolated.
    """
    rows = sorted(rows, key=lambda r: r["rate"])

    def ok(r: dict[str, Any]) -> bool:
        return r["completed_share"] >= 1.0 and r["latency"]["p99"] <= cfg.slo_s

    last: dict[str, Any] | None = None
    fail: dict[str, Any] | None = None
    for r in rows:
        if not ok(r):
            fail = r
            break
        last = r
    rate = last["rate"] if last else 0.0
    interpolated = rate
    if last is not None and fail is not None and fail["completed_share"] >= 1.0 \
            and math.isfinite(fail["latency"]["p99"]):
        p0, p1 = last["latency"]["p99"], fail["latency"]["p99"]
        if p1 > p0:
            interpolated = rate + (cfg.slo_s - p0) / (p1 - p0) * (fail["rate"] - rate)
    return {"rate": last["rate"] if last else None,
            "rate_interpolated": interpolated,
            "throughput": last["throughput"] if last else 0.0,
            "first_failing_rate": fail["rate"] if fail else None,
            "at_sweep_edge": bool(last is not None and fail is None)}


def headline(cfg: StreamingConfig, agg: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput ratio at the SLO = ratio of the interpolated SLO capacities (offered
    req/s, see `slo_capacity`); p99 ratio at a fixed load (default: the highest rate swept
    at which barrier meets the SLO, i.e. its own SLO load)."""
    by = {(r["mode"], r["rate"]): r for r in agg}
    slo = {m: slo_capacity(cfg, [r for r in agg if r["mode"] == m]) for m in MODES}
    s, b = slo["streaming"]["rate_interpolated"], slo["barrier"]["rate_interpolated"]
    ratio = s / b if b > 0 else (math.inf if s > 0 else math.nan)
    # a mode that still meets the SLO at the highest rate swept has an unknown maximum
    s_edge, b_edge = slo["streaming"]["at_sweep_edge"], slo["barrier"]["at_sweep_edge"]
    note = ("inconclusive: both modes meet the SLO at the highest rate swept" if s_edge and b_edge
            else "lower bound: streaming meets the SLO at the highest rate swept" if s_edge
            else "upper bound: barrier meets the SLO at the highest rate swept" if b_edge
            else "")
    fixed = cfg.fixed_rate
    if fixed is None:
        rates = sorted({r["rate"] for r in agg})
        fixed = slo["barrier"]["rate"] if slo["barrier"]["rate"] is not None else rates[0]
    fs, fb = by.get(("streaming", fixed)), by.get(("barrier", fixed))
    p99_ratio = (fb["latency"]["p99"] / fs["latency"]["p99"]) if fs and fb else math.nan
    p50_ratio = (fb["latency"]["p50"] / fs["latency"]["p50"]) if fs and fb else math.nan
    ttfp_ratio = (fb["ttfp"]["p50"] / fs["ttfp"]["p50"]) if fs and fb else math.nan
    return {
        "slo_s": cfg.slo_s,
        "slo_throughput": slo,
        "throughput_ratio_at_slo": ratio,
        "throughput_ratio_definition": "ratio of the highest offered req/s with p99 <= SLO and "
                                       "all requests done, interpolated at the SLO crossing",
        "throughput_ratio_is_lower_bound": s_edge and not b_edge,
        "throughput_ratio_note": note,
        "fixed_rate": fixed,
        "p99_ratio_barrier_over_streaming": p99_ratio,
        "p50_ratio_barrier_over_streaming": p50_ratio,
        "ttfp_p50_ratio_barrier_over_streaming": ttfp_ratio,
        "targets": {"throughput_ratio": 3.5, "p99_ratio": 2.0},
        "throughput_target_met": bool(ratio >= 3.5) and not b_edge,
        "p99_target_met": bool(p99_ratio >= 2.0),
    }


def workload_stats(observed: list[dict[str, Any]], specs: dict[str, PipelineSpec]
                   ) -> dict[str, Any]:
    """Per stage of the streaming pipeline: calls, units and tokens per call (from the
    runners' observer), i.e. what the pipeline actually asked of the engines."""
    name = specs["streaming"].name
    out: dict[str, Any] = {}
    for stage in specs["streaming"].topo_order:
        calls = [c for c in observed if c["pipeline"] == name and c["stage"] == stage]
        if not calls:
            continue
        out[stage] = {
            "calls": len(calls),
            "units_per_call": sum(c["units"] for c in calls) / len(calls),
            "completion_tokens_per_call": sum(c["completion_tokens"] for c in calls) / len(calls),
            "prompt_tokens_per_call": sum(c["prompt_tokens"] for c in calls) / len(calls),
            "cached_share": (sum(c["cached_tokens"] for c in calls)
                             / max(1, sum(c["prompt_tokens"] for c in calls))),
            "seconds_per_call": sum(c["seconds"] for c in calls) / len(calls),
            "calls_by_instance": sorted(
                (sum(1 for c in calls if c["instance"] == i)
                 for i in {c["instance"] for c in calls}), reverse=True),
        }
    return out


async def run_streaming(cfg: StreamingConfig, log: Log = print) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workers.engines.sim import CALIBRATION, CALIBRATION_SOURCE, TIME_SCALE_ENV

    specs, override, ts = prepare_specs(cfg)
    texts = load_inputs(cfg.inputs)
    prev_env = os.environ.get(TIME_SCALE_ENV)
    os.environ[TIME_SCALE_ENV] = str(ts)  # the env var wins over spec options: pin it
    dep: Deployment
    if cfg.transport == "embedded":
        dep = EmbeddedDeployment(cfg, specs, override)
    elif cfg.transport == "redis":
        dep = RedisDeployment(cfg, specs, override, ts)
    else:
        raise ValueError(f"unknown transport {cfg.transport!r} (embedded | redis)")
    rates = sorted(cfg.rates)
    points: list[dict[str, Any]] = []
    timeline: dict[str, Any] | None = None
    load_start = os.getloadavg()
    started = time.perf_counter()
    try:
        if isinstance(dep, RedisDeployment):
            await dep.start(log)
        else:
            await dep.start()  # type: ignore[attr-defined]
        total = len(rates) * cfg.reps * len(MODES) + (len(MODES) if cfg.prewarm_s > 0 else 0)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), disable=not cfg.progress, transient=False) as bar:
            task = bar.add_task("warm-up", total=total)
            if cfg.prewarm_s > 0:
                warm = StreamingConfig(**{**asdict(cfg), "requests": None, "warmup_s": 0.0,
                                          "duration_s": cfg.prewarm_s})
                for mode in MODES:
                    bar.update(task, description=f"warm-up {mode}")
                    arrs = arrivals(warm, rates[0], -1, texts)
                    await run_point(dep, warm, mode, rates[0], arrs, ts)
                    bar.advance(task)
            if cfg.timeline > 0 and isinstance(dep, EmbeddedDeployment):
                bar.update(task, description="timeline (lone requests)")
                timeline = await profile_timeline(dep, cfg, texts, ts)
            dep.observed.clear()
            for rate in rates:
                for rep in range(cfg.reps):
                    arrs = arrivals(cfg, rate, rep, texts)
                    order = MODES if rep % 2 == 0 else tuple(reversed(MODES))
                    for mode in order:
                        bar.update(task, description=f"{mode:9s} {rate:g} req/s rep {rep + 1}")
                        p = await run_point(dep, cfg, mode, rate, arrs, ts)
                        p["rep"] = rep
                        points.append(p)
                        bar.advance(task)
                        if not cfg.progress:
                            log(f"{mode} rate {rate} rep {rep}: thr {p['throughput']:.2f} "
                                f"p50 {p['latency']['p50']:.2f} p99 {p['latency']['p99']:.2f}")
        work = workload_stats(dep.observed, specs)
        engines = [e.stats() for e in getattr(dep, "engines", lambda: [])() if hasattr(e, "stats")]
    finally:
        await dep.close()
        if prev_env is None:
            os.environ.pop(TIME_SCALE_ENV, None)
        else:
            os.environ[TIME_SCALE_ENV] = prev_env
    agg = aggregate(points)
    head = headline(cfg, agg)
    result: dict[str, Any] = {
        "benchmark": "streaming",
        "name": cfg.name(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": machine(),
        "engine": override.model_dump() if override else None,
        "time_scale": ts,
        "calibration": {"source": CALIBRATION_SOURCE, **asdict(CALIBRATION)}
        if (override is None or override.kind == "sim") else None,
        "workload": work,
        "engine_stats": engines,
        "wall_seconds": time.perf_counter() - started,
        "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
        "timeline": timeline,
        "headline": head,
        "aggregate": agg,
        "points": points,
    }
    name = cfg.name()
    files = [write_json(cfg.out_dir / f"{name}.json", result)]
    with contextlib.suppress(ImportError):
        from bench.plot import plot_streaming

        files.append(plot_streaming(result, cfg.out_dir / f"{name}.png"))
    result["files"] = [str(f) for f in files]
    if cfg.markdown is not None:
        update_markdown(cfg.markdown, name, render_markdown(result, files),
                        title=f"Streaming vs barrier: {name}")
    return result


def _at(slo: dict[str, Any]) -> str:
    """'13.1 (passes 12, fails 16)': the interpolated SLO capacity and its bracket."""
    if not slo["rate"]:
        fails = slo.get("first_failing_rate")
        return f"0 (fails {fails:g})" if fails is not None else "none"
    fails = slo.get("first_failing_rate")
    return (f"{fnum(slo.get('rate_interpolated', slo['rate']))} (passes {slo['rate']:g}"
            + (f", fails {fails:g})" if fails is not None else ", highest swept)"))


def _ratio(x: float) -> str:
    return fnum(x, 2) + "x" if math.isfinite(x) else fnum(x)


def render_markdown(r: dict[str, Any], files: list[Path]) -> str:
    c = r["config"]
    m = r["machine"]
    h = r["headline"]
    ts = r["time_scale"]
    unit = "simulated s" if r["calibration"] else "s"
    lines = [
        f"Measured {m['date']} on {m['cpus']} CPU cores ({m['cpu_model']}); "
        f"transport **{c['transport']}**; pipeline `{Path(c['pipeline']).name}`; engine "
        f"`{(r['engine'] or {}).get('kind', 'per spec')}` × "
        f"{(r['engine'] or {}).get('instances', '?')} instance(s)"
        + (f" ({'worker processes' if c['transport'] == 'redis' else 'shared by all LM stages'})")
        + (f", stage concurrency {c['concurrency']}" if c["concurrency"] else
           ", stage concurrency per spec")
        + (f", {c['partitions']} partitions per aggregating stage" if c["partitions"] else
           ", partitions per spec")
        + f"; {c['reps']} repetition(s) per point (medians shown); wall time "
        f"{r['wall_seconds'] / 60:.1f} min"
        + (f"; load average (1 min) {r['loadavg']['start'][0]:.2f} at the start, "
           f"{r['loadavg']['end'][0]:.2f} at the end" if r.get("loadavg") else "") + ".",
    ]
    if c.get("fanout") == "factool":
        lines += ["", "Requests: FacTool KB-QA-shaped texts (facts per request drawn from the "
                  "claims-per-response distribution of FacTool's knowledge_qa set, mean 4.68), "
                  "built from the example's inputs."]
    if r["calibration"]:
        cal = r["calibration"]
        lines += ["", f"Sim calibration: {cal['source']}: step = {cal['decode_base_ms']:.2f} ms + "
                  f"{cal['decode_per_seq_ms']:.4f} ms × batch + {cal['prefill_ms_per_token']:.4f} ms"
                  f" × uncached prompt tokens. time_scale = {ts:g} (1 simulated s = {ts:g} wall s); "
                  f"rates and latencies below are in simulated seconds."]
    if c["requests"] is not None:
        lines += ["", f"{c['requests']} requests per point (all measured)."]
    else:
        lines += ["", f"Per point: {c['warmup_s']:g} s of unmeasured then {c['duration_s']:g} s of "
                  f"measured Poisson arrivals ({unit}); drain up to {c['drain_s']:g} s."]
    s, b = h["slo_throughput"]["streaming"], h["slo_throughput"]["barrier"]
    note = h.get("throughput_ratio_note", "")
    lb = "≥ " if note.startswith("lower") else "≤ " if note.startswith("upper") else \
        "? " if note.startswith("inconclusive") else ""
    lines += [
        "",
        "| headline | streaming | barrier | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| max offered load with p99 ≤ {h['slo_s']:g} s (req/s, interpolated) | {_at(s)} | "
        f"{_at(b)} | "
        f"{lb}{_ratio(h['throughput_ratio_at_slo'])} "
        f"| ≥ 3.5x | {'yes' if h['throughput_target_met'] else '**no**'} |",
    ]
    fixed = h["fixed_rate"]
    agg = {(x["mode"], x["rate"]): x for x in r["aggregate"]}
    fs, fb = agg.get(("streaming", fixed)), agg.get(("barrier", fixed))
    if fs and fb:
        lines += [
            f"| p99 latency at {fixed:g} req/s (s) | {fnum(fs['latency']['p99'])} | "
            f"{fnum(fb['latency']['p99'])} | {_ratio(h['p99_ratio_barrier_over_streaming'])} | "
            f"≥ 2x | {'yes' if h['p99_target_met'] else '**no**'} |",
            f"| p50 latency at {fixed:g} req/s (s) | {fnum(fs['latency']['p50'])} | "
            f"{fnum(fb['latency']['p50'])} | {_ratio(h['p50_ratio_barrier_over_streaming'])} | | |",
            f"| time to first partial, p50 at {fixed:g} req/s (s) | {fnum(fs['ttfp']['p50'])} | "
            f"{fnum(fb['ttfp']['p50'])} | {_ratio(h['ttfp_p50_ratio_barrier_over_streaming'])} "
            f"| | |",
        ]
    if note:
        lines += ["", f"Throughput ratio {note}."]
    if s.get("rate") and b.get("rate"):
        lines += ["", f"Completed req/s at the highest passing rate: streaming "
                  f"{fnum(s['throughput'])}, barrier {fnum(b['throughput'])}."]
    stages = list(r["aggregate"][0]["first_partial_by_stage_p50"]) if r["aggregate"] else []
    show = [st for st in stages if st != stages[0]][-2:-1] if len(stages) > 2 else []
    lines += ["", "| offered req/s | mode | completed req/s | p50 | p95 | p99 | first partial p50 | "
              + "".join(f"first `{st}` p50 | " for st in show)
              + "done | CPU cores (others) | load avg start→end |",
              "| --- | --- | --- | --- | --- | --- | --- | " + "--- | " * len(show)
              + "--- | --- | --- |"]
    for x in r["aggregate"]:
        lat, tt = x["latency"], x["ttfp"]
        extra = "".join(f"{fnum(x['first_partial_by_stage_p50'][st])} | " for st in show)
        lines.append(
            f"| {x['rate']:g} | {x['mode']} | {fnum(x['throughput'])} | {fnum(lat['p50'])} | "
            f"{fnum(lat['p95'])} | {fnum(lat['p99'])} | {fnum(tt['p50'])} | {extra}"
            f"{x['completed_share']:.0%} | {fnum(x['cpu_cores'])} ({fnum(x['others_cores'])}) | "
            + ("{:.1f}→{:.1f} |".format(*x["loadavg_1m"]) if "loadavg_1m" in x else "|"))
    tl = r.get("timeline")
    if tl:
        lines += ["", f"Lone requests (median of {tl['requests']}, nothing else running; "
                  f"{unit} after arrival): when each stage's first call started, its last call "
                  "started and its last call ended; calls per request.", "",
                  "| stage | streaming: first start | last start | last end | calls | "
                  "barrier: first start | last start | last end | calls |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for st in tl["streaming"]["stages"]:
            a, z = tl["streaming"]["stages"][st], tl["barrier"]["stages"].get(st, {})
            cells = [fnum(v.get(k, math.nan)) for v in (a, z)
                     for k in ("first_start", "last_start", "last_end", "calls")]
            lines.append(f"| `{st}` | " + " | ".join(cells[:4]) + " | " + " | ".join(cells[4:])
                         + " |")
        lines.append(f"| answer | | | {fnum(tl['streaming']['latency'])} | | | | "
                     f"{fnum(tl['barrier']['latency'])} | |")
    if r["workload"]:
        lines += ["", "Workload as served (streaming mode, per call): "
                  + "; ".join(f"`{k}` {v['calls']} calls, {v['units_per_call']:.1f} units, "
                              f"{v['completion_tokens_per_call']:.0f} out / "
                              f"{v['prompt_tokens_per_call']:.0f} in tokens "
                              f"({v['cached_share']:.0%} cached)"
                              for k, v in r["workload"].items()) + "."]
    rels = []
    for f in files:
        try:
            rels.append(str(Path(f).resolve().relative_to(REPO)))
        except ValueError:
            rels.append(str(f))
    lines += ["", "Files: " + ", ".join(f"`{x}`" for x in rels) + ".",
              "", "Reproduce: `" + reproduce_command(c) + "`"]
    pngs = [x for x in rels if x.endswith(".png")]
    if pngs:
        lines += ["", f"![latency vs offered load]({pngs[0]})"]
    return "\n".join(lines)


def reproduce_command(c: dict[str, Any]) -> str:
    parts = [".venv/bin/alto bench streaming", f"--transport {c['transport']}"]
    default = StreamingConfig()
    if Path(c["pipeline"]) != default.pipeline:
        parts.append(f"--pipeline {c['pipeline']}")
    if c["engine"]:
        parts.append(f"--engine {c['engine']}")
    for o in c["engine_opts"]:
        parts.append(f"--engine-opt {o}")
    parts.append("--rates " + ",".join(f"{x:g}" for x in c["rates"]))
    if c["requests"] is not None:
        parts.append(f"--requests {c['requests']}")
    else:
        parts.append(f"--duration {c['duration_s']:g} --warmup {c['warmup_s']:g}")
    parts += [f"--drain {c['drain_s']:g}", f"--reps {c['reps']}", f"--slo {c['slo_s']:g}",
              f"--time-scale {c['time_scale']:g}", f"--prewarm {c['prewarm_s']:g}"]
    if c["seed"] != default.seed:
        parts.append(f"--seed {c['seed']}")
    if Path(c["inputs"]) != default.inputs:
        parts.append(f"--inputs {c['inputs']}")
    if c["instances"]:
        parts.append(f"--instances {c['instances']}")
    if c["concurrency"]:
        parts.append(f"--concurrency {c['concurrency']}")
    if c["partitions"]:
        parts.append(f"--partitions {c['partitions']}")
    if c.get("fanout", "factool") != default.fanout:
        parts.append(f"--fanout {c['fanout']}")
    if c.get("timeline", default.timeline) != default.timeline:
        parts.append(f"--timeline {c['timeline']}")
    if c["transport"] == "redis" and c["tool_workers"] != 1:
        parts.append(f"--tool-workers {c['tool_workers']}")
    if c["tag"]:
        parts.append(f"--tag {c['tag']}")
    return " ".join(parts)


def main(cfg: StreamingConfig, log: Log = print) -> dict[str, Any]:
    return asyncio.run(run_streaming(cfg, log))
