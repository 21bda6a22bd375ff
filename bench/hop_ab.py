"""Interleaved A/B of the runtime's hop latency and chain throughput: two source trees.

Why not two `alto bench overhead` runs one after the other: on a shared 2-core machine the
floor (one hop with nothing of alto in it) moves between 0.4 and 0.9 ms from one minute to
the next, more than most changes are worth. Here two 3-stage chains of instant tools, one
whose workers import the baseline (a git revision, extracted) and one this checkout,
share one redis-server and are driven alternately in small blocks of sequential runs, then
in alternating preloaded drains, so both see the same noise. The driver (starting and
following runs) is this checkout's on both sides; only worker-to-worker hops are compared.
Results: JSON with per-side p50/p99 of the hops and drain rates (runs/s).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import redis_server, source_tree, write_spec
from bench.overhead import (
    Log,
    chain_spec,
    hops_of,
    preload,
    sequential,
    stage_hops,
    wait_drained,
)
from bench.procs import REPO, WorkerProcs
from orchestrator.routing import stage_group, stage_streams


@dataclass
class HopABConfig:
    base_ref: str  # git revision of the baseline's workers
    blocks: int = 24  # alternating blocks of sequential runs
    per_block: int = 25  # sequential runs per block
    rounds: int = 4  # alternating preloaded drains
    drain_runs: int = 1_500  # runs preloaded per drain
    stages: int = 3
    concurrency: int = 64
    out: Path | None = None


@dataclass
class Side:
    hops_ms: list[float] = field(default_factory=list)
    drains_runs_per_s: list[float] = field(default_factory=list)
    left_after_drains: list[int] = field(default_factory=list)  # 0: a drain ended whole
    # entries the last stage read during each timed drain: drain_runs x stages when the
    # timing covered the whole drain and nothing else
    read_per_drain: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        h = sorted(self.hops_ms)
        return {"hop_p50_ms": statistics.median(h), "hop_p99_ms": h[int(len(h) * 0.99)],
                "hops": len(h), "drains_runs_per_s": self.drains_runs_per_s,
                "drain_runs_per_s_median": statistics.median(self.drains_runs_per_s),
                "left_after_drains": self.left_after_drains,
                "read_per_drain": self.read_per_drain}


async def run_hop_ab(cfg: HopABConfig, log: Log = print) -> dict[str, Any]:
    with source_tree(cfg.base_ref) as base:
        return await _run(cfg, {"base": base, "new": REPO}, log)


async def _run(cfg: HopABConfig, trees: dict[str, Path], log: Log) -> dict[str, Any]:
    from workers.redis_transport import RedisTransport

    sides = {name: Side() for name in trees}
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="alto-hop-ab-") as tmpd:
        tmp = Path(tmpd)
        transport = RedisTransport(server.url, max_connections=256)
        specs, pools = {}, []
        try:
            for name, tree in trees.items():
                spec = chain_spec(f"ab_{name}", cfg.stages, cfg.concurrency)
                file = write_spec(spec, tmp / f"{name}.yaml")
                pool = WorkerProcs(server.url, logdir=tmp, code_dir=tree)
                pools.append(pool)
                for i in range(cfg.stages):
                    pool.start(f"s{i + 1}", pipeline=file)
                specs[name] = spec
            for pool in pools:
                await pool.wait_ready(transport)
            for spec in specs.values():
                await sequential(transport, spec, 20)  # warm connections and code paths
            for b in range(cfg.blocks):
                for name in (trees if b % 2 == 0 else reversed(list(trees))):
                    traces = await sequential(transport, specs[name], cfg.per_block)
                    sides[name].hops_ms += stage_hops(hops_of(traces))
            last = f"s{cfg.stages}"
            for r in range(cfg.rounds):
                for name in (trees if r % 2 == 0 else reversed(list(trees))):
                    spec = specs[name]
                    where = (stage_streams(spec, last)[0], stage_group(spec.name, last))
                    # the group's read counter already holds every earlier run's entries
                    before = (await transport.stats(*where)).entries_read
                    t0 = time.perf_counter()
                    await preload(transport, spec, cfg.drain_runs)
                    # the last stage reads one unit and (stages - 1) end markers per run
                    await wait_drained(transport, spec, last,
                                       before + cfg.drain_runs * cfg.stages, timeout_s=300)
                    sides[name].drains_runs_per_s.append(
                        cfg.drain_runs / (time.perf_counter() - t0))
                    after = await transport.stats(*where)
                    sides[name].left_after_drains.append(after.lag + after.pending)
                    sides[name].read_per_drain.append(after.entries_read - before)
        finally:
            for pool in pools:
                pool.stop()
            await transport.close()
    result = {"benchmark": "hop_ab", "config": {k: str(v) for k, v in asdict(cfg).items()},
              **{name: side.summary() for name, side in sides.items()}}
    for name in trees:
        s = result[name]
        log(f"{name:5s} hop p50 {s['hop_p50_ms']:.3f} ms  p99 {s['hop_p99_ms']:.3f} ms  "
            f"(n={s['hops']})  chain runs/s median {s['drain_runs_per_s_median']:,.0f}")
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(result, indent=2))
    return result


def main(cfg: HopABConfig, log: Log = print) -> dict[str, Any]:
    return asyncio.run(run_hop_ab(cfg, log))
