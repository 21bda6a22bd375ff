"""Offline analysis of skew-K64: how many prefix hits (and how much modelled capacity)
placements of classes onto instances can get, without running the runtime.

Why: on skew-K64 the 64 class prefixes (~160k tokens) are 2.5x the 4 instances' caches
together (4 x 16k tokens), so which classes share a cache decides the hit rate. This
replays one request trace of the bench's own generator through the sim's own LRU block
cache (`PrefixCache`, 1024 blocks x 16 tokens per instance) under fixed class -> instance
placements, and prices each instance's work with the sim's calibrated step costs
(decode: one full-batch step per output token, shared by the batch; prefill: 0.04 ms
per uncached prompt token). Capacity = the rate at which the busiest instance is busy
all the time. Simplifications: requests are looked up and inserted one at a time (no two
in one step), no queueing; so this bounds what a placement can do, it is not a latency.

Run: `.venv/bin/python -m bench.sched_k64_analysis`.
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Callable, Mapping, Sequence

from bench.scheduling import WORKLOADS, ClassDef, EngineConfig, Request, arrivals, make_classes
from orchestrator.scheduling import (
    CacheModel,
    _peak_and_spread,
    pack,
    place_for_cache,
    refine_for_cache,
)
from workers.engines.sim import CALIBRATION, PrefixCache
from workers.engines.tokens import tokenize

Placement = Callable[[Request], int]
PREAMBLE_BLOCKS = 16  # the 256-token system prompt every class shares


def replay(
    reqs: Sequence[Request], place: Placement, engine: EngineConfig,
    no_insert: Callable[[int], bool] = lambda c: False, window: int = 0,
) -> dict[str, float]:
    """Hit rate and per-instance work (ms per request of the trace) of a placement;
    `window` > 0: also the min / max hit rate over windows of that many requests (the
    bench measures 8 s windows: 400-480 requests at 50-60 req/s)."""
    caches = [PrefixCache(engine.block_size, engine.cache_blocks) for _ in range(engine.instances)]
    step_ms = CALIBRATION.decode_base_ms + engine.capacity * CALIBRATION.decode_per_seq_ms
    work = [0.0] * engine.instances
    prompt = cached = 0
    w_prompt = w_cached = 0
    windows: list[float] = []
    class_keys: dict[int, tuple[int, int, list[bytes]]] = {}
    for n_req, r in enumerate(reqs):
        i = place(r)
        # the prompt is the class prefix + a per-request rest (the tokenizer splits there):
        # the prefix's full blocks are shared, every later block is this request's own
        if r.cls not in class_keys:
            head = r.text[: r.text.index("\n\nRequest ")]
            ptoks = tokenize(head)
            class_keys[r.cls] = (len(head), len(ptoks), caches[0].block_keys(ptoks))
        n_chars, n_prefix, pkeys = class_keys[r.cls]
        n_tok = n_prefix + len(tokenize(r.text[n_chars:]))
        n_blocks = n_tok // engine.block_size
        keys = pkeys + [n_req.to_bytes(8, "little") + j.to_bytes(2, "little")
                        for j in range(len(pkeys), n_blocks)]
        hit = caches[i].match_keys(keys, PrefixCache.max_hit_blocks(n_tok, engine.block_size))
        if not no_insert(r.cls):
            caches[i].insert_keys(keys)
        else:  # only the shared preamble's blocks (a hit refreshes, a miss stores nothing)
            caches[i].insert_keys(keys[:PREAMBLE_BLOCKS])
        c = hit * engine.block_size
        prompt += n_tok
        cached += c
        w_prompt += n_tok
        w_cached += c
        if window and (n_req + 1) % window == 0:
            if n_req + 1 > window:  # the first window warms the caches
                windows.append(w_cached / w_prompt)
            w_prompt = w_cached = 0
        work[i] += (r.out_tokens * step_ms / engine.capacity
                    + (n_tok - c) * CALIBRATION.prefill_ms_per_token)
    n = len(reqs)
    per = [w / n for w in work]
    return {
        "hit": cached / prompt,
        "window_min": min(windows, default=float("nan")),
        "window_max": max(windows, default=float("nan")),
        "mean_ms": sum(per),  # instance-ms per request, all instances
        "max_ms": max(per),
        # rate (req/s) at which the busiest instance is busy 100 % of the time
        "capacity": 1000.0 / max(per) if max(per) > 0 else float("inf"),
        "balanced_capacity": engine.instances * 1000.0 / sum(per),
    }


def lpt(classes: Sequence[int], bins: int, weight: Mapping[int, float]) -> dict[int, int]:
    """Largest weight first onto the least loaded bin."""
    load = [0.0] * bins
    out: dict[int, int] = {}
    for c in sorted(classes, key=lambda c: -weight[c]):
        b = min(range(bins), key=lambda b: load[b])
        out[c] = b
        load[b] += weight[c]
    return out


def fit_partition(
    pop: Mapping[int, float], size: Mapping[int, int], hit_cost: Mapping[int, float],
    miss_cost: Mapping[int, float], bins: int, room: float, spill: bool,
    by_tokens: bool = True,
) -> tuple[dict[int, int], list[int]]:
    """Capacity-aware placement: classes by popularity (prefill tokens saved per cached
    token; `by_tokens` False: requests saved per cached token), each to the
    least loaded instance whose hot set it still fits (`room` tokens); the rest are
    cold (they miss wherever they go): to the least loaded instance, or all to the last
    instance (`spill`), which then holds no hot class."""
    hot_bins = bins - 1 if spill else bins
    free = [room] * hot_bins
    load = [0.0] * bins
    out: dict[int, int] = {}
    cold: list[int] = []
    for c in sorted(pop, key=lambda c: -pop[c] if by_tokens else -pop[c] / size[c]):
        fits = [b for b in range(hot_bins) if free[b] >= size[c]]
        if not fits:
            cold.append(c)
            continue
        b = min(fits, key=lambda b: load[b])
        out[c] = b
        free[b] -= size[c]
        load[b] += pop[c] * hit_cost[c]
    for c in sorted(cold, key=lambda c: -pop[c] * miss_cost[c]):
        b = bins - 1 if spill else min(range(bins), key=lambda b: load[b])
        out[c] = b
        load[b] += pop[c] * (hit_cost[c] + miss_cost[c])
    return out, cold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="skew-K64")
    ap.add_argument("--seconds", type=float, default=240.0)
    args = ap.parse_args()
    w = next(x for x in WORKLOADS if x.name == args.workload)
    engine = EngineConfig()
    classes = make_classes(w)
    # an LRU's state depends on the order of requests, not their times: one trace serves
    # every rate
    reqs = arrivals(w, classes, 50.0, 0.0, 0.0, args.seconds, 0, 0)
    k, inst = len(classes), engine.instances
    cache_tok = engine.cache_blocks * engine.block_size
    step_ms = CALIBRATION.decode_base_ms + engine.capacity * CALIBRATION.decode_per_seq_ms
    p_ms = CALIBRATION.prefill_ms_per_token
    pop = {c.index: c.popularity for c in classes}
    size = {c.index: c.prefix_tokens for c in classes}
    # request text after the prefix, in tokens (suffix + "Request i [out=n]:")
    suffix = sum(w.suffix_tokens) / 2 + 8
    # instance-ms of a request whose prefix hits: its decode share of full-batch steps,
    # and its prefill from the prefix's last full block on (half a block on average)
    hit_cost = {c.index: c.out_mean * step_ms / engine.capacity + (suffix + 8) * p_ms
                for c in classes}
    miss_cost = {c: (size[c] - 256) * p_ms for c in range(k)}
    print(f"{w.name}: {k} classes, prefix tokens in all {sum(size.values())}, caches "
          f"{inst} x {cache_tok} tokens; trace of {len(reqs)} requests")
    top = sorted(range(k), key=lambda c: -pop[c])
    for n in (4, 8, 16, 24, 32):
        print(f"  top {n:2d} classes: {sum(pop[c] for c in top[:n]):.3f} of requests, "
              f"{sum(size[c] for c in top[:n])} prefix tokens")

    # bound: the best set of classes held in the caches together, never evicted (no
    # suffix blocks, no cold prefixes crowding them), every other class missing all but
    # the preamble; a knapsack by value density (a class saves pop x its tokens for its
    # tokens of cache: the density is pop, so the most popular classes, until full)
    prompt_mean = sum(pop[c] * (size[c] + suffix) for c in range(k))
    budget = inst * (cache_tok - 256)
    kept: list[int] = []
    for c in sorted(range(k), key=lambda c: -pop[c]):
        if size[c] - 256 <= budget:
            budget -= size[c] - 256
            kept.append(c)
    saved = sum(pop[c] * (size[c] // 16 * 16) for c in kept) + sum(
        pop[c] * 256 for c in range(k) if c not in kept)
    h_bound = saved / prompt_mean
    ms_bound = sum(pop[c] * hit_cost[c] for c in range(k)) + (1 - h_bound) * prompt_mean * p_ms
    print(f"{'bound (best classes pinned, no eviction)':46s} hit {h_bound:.3f}  ms/req "
          f"{ms_bound:6.1f}  balanced cap {inst * 1000 / ms_bound:6.1f} req/s "
          f"({len(kept)} classes cached)")

    def run(name: str, place: Placement, no_insert: Callable[[int], bool] = lambda c: False,
            ) -> None:
        res = replay(reqs, place, engine, no_insert, window=480)
        print(f"{name:46s} hit {res['hit']:.3f} ({res['window_min']:.2f}-{res['window_max']:.2f})"
              f"  ms/req {res['mean_ms']:6.1f}  "
              f"balanced cap {res['balanced_capacity']:6.1f}  busiest-instance cap "
              f"{res['capacity']:6.1f} req/s")

    rng = random.Random(1)
    run("random (least_loaded-like)", lambda r: rng.randrange(inst))
    pinned = lpt(range(k), inst, {c: pop[c] * hit_cost[c] for c in range(k)})
    run("every class pinned, LPT by demand", lambda r: pinned[r.cls])
    pinned_miss = lpt(range(k), inst, {c: pop[c] * (hit_cost[c] + miss_cost[c]) for c in range(k)})
    run("every class pinned, LPT by demand + misses", lambda r: pinned_miss[r.cls])
    for frac, spill, by_tokens in itertools.product((0.6, 0.75, 0.9, 1.0), (False, True),
                                                    (True, False)):
        a, cold = fit_partition(pop, size, hit_cost, miss_cost, inst, frac * cache_tok, spill,
                                by_tokens)
        tag = (f"fit {frac:.2f}{'' if by_tokens else ' by req'}, cold "
               f"{'on one' if spill else 'spread'}")
        run(f"{tag} ({k - len(cold)} hot)", lambda r, a=a: a[r.cls])
        if not spill:
            # what an engine that did not cache the cold classes' prefixes would give
            # (not a placement: neither vLLM nor the sim can be told so per request)
            cs = set(cold)
            run("  same, cold classes not cached", lambda r, a=a: a[r.cls],
                lambda c, cs=cs: c in cs)
    planner_plan(classes, engine, run)


def planner_plan(
    classes: Sequence[ClassDef], engine: EngineConfig, run: Callable[[str, Placement], None]
) -> None:
    """The prompt_aware planner's own choice, fed the true per-class statistics (as if
    its estimates were exact): the cheapest of its candidates by its cache model."""
    rate = 60.0
    insts = [f"i{j}" for j in range(engine.instances)]
    caps = dict.fromkeys(insts, 1.0)
    suffix = 80.0
    demand = {c.index: rate * c.popularity * (c.out_mean + 1 + 0.15 * suffix) for c in classes}
    model = CacheModel(
        cache=dict.fromkeys(insts, float(engine.cache_blocks * engine.block_size)),
        rate={c.index: rate * c.popularity for c in classes},
        prefix={c.index: float(c.prefix_tokens // 16 * 16) for c in classes},
        one_off={c.index: suffix for c in classes},
        weight=0.15,
    )
    previous: dict[int, tuple[str, ...]] = {}
    packed = pack(demand, caps, previous, footprint={c.index: c.prefix_tokens for c in classes})
    cands = {
        "pack+refine": refine_for_cache(demand, caps, packed, model),
        "place_for_cache+refine": refine_for_cache(
            demand, caps, place_for_cache(demand, caps, model, previous), model),
    }
    best = min(cands, key=lambda n: _peak_and_spread(model.work(demand, cands[n], insts), caps))
    for name, owners in cands.items():
        idx = {c: [insts.index(o) for o in owners[c]] for c in owners}
        split = sum(1 for o in owners.values() if len(o) > 1)
        mark = " (chosen)" if name == best else ""
        # a split class: its owners pull from one stream, so each takes a share at random
        rng = random.Random(2)
        run(f"planner {name}{mark}, {split} split",
            lambda r, idx=idx, rng=rng: rng.choice(idx[r.cls]))


if __name__ == "__main__":
    main()
