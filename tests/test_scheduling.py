"""Scheduling policies on constructed situations, and properties over random ones.

Everything here is the pure policy layer (orchestrator/scheduling.py): no transport, no
clock. The property tests drive a small discrete-time cluster (lanes, instances with
slots, requests that take a few ticks) with the same decision functions the runtime's
PolicyRouter calls, and check that no policy starves a class or leaves an instance idle
while work waits.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.scheduling import (
    CACHE_AWARE,
    LEAST_LOADED,
    POLICIES,
    PROMPT_AWARE,
    PULL,
    ROUND_ROBIN,
    ApproxPrefixTree,
    CacheAwarePolicy,
    LeastLoadedPolicy,
    Placement,
    PrefixClassifier,
    PromptAwarePlanner,
    RoundRobinPolicy,
    SchedOptions,
    busier_lanes,
    effective_policy,
    full_lanes,
    imbalance,
    lane_of,
    lane_owners,
    may_steal,
    owned_lanes,
    pack,
    parse_policy_override,
    planned_load,
    steal_sources,
)

# ------------------------------------------------------------------------------------------
# round robin, least loaded
# ------------------------------------------------------------------------------------------


def test_round_robin_cycles_in_name_order() -> None:
    rr = RoundRobinPolicy()
    picks = [rr.choose(["s2", "s0", "s1"]) for _ in range(7)]
    assert picks == ["s0", "s1", "s2", "s0", "s1", "s2", "s0"]


def test_least_loaded_picks_the_minimum_and_rotates_ties() -> None:
    ll = LeastLoadedPolicy()
    assert ll.choose({"s0": 5, "s1": 2, "s2": 9}) == "s1"
    tied = {ll.choose({"s0": 1, "s1": 1, "s2": 4}) for _ in range(4)}
    assert tied == {"s0", "s1"}


def test_empty_instance_lists_are_refused() -> None:
    with pytest.raises(ValueError):
        RoundRobinPolicy().choose([])
    with pytest.raises(ValueError):
        LeastLoadedPolicy().choose({})
    with pytest.raises(ValueError):
        CacheAwarePolicy().choose("x", {})


# ------------------------------------------------------------------------------------------
# SGLang cache-aware
# ------------------------------------------------------------------------------------------

SYSTEM_A = "You are a grader of essays. " * 20
SYSTEM_B = "Translate the following text into French. " * 20


def test_prefix_tree_matches_the_longest_prefix_and_splits_nodes() -> None:
    tree = ApproxPrefixTree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    assert tree.prefix_match("hello world!") == (11, "a")
    assert tree.prefix_match("hello thx") == (8, "b")
    matched, tenant = tree.prefix_match("help")
    assert matched == 3 and tenant in {"a", "b"}  # "hel" is shared by both
    assert tree.prefix_match("zzz") == (0, "a")  # root: first tenant, nothing matched
    # character counts: a holds "hello " + "world", b "hello " + "there" ("hello t" split)
    assert tree.tenant_chars == {"a": 11, "b": 11}


def test_prefix_tree_eviction_drops_least_recently_used_leaves() -> None:
    tree = ApproxPrefixTree()
    tree.insert("shared-old-branch", "a")
    tree.insert("shared-new-branch", "a")
    tree.prefix_match("shared-new-branch")  # touch the new branch
    assert tree.tenant_chars["a"] == len("shared-") + len("old-branch") + len("new-branch")
    tree.evict(max_chars=len("shared-new-branch"))
    assert tree.tenant_chars["a"] <= len("shared-new-branch")
    assert tree.prefix_match("shared-new-branch") == (17, "a")
    matched, _ = tree.prefix_match("shared-old-branch")
    assert matched == len("shared-")  # the old leaf is gone, the shared head stays


def test_cache_aware_routes_to_the_best_prefix_match_when_balanced() -> None:
    ca = CacheAwarePolicy(cache_threshold=0.5, balance_abs_threshold=32)
    loads = {"s0": 3.0, "s1": 5.0, "s2": 4.0}
    first = ca.choose(SYSTEM_A + "essay 1", loads)
    assert first == "s0"  # nothing matches: the smallest tree (all empty; by name)
    second = ca.choose(SYSTEM_B + "text 1", loads)
    assert second == "s1"  # a new prefix goes to the smallest tree, not to s0 again
    assert ca.choose(SYSTEM_A + "essay 2", loads) == "s0"
    assert ca.choose(SYSTEM_B + "text 2", loads) == "s1"
    assert ca.cache_picks == 2 and ca.balanced_picks == 0


def test_cache_aware_below_the_match_threshold_goes_to_the_smallest_tree() -> None:
    ca = CacheAwarePolicy(cache_threshold=0.5)
    loads = {"s0": 0.0, "s1": 0.0}
    ca.choose(SYSTEM_A, loads)  # s0 holds SYSTEM_A
    short = SYSTEM_A[:40] + "x" * 400  # shares 40 of 440 characters with s0
    assert ca.choose(short, loads) == "s1"
    assert ca.smallest_picks == 2


def test_cache_aware_balances_only_when_both_thresholds_are_exceeded() -> None:
    ca = CacheAwarePolicy(balance_abs_threshold=32, balance_rel_threshold=1.5)
    ca.choose(SYSTEM_A + "1", {"s0": 0.0, "s1": 0.0})  # s0 now holds SYSTEM_A
    # absolute gap 40 > 32 but 100 < 1.5 x 70: balanced -> still the cached instance
    assert ca.choose(SYSTEM_A + "2", {"s0": 100.0, "s1": 70.0}) == "s0"
    # relative gap 2x > 1.5 but absolute 10 <= 32: balanced -> still the cached instance
    assert ca.choose(SYSTEM_A + "3", {"s0": 20.0, "s1": 10.0}) == "s0"
    # both exceeded: the least loaded, whatever the cache says
    assert ca.choose(SYSTEM_A + "4", {"s0": 100.0, "s1": 10.0}) == "s1"
    assert ca.balanced_picks == 1
    # ... and the tree learned that s1 has seen SYSTEM_A too
    assert ca.tree.tenant_chars["s1"] > len(SYSTEM_A)


def test_cache_aware_forgets_instances_that_left() -> None:
    ca = CacheAwarePolicy()
    ca.choose(SYSTEM_A, {"s0": 0.0, "s1": 0.0})
    ca.forget(["s1"])
    assert "s0" not in ca.tree.tenant_chars
    assert ca.choose(SYSTEM_A + "again", {"s1": 0.0}) == "s1"


def test_cache_aware_evicts_on_its_interval() -> None:
    ca = CacheAwarePolicy(max_tree_chars=100, eviction_interval_s=30.0)
    for i in range(5):
        ca.choose(f"prompt number {i} " * 20, {"s0": 0.0})
    assert ca.tree.tenant_chars["s0"] > 100
    assert not ca.maybe_evict(0.0)  # starts the clock
    assert not ca.maybe_evict(10.0)
    assert ca.maybe_evict(31.0)
    assert ca.tree.tenant_chars["s0"] <= 100


# ------------------------------------------------------------------------------------------
# classification
# ------------------------------------------------------------------------------------------


def _prompt(prefix: str, i: int) -> str:
    return f"{prefix}\n\nRequest {i}: " + " ".join(f"w{(i * 7919 + k) % 10007}" for k in range(30))


PREAMBLE = "System: be exact. " * 12


def _classes(n: int) -> list[str]:
    return [PREAMBLE + " ".join(f"c{c}x{k}" for k in range(300)) for c in range(n)]


def test_classifier_names_a_class_once_and_for_all() -> None:
    pc = PrefixClassifier(chunk_chars=64, min_count=3)
    prefixes = _classes(3)
    names: dict[int, set[object]] = {c: set() for c in range(3)}
    for i in range(60):
        c = i % 3 if i >= 6 else 0  # class 0 becomes popular first
        names[c].add(pc.classify(_prompt(prefixes[c], i)))
    # from the first popular class on, every class keeps one name, and names differ
    assert all(len(v) == 1 for c, v in names.items() if c != 0)
    assert len(names[0]) <= 2  # before anything is popular it may share the preamble's
    assert len({next(iter(v)) for v in names.values()}) == 3


def test_classifier_is_not_split_by_suffixes_that_match_by_chance() -> None:
    pc = PrefixClassifier(chunk_chars=64, min_count=3)
    prefix = _classes(1)[0]
    # pad so that the chunk after the prefix holds "\n\nRequest 1" for requests 10-19
    pad = prefix + "." * (64 - (len(prefix) + len("\n\nRequest 1")) % 64)
    names = {pc.classify(_prompt(pad, i)) for i in range(10, 60)}
    assert len(names) == 1


def test_classifier_short_prompts_share_the_root_class() -> None:
    pc = PrefixClassifier(chunk_chars=128)
    assert pc.classify("tiny", b"root") == b"root"
    assert pc.peek("also tiny", b"root") == b"root"


def test_lane_of_is_stable_and_in_range() -> None:
    pc = PrefixClassifier(chunk_chars=64)
    cls = pc.classify(_classes(1)[0])
    assert lane_of(cls, 128) == lane_of(cls, 128)
    assert 0 <= lane_of(cls, 7) < 7


# ------------------------------------------------------------------------------------------
# placement
# ------------------------------------------------------------------------------------------

FOUR = {"s0": 1.0, "s1": 1.0, "s2": 1.0, "s3": 1.0}


def test_pack_bin_packs_classes_within_the_load_bound() -> None:
    demand = {1: 40.0, 2: 30.0, 3: 30.0, 4: 25.0, 5: 25.0, 6: 20.0, 7: 20.0, 8: 10.0}
    owners = pack(demand, FOUR, slack=0.1)
    assert all(len(v) == 1 for v in owners.values())  # nothing big enough to split
    load = planned_load(demand, owners, list(FOUR))
    assert max(load.values()) <= 1.1 * sum(demand.values()) / 4
    assert imbalance(load) <= 1.1


def test_pack_splits_only_a_class_bigger_than_one_share() -> None:
    demand = {1: 100.0, 2: 10.0, 3: 10.0, 4: 10.0}  # total 130, share 32.5, bound 35.75
    owners = pack(demand, FOUR, slack=0.1)
    assert len(owners[1]) == 3  # ceil(100 / 35.75) pieces, on three different instances
    assert all(len(owners[k]) == 1 for k in (2, 3, 4))
    rest = {owners[k][0] for k in (2, 3, 4)}
    assert rest.isdisjoint(owners[1])  # the small classes fill the fourth instance
    demand = {1: 60.0, 2: 20.0, 3: 20.0, 4: 20.0}  # total 120, share 30, bound 33
    owners = pack(demand, FOUR, slack=0.1)
    assert len(owners[1]) == 2
    assert len(set(owners[1])) == 2


def test_pack_keeps_previous_owners_while_they_have_room() -> None:
    demand = {1: 10.0, 2: 10.0, 3: 10.0, 4: 10.0}
    previous = {1: ("s3",), 2: ("s2",), 3: ("s1",), 4: ("s0",)}
    assert pack(demand, FOUR, previous) == previous
    # lane 1 grew: its owner cannot hold it with lane 2 there too, so one of them moves
    crowded = {1: ("s0",), 2: ("s0",), 3: ("s1",), 4: ("s2",)}
    owners = pack(demand, FOUR, crowded)
    assert owners[1] != owners[2]
    assert sum(1 for k in demand if owners[k] == crowded[k]) == 3  # only one move


def test_pack_prefers_the_instance_holding_fewer_prefix_tokens() -> None:
    demand = {1: 10.0, 2: 10.0, 3: 1.0}
    footprint = {1: 4000.0, 2: 100.0, 3: 3000.0}
    owners = pack(demand, {"s0": 1.0, "s1": 1.0}, footprint=footprint, slack=1.0)
    # lane 3 fits on either; it goes where less prefix is cached (next to the small one)
    assert owners[3] == owners[2]


def test_lane_owners_fall_back_to_a_live_instance() -> None:
    owners = {5: ("s1",)}
    assert lane_owners(5, owners, ["s0", "s1"]) == ["s1"]
    survivor = lane_owners(5, owners, ["s0", "s2"])
    assert len(survivor) == 1 and survivor[0] in {"s0", "s2"}
    assert lane_owners(5, owners, []) == []
    mine = owned_lanes("s0", owners, ["s0", "s2"], 16)
    theirs = owned_lanes("s2", owners, ["s0", "s2"], 16)
    assert sorted(mine + theirs) == list(range(16))  # every lane has exactly one reader


def _counters(rates: dict[int, float], out: dict[int, float], t: float) -> dict[str, float]:
    """Cumulative shared counters after t seconds of constant traffic."""
    c: dict[str, float] = {}
    for lane, r in rates.items():
        n = r * t
        c[f"{lane}.arr"] = n
        c[f"{lane}.n"] = n
        c[f"{lane}.out"] = n * out[lane]
        c[f"{lane}.in"] = n * 1000.0
        c[f"{lane}.hit"] = n * 950.0
        c[f"{lane}.sec"] = n * out[lane] * 0.01
    return c


def _feed(planner: PromptAwarePlanner, rates: dict[int, float], out: dict[int, float],
          t0: float, t1: float, base: dict[str, float] | None = None) -> dict[str, float]:
    """Observe constant traffic from t0 to t1 (in 0.5 s heartbeats); returns the counters."""
    base = dict(base or {})
    t = t0
    cur = base
    while t < t1 - 1e-9:
        t += 0.5
        cur = {k: base.get(k, 0.0) + v for k, v in _counters(rates, out, t - t0).items()}
        for k, v in base.items():
            cur.setdefault(k, v)
        planner.observe(cur, t)
    return cur


def test_planner_plans_then_replans_on_drift_only() -> None:
    opts = SchedOptions(drift=0.25, min_replan_s=2.0, half_life_s=2.0)
    planner = PromptAwarePlanner(opts)
    out = {1: 50.0, 2: 50.0, 3: 50.0, 4: 50.0}
    counters = _feed(planner, {1: 10, 2: 10, 3: 10, 4: 10}, out, 0.0, 4.0)
    plan = planner.maybe_replan(FOUR, None, 4.0)
    assert plan is not None and plan.reason == "first plan"
    assert sorted(o for v in plan.owners.values() for o in v) == sorted(FOUR)  # one each
    # steady traffic: no re-plan, however often asked
    counters = _feed(planner, {1: 10, 2: 10, 3: 10, 4: 10}, out, 4.0, 10.0, counters)
    assert planner.maybe_replan(FOUR, plan, 10.0) is None
    # class 1 becomes five times hotter: its instance is overloaded -> re-plan, and the
    # new plan is balanced within the bound again
    counters = _feed(planner, {1: 70, 2: 10, 3: 10, 4: 10}, out, 10.0, 20.0, counters)
    before = imbalance(planned_load(planner.demand(), plan.owners, list(FOUR)))
    new = planner.maybe_replan(FOUR, plan, 20.0)
    assert new is not None and new.reason.startswith("drift") and new.epoch == plan.epoch + 1
    after = imbalance(planned_load(planner.demand(), new.owners, list(FOUR)))
    assert before > 1.25 and after < before
    assert len(new.owners[1]) >= 2  # the hot class is now split
    # right after a re-plan, drift waits for min_replan_s
    assert planner.maybe_replan(FOUR, new, 20.5) is None


def test_planner_replans_when_instances_change() -> None:
    planner = PromptAwarePlanner(SchedOptions(half_life_s=2.0))
    out = {1: 20.0, 2: 20.0, 3: 20.0}
    _feed(planner, {1: 5, 2: 5, 3: 5}, out, 0.0, 3.0)
    plan = planner.maybe_replan(FOUR, None, 3.0)
    assert plan is not None
    three = {"s0": 1.0, "s1": 1.0, "s2": 1.0}
    new = planner.maybe_replan(three, plan, 3.1)
    assert new is not None and new.reason == "instances changed"
    assert all(set(v) <= set(three) for v in new.owners.values())


def _skewed_after_plan(per_lane: float, hot: float) -> tuple[PromptAwarePlanner, Placement,
                                                              float]:
    """Twelve equal classes planned three per instance, then lane 1 runs at `hot` x the
    others' rate for 6 s: (planner, plan, now). Same shape at every rate, so the planned
    imbalance it shows is the same; only the evidence behind it differs."""
    opts = SchedOptions(drift=0.25, min_replan_s=2.0, half_life_s=2.0, drift_z=1.5)
    planner = PromptAwarePlanner(opts)
    lanes = range(1, 13)
    out = dict.fromkeys(lanes, 50.0)
    counters = _feed(planner, dict.fromkeys(lanes, per_lane), out, 0.0, 8.0)
    plan = planner.maybe_replan(FOUR, None, 8.0)
    assert plan is not None and all(len(o) == 1 for o in plan.owners.values())
    rates = {lane: per_lane * (hot if lane == 1 else 1.0) for lane in lanes}
    _feed(planner, rates, out, 8.0, 14.0, counters)
    return planner, plan, 14.0


def test_planner_ignores_an_imbalance_within_the_noise_of_few_arrivals() -> None:
    """The same apparent drift (lane 1 at 3x: its instance at ~1.4x its fair share)
    re-plans when it rests on a thousand arrivals, not when on a handful (0.4 req/s
    per class: about one arrival per class per half-life, where a Poisson count of one
    is as likely to read 2 as 0)."""
    for per_lane, expect in ((0.4, False), (200.0, True)):
        planner, plan, now = _skewed_after_plan(per_lane, 3.0)
        ratio = imbalance(planned_load(planner.demand(), plan.owners, list(FOUR)))
        assert ratio > 1.3  # over the plain drift bound either way
        new = planner.maybe_replan(FOUR, plan, now)
        assert (new is not None) is expect, (per_lane, ratio)
        if new is not None:
            assert new.reason.startswith("drift")
    # without the noise margin (drift_z = 0) the few arrivals re-plan too: the margin,
    # not some other rule, is what kept the plan
    planner, plan, now = _skewed_after_plan(0.4, 3.0)
    planner.opts = SchedOptions(drift=0.25, min_replan_s=2.0, half_life_s=2.0, drift_z=0.0)
    assert planner.maybe_replan(FOUR, plan, now) is not None


def test_planner_follows_a_real_shift_even_at_low_rates() -> None:
    """A class twenty times hotter is far outside the noise of the same few arrivals."""
    planner, plan, now = _skewed_after_plan(0.4, 20.0)
    new = planner.maybe_replan(FOUR, plan, now)
    assert new is not None and new.reason.startswith("drift")
    before = imbalance(planned_load(planner.demand(), plan.owners, list(FOUR)))
    after = imbalance(planned_load(planner.demand(), new.owners, list(FOUR)))
    assert after < before


def test_a_large_drift_re_plans_even_where_the_noise_margin_would_cover_it() -> None:
    """Lane 1 at 6x on few arrivals: its instance at ~1.8x its fair share, the cold-start
    case seen in the K16 benchmark (1.86x kept for 20 s). The noise margin alone (1.5
    standard errors, ~0.55 of the bound here) would keep the plan; the margin's cap
    (`drift` x the bound) makes it re-plan."""
    planner, plan, now = _skewed_after_plan(0.4, 6.0)
    demand = planner.demand()
    work = planned_load(demand, plan.owners, list(FOUR))
    noise = planner.load_noise(demand, plan.owners, list(FOUR))
    hot = max(work, key=work.__getitem__)
    bound = (1 + planner.opts.drift) * sum(work.values()) / len(FOUR)
    assert imbalance(work) > 1.7
    assert work[hot] < bound + planner.opts.drift_z * noise[hot] * work[hot]  # inside it
    assert work[hot] > bound * (1 + planner.opts.drift)  # beyond the cap
    new = planner.maybe_replan(FOUR, plan, now)
    assert new is not None and new.reason.startswith("drift")


def test_a_new_class_forces_a_re_plan_only_once_its_rate_rests_on_a_few_arrivals() -> None:
    """A class seen once (a long-output one: a large share of the estimated demand) waits
    on its default owner; after a few more arrivals it is planned. (Drift is switched off
    here: the newcomer's default owner is far over its share, which the capped drift
    margin would answer with a re-plan of its own; this test is about the new-class rule.)"""
    opts = SchedOptions(min_replan_s=2.0, half_life_s=2.0, drift=10.0, min_class_arrivals=4.0)
    planner = PromptAwarePlanner(opts)
    lanes = dict.fromkeys(range(1, 5), 2.0)
    out = {**dict.fromkeys(range(1, 5), 20.0), 9: 400.0}
    counters = _feed(planner, lanes, out, 0.0, 6.0)
    plan = planner.maybe_replan(FOUR, None, 6.0)
    assert plan is not None and 9 not in plan.owners
    # one arrival of class 9, finished by the next heartbeat
    one = {**counters, "9.arr": 1.0, "9.n": 1.0, "9.out": 400.0, "9.in": 1000.0,
           "9.hit": 0.0, "9.sec": 4.0}
    planner.observe(one, 9.0)
    share = planner.demand()[9] / sum(planner.demand().values())
    assert share > opts.new_lane_share and planner.evidence(9) < opts.min_class_arrivals
    assert planner.maybe_replan(FOUR, plan, 9.0) is None
    # four more arrivals of it
    more = {**one, "9.arr": 5.0, "9.n": 5.0, "9.out": 2000.0, "9.in": 5000.0, "9.sec": 20.0}
    planner.observe(more, 9.5)
    assert planner.evidence(9) >= opts.min_class_arrivals
    new = planner.maybe_replan(FOUR, plan, 9.5)
    assert new is not None and new.reason == "new classes" and 9 in new.owners


def test_evidence_is_the_effective_number_of_arrivals() -> None:
    """Kish's effective sample size of the decayed counts: n for n arrivals at once, and
    bounded by the arrivals a steady rate brings per decay time however long it ran."""
    planner = PromptAwarePlanner(SchedOptions(half_life_s=2.0))
    planner.observe({"1.arr": 0.0}, 0.0)
    planner.observe({"1.arr": 5.0}, 0.5)
    assert planner.evidence(1) == pytest.approx(5.0)
    assert planner.evidence(2) == 0.0
    steady = PromptAwarePlanner(SchedOptions(half_life_s=2.0))
    _feed(steady, {1: 10.0}, {1: 10.0}, 0.0, 60.0)
    # weights halve every 2 s: sum w ~ r / lambda, sum w^2 ~ r / (2 lambda) -> n ~ 2 r / lambda
    lam = math.log(2) / 2.0
    assert steady.evidence(1) == pytest.approx(2 * 10.0 / lam, rel=0.1)


def test_placement_round_trips_through_json() -> None:
    p = Placement(epoch=3, owners={7: ("s0", "s2")}, planned={"s0": 1.5}, demand={7: 3.0},
                  members=("s0", "s2"), reason="x")
    q = Placement.from_json(p.to_json())
    assert q == p


# ------------------------------------------------------------------------------------------
# stealing and policy selection
# ------------------------------------------------------------------------------------------


def test_stealing_rules() -> None:
    for policy in POLICIES:
        assert may_steal(policy, 0, 32, 0.5)  # idle: always
    assert may_steal(PROMPT_AWARE, 31, 32, 0.5)  # prompt_aware: any free slot
    assert not may_steal(PROMPT_AWARE, 32, 32, 0.5)
    assert not may_steal(CACHE_AWARE, 1, 32, 1.0)  # baselines: only when idle
    others, hot = ["a", "b", "c"], ["b"]
    assert steal_sources(PROMPT_AWARE, 0, 32, others, hot, 0.5) == others  # idle: anywhere
    # mostly idle: where owners are full, and where this instance is warm
    assert steal_sources(PROMPT_AWARE, 5, 32, others, hot, 0.5, ["c", "mine"]) == ["c", "b"]
    # busier: only warm lanes (no cold class taken from a full owner)
    assert steal_sources(PROMPT_AWARE, 20, 32, others, hot, 0.5, ["c"]) == ["c"]
    assert steal_sources(PROMPT_AWARE, 20, 32, others, hot, 0.5) == []
    assert steal_sources(LEAST_LOADED, 5, 32, others, hot, 1.0, ["c"]) == []
    assert full_lanes(3, {0: ("s0",), 1: ("s0", "s1")}, ["s0", "s1"], {"s0"})[:2] == [0]
    assert busier_lanes([0, 1], {0: ("s0",), 1: ("s1",)}, ["s0", "s1"],
                        {"s0": 30.0, "s1": 12.0}, mine=10.0, margin=4.0) == [0]


def test_policy_override_syntax() -> None:
    assert parse_policy_override(None) == {}
    assert parse_policy_override("prompt_aware") == {"*": "prompt_aware"}
    assert parse_policy_override("a=pull, b=cache_aware") == {"a": "pull", "b": "cache_aware"}
    with pytest.raises(ValueError, match="fastest"):
        parse_policy_override("fastest")
    over = {"*": ROUND_ROBIN, "x": PULL}
    assert effective_policy("lm", False, PULL, "y", over) == ROUND_ROBIN
    assert effective_policy("lm", False, CACHE_AWARE, "x", over) == PULL
    assert effective_policy("lm", True, PROMPT_AWARE, "z", {}) == PULL  # aggregating
    assert effective_policy("tool", False, PROMPT_AWARE, "z", {}) == PULL


# ------------------------------------------------------------------------------------------
# properties: no starvation, no idle instance while work waits
# ------------------------------------------------------------------------------------------


@given(
    demand=st.dictionaries(st.integers(0, 63), st.floats(0.0, 1000.0), max_size=40),
    n=st.integers(1, 8),
    previous=st.dictionaries(
        st.integers(0, 63), st.lists(st.sampled_from([f"s{i}" for i in range(10)]),
                                     min_size=1, max_size=3), max_size=20),
    dead=st.sets(st.integers(0, 7), max_size=3),
)
@settings(max_examples=200, deadline=None)
def test_property_every_lane_keeps_a_live_reader(
    demand: dict[int, float], n: int, previous: dict[int, list[str]], dead: set[int]
) -> None:
    cap = {f"s{i}": 1.0 for i in range(n)}
    owners = pack(demand, cap, previous)
    for lane, d in demand.items():
        if d > 0:
            assert owners[lane] and set(owners[lane]) <= set(cap)
    live = [f"s{i}" for i in range(n) if i not in dead] or ["s0"]
    readers: dict[int, int] = {}
    for inst in live:
        for lane in owned_lanes(inst, owners, live, 64):
            readers[lane] = readers.get(lane, 0) + 1
    assert set(readers) == set(range(64))  # no class without a reader, dead owners or not


@dataclass
class _Req:
    cls: int
    left: int  # ticks of service still needed
    born: int
    done: int | None = None


@dataclass
class _Inst:
    name: str
    capacity: int
    running: list[_Req] = field(default_factory=list)
    alive: bool = True


class _Cluster:
    """Discrete-time model of one stage: lanes are FIFO queues, instances hold up to
    `capacity` requests, each needing a few ticks. Producers and consumers decide with the
    same functions the runtime calls; each tick: arrivals are routed, instances read (own
    lanes first, then `steal_sources`, as PolicyRouter.consume), running work advances."""

    def __init__(self, policy: str, n: int, capacity: int, lanes: int, seed: int):
        self.policy = policy
        self.insts = [_Inst(f"s{i}", capacity) for i in range(n)]
        self.lanes = lanes if policy != PULL else 1
        self.queues: list[deque[_Req]] = [deque() for _ in range(self.lanes)]
        self.rr, self.ll = RoundRobinPolicy(), LeastLoadedPolicy()
        self.ca = CacheAwarePolicy(balance_abs_threshold=4)
        self.owners: dict[int, tuple[str, ...]] = {}
        self.rng = random.Random(seed)
        self.all: list[_Req] = []
        self.arrived: dict[int, float] = {}

    def live(self) -> list[str]:
        return [i.name for i in self.insts if i.alive]

    def load(self, name: str) -> float:
        inst = next(i for i in self.insts if i.name == name)
        return len(inst.running) + len(self.queues[int(name[1:])])

    def route(self, req: _Req, tick: int) -> None:
        self.all.append(req)
        live = self.live()
        if self.policy == PULL:
            self.queues[0].append(req)
            return
        if self.policy == PROMPT_AWARE:
            lane = req.cls % self.lanes
            self.arrived[lane] = self.arrived.get(lane, 0.0) + 1.0
            self.queues[lane].append(req)
            return
        if self.policy == ROUND_ROBIN:
            pick = self.rr.choose(live)
        elif self.policy == LEAST_LOADED:
            pick = self.ll.choose({s: self.load(s) for s in live})
        else:
            pick = self.ca.choose(f"class-{req.cls}-" * 8 + str(tick), {s: self.load(s) for s in live})
        self.queues[int(pick[1:])].append(req)

    def replan(self) -> None:
        if self.policy == PROMPT_AWARE and self.arrived:
            self.owners = pack(self.arrived, {s: 1.0 for s in self.live()}, self.owners)

    def own(self, inst: _Inst) -> list[int]:
        if self.policy == PULL:
            return [0]
        if self.policy == PROMPT_AWARE:
            return owned_lanes(inst.name, self.owners, self.live(), self.lanes)
        return [int(inst.name[1:])]

    def consume(self) -> None:
        live = self.live()
        full = {i.name for i in self.insts if i.alive and len(i.running) >= i.capacity}
        order = [i for i in self.insts if i.alive]
        self.rng.shuffle(order)
        for inst in order:
            mine = self.own(inst)
            take = inst.capacity - len(inst.running)
            for lane in mine:
                while take and self.queues[lane]:
                    inst.running.append(self.queues[lane].popleft())
                    take -= 1
            if not take or any(self.queues[lane] for lane in mine):
                continue
            others = [j for j in range(self.lanes) if j not in mine]
            if self.policy == PROMPT_AWARE:
                hot = [j for j in full_lanes(self.lanes, self.owners, live, full) if j in others]
            else:
                hot = [j for j in others if f"s{j}" in full]
            sources = steal_sources(self.policy, len(inst.running), inst.capacity, others, hot,
                                    1.0)
            budget = min(take, 2)
            for lane in sources:
                while budget and self.queues[lane]:
                    inst.running.append(self.queues[lane].popleft())
                    budget -= 1

    def advance(self, tick: int) -> None:
        for inst in self.insts:
            if not inst.alive:
                continue
            for r in inst.running:
                r.left -= 1
                if r.left <= 0:
                    r.done = tick
            inst.running = [r for r in inst.running if r.done is None]

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues)


@given(
    policy=st.sampled_from(POLICIES),
    n=st.integers(1, 5),
    capacity=st.integers(1, 4),
    arrivals=st.lists(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 6)), max_size=6),
                      min_size=1, max_size=40),
    kill=st.one_of(st.none(), st.tuples(st.integers(0, 39), st.integers(0, 4))),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_no_starvation_and_no_idle_instance_while_work_waits(
    policy: str, n: int, capacity: int, arrivals: list[list[tuple[int, int]]],
    kill: tuple[int, int] | None, seed: int,
) -> None:
    lanes = 8 if policy == PROMPT_AWARE else n
    c = _Cluster(policy, n, capacity, lanes, seed)
    tick = 0
    horizon = len(arrivals) + sum(w for batch in arrivals for _, w in batch) + 10
    while tick < horizon and (tick < len(arrivals) or c.waiting() or any(
        i.running for i in c.insts if i.alive
    )):
        if kill is not None and tick == kill[0] and n > 1:
            dead = c.insts[kill[1] % n]
            dead.alive = False
            for r in dead.running:  # its in-flight work is redelivered (claimed) at once
                c.queues[0 if policy == PULL else r.cls % lanes if policy == PROMPT_AWARE
                         else (kill[1] % n)].appendleft(r)
            dead.running = []
            c.ca.forget(c.live())
        for cls, work in arrivals[tick] if tick < len(arrivals) else []:
            c.route(_Req(cls, work, tick), tick)
        if tick % 3 == 0:
            c.replan()
        c.consume()
        # after everyone has read: work may wait only where no live instance is idle
        if c.waiting():
            idle = [i.name for i in c.insts if i.alive and not i.running]
            assert not idle, f"{policy}: {idle} idle while {c.waiting()} wait (tick {tick})"
        c.advance(tick)
        tick += 1
    # no class starves: everything that arrived has been served within the horizon
    undone = [r for r in c.all if r.done is None]
    assert not undone, f"{policy}: {len(undone)} never served"
    assert math.isfinite(max((r.done - r.born for r in c.all), default=0))
