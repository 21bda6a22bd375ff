"""Cache-priced placement (orchestrator/scheduling.py: `lru_miss_ratios`, `CacheModel`,
`place_for_cache`, `refine_for_cache`): constructed situations and properties.

Why it exists: `pack` balances demand as if every prefix stayed cached. When an
instance's classes do not fit its cache together they evict each other, and each miss
stalls a whole batch for a prefill, so *which* classes share an instance changes its work.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduling import (
    CacheModel,
    PromptAwarePlanner,
    SchedOptions,
    lru_miss_ratios,
    pack,
    place_for_cache,
    refine_for_cache,
)


def test_lru_misses_are_zero_when_everything_fits_and_total_without_a_cache() -> None:
    assert lru_miss_ratios([1.0, 2.0], [100.0, 200.0], 300.0) == [0.0, 0.0]
    assert lru_miss_ratios([1.0, 2.0], [100.0, 200.0], 0.0) == [1.0, 1.0]
    hot, cold = lru_miss_ratios([10.0, 0.1], [100.0, 100.0], 150.0)
    assert 0.0 < hot < cold < 1.0  # a popular prefix survives longer


def test_lru_misses_follow_che_fixed_point() -> None:
    """At the characteristic time T the expected occupancy equals the cache size."""
    import math

    rates, sizes, cache = [5.0, 2.0, 1.0, 0.5], [1000.0, 1000.0, 1000.0, 1000.0], 2000.0
    miss = lru_miss_ratios(rates, sizes, cache)
    t = -math.log(miss[0]) / rates[0]
    for r, m in zip(rates, miss, strict=True):
        assert abs(m - math.exp(-r * t)) < 1e-9  # one T for every item
    assert abs(sum(s * (1 - m) for s, m in zip(sizes, miss, strict=True)) - cache) < 1.0


@given(
    rates=st.lists(st.floats(0.01, 50.0), min_size=1, max_size=12),
    size=st.floats(10.0, 5000.0),
    cache=st.floats(0.0, 20000.0),
    more=st.floats(0.0, 20000.0),
)
@settings(max_examples=150, deadline=None)
def test_property_a_bigger_cache_never_misses_more(
    rates: list[float], size: float, cache: float, more: float
) -> None:
    sizes = [size] * len(rates)
    small = lru_miss_ratios(rates, sizes, cache)
    big = lru_miss_ratios(rates, sizes, cache + more)
    assert all(0.0 <= b <= s + 1e-9 <= 1.0 + 1e-9 for s, b in zip(small, big, strict=True))


FOUR = {f"s{i}": 1.0 for i in range(4)}
CACHE = dict.fromkeys(FOUR, 16384.0)


def _situation() -> tuple[dict[int, float], dict[int, float], dict[int, float], CacheModel]:
    """The regime placement is for: 48 classes with Zipf(1) popularity (60 req/s in all),
    1-4k-token prefixes (about 120k tokens together) and 16-256-token answers, on four
    instances that cache 16k tokens each. Returns demand, rates, outputs, model."""
    rng = random.Random(5)
    k = 48
    weights = [1 / (r + 1) for r in range(k)]
    rate = {c: 60.0 * w / sum(weights) for c, w in enumerate(weights)}
    out = {c: 16 * 16 ** rng.random() for c in rate}
    size = {c: float(rng.randint(1000, 4000)) for c in rate}
    demand = {c: rate[c] * (out[c] + 1) for c in rate}
    model = CacheModel(cache=CACHE, rate=rate, prefix=size, one_off=dict.fromkeys(rate, 80.0),
                       weight=0.15)
    return demand, rate, out, model


def test_cache_priced_placement_lowers_the_busiest_instances_work() -> None:
    demand, _, _, model = _situation()
    live = sorted(FOUR)
    blind = pack(demand, FOUR, footprint=model.prefix)
    peak_blind = max(model.work(demand, blind, live).values())
    priced = place_for_cache(demand, FOUR, model)
    assert max(model.work(demand, priced, live).values()) < 0.95 * peak_blind
    # refining the demand-only plan helps too, and never raises its peak
    refined = refine_for_cache(demand, FOUR, blind, model)
    assert max(model.work(demand, refined, live).values()) < peak_blind


@given(
    demand=st.dictionaries(st.integers(0, 40), st.floats(0.1, 500.0), min_size=1, max_size=24),
    rates=st.lists(st.floats(0.05, 20.0), min_size=41, max_size=41),
    sizes=st.lists(st.floats(50.0, 4000.0), min_size=41, max_size=41),
    n=st.integers(1, 5),
    cache=st.floats(500.0, 20000.0),
)
@settings(max_examples=60, deadline=None)
def test_property_refining_never_raises_the_peak_and_keeps_every_lane_owned(
    demand: dict[int, float], rates: list[float], sizes: list[float], n: int, cache: float
) -> None:
    cap = {f"s{i}": 1.0 for i in range(n)}
    model = CacheModel(cache=dict.fromkeys(cap, cache), rate=dict(enumerate(rates)),
                       prefix=dict(enumerate(sizes)), one_off={}, weight=0.15)
    live = sorted(cap)
    for start in (pack(demand, cap), place_for_cache(demand, cap, model)):
        assert set(start) == set(demand) and all(set(o) <= set(cap) for o in start.values())
        refined = refine_for_cache(demand, cap, start, model)
        assert set(refined) == set(demand)
        for lane, owners in refined.items():
            assert set(owners) <= set(cap)
            assert len(owners) == len(start[lane])  # split lanes stay split as they were
        peak = max(model.work(demand, start, live).values())
        assert max(model.work(demand, refined, live).values()) <= peak * (1 + 1e-9)


def _observe_constant_traffic(planner: PromptAwarePlanner, rate: dict[int, float],
                              out: dict[int, float], model: CacheModel) -> float:
    """Constant traffic at `rate` per lane for 8 s, observed every 0.5 s, every prompt
    `model.prefix` shared tokens (all hits) plus 80 own ones; returns the last time."""
    t = 0.0
    counters: dict[str, float] = {}
    while t < 8.0:
        t += 0.5
        for lane, r in rate.items():
            n = r * t
            prefix = model.prefix[lane]
            counters.update({f"{lane}.arr": n, f"{lane}.n": n, f"{lane}.out": n * out[lane],
                             f"{lane}.in": n * (prefix + 80.0), f"{lane}.hit": n * prefix})
        planner.observe(counters, t)
    return t


def test_planner_prices_misses_only_where_every_instance_announces_a_cache() -> None:
    demand, rate, out, model = _situation()
    planner = PromptAwarePlanner(SchedOptions(half_life_s=2.0))
    t = _observe_constant_traffic(planner, rate, out, model)
    priced = planner.maybe_replan(FOUR, None, t, cache=CACHE)
    blind = planner.maybe_replan(FOUR, None, t, cache={"s0": 16384.0})  # the others: unknown
    assert priced is not None and blind is not None
    live = sorted(FOUR)
    m = planner.cache_model(CACHE)
    d = planner.demand(misses_priced=True)
    assert max(m.work(d, priced.owners, live).values()) < max(m.work(d, blind.owners, live).values())


def test_when_every_prefix_fits_every_cache_every_instance_reads_every_class() -> None:
    """Locality is free then (each cache holds all classes), so the plan is pull's:
    no instance waits on its own lanes while another has room."""
    _, rate, out, model = _situation()
    planner = PromptAwarePlanner(SchedOptions(half_life_s=2.0))
    few = {lane: rate[lane] for lane in range(4)}  # four classes: about 10k tokens
    t = _observe_constant_traffic(planner, few, out, model)
    plan = planner.maybe_replan(FOUR, None, t, cache=CACHE)
    assert plan is not None
    assert all(set(owners) == set(FOUR) for owners in plan.owners.values())
    # caches that hold about one of these prefixes each: partitioned instead
    small = planner.maybe_replan(FOUR, None, t, cache=dict.fromkeys(FOUR, 4500.0))
    assert small is not None and any(len(o) < 4 for o in small.owners.values())
