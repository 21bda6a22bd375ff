"""The scheduling benchmark is reachable as `alto bench scheduling`, its ideal bound is an
upper bound a policy cannot beat on the workloads it reports, and its repetitions are
summarised as medians with the prompt_aware / best-baseline ratio taken per repetition."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from typer.testing import CliRunner

from bench.scheduling import (
    WORKLOADS,
    EngineConfig,
    RunConfig,
    RunResult,
    Workload,
    arrivals,
    ideal_throughput,
    load_results,
    make_classes,
    markdown,
    summarize,
    sweep,
)
from orchestrator.scheduling import CACHE_AWARE, LEAST_LOADED, PROMPT_AWARE, PULL


def test_alto_bench_mounts_the_scheduling_benchmark() -> None:
    from app.cli import cli

    result = CliRunner().invoke(cli, ["bench", "scheduling", "--help"])
    assert result.exit_code == 0, result.output
    assert "--workloads" in result.output and "--policies" in result.output


def test_ideal_bound_falls_with_longer_outputs_and_smaller_batches() -> None:
    w = WORKLOADS[0]
    classes = make_classes(w)
    base = ideal_throughput(w, classes, EngineConfig())
    for c in classes:
        c.out_mean *= 2  # twice the decode work per request
    longer = ideal_throughput(w, classes, EngineConfig())
    assert longer < base
    assert ideal_throughput(w, make_classes(w), EngineConfig(capacity=8)) < base


# ------------------------------------------------------------------------------------------
# repetitions: per-repetition rows, medians and per-repetition ratios (constructed rows)
# ------------------------------------------------------------------------------------------

K16 = next(w for w in WORKLOADS if w.name == "skew-K16")
SLO = 5.0


def _staircase(policy: str, rep: int, last_ok: float) -> list[RunResult]:
    """A staircase that meets the SLO up to `last_ok` req/s, serving exactly what it is
    offered, then misses it at the next two rates (where a real staircase stops)."""
    rows = []
    misses = 0
    for rate in K16.rates:
        ok = rate <= last_ok
        rows.append(RunResult(
            workload=K16.name, policy=policy, rate=rate, transport="embedded",
            requests=int(10 * rate), measured=int(8 * rate), completed=int(8 * rate),
            throughput=float(rate), p50_s=1.0, p90_s=2.0, p99_s=SLO - 1 if ok else SLO + 3,
            mean_s=1.0, prefix_hit_rate=0.9 if policy == PROMPT_AWARE else 0.8,
            imbalance=1.1, stolen=0, replans=rep, cpu_share=0.3, wall_s=8.0, duplicates=0,
            slo_s=SLO, rep=rep,
        ))
        misses = 0 if ok else misses + 1
        if misses == 2:
            break
    return rows


# (rep -> last rate within the SLO) per policy: the ratio of the medians (125 / 100) is not
# the median of the per-repetition ratios (150/100, 100/75, 125/125 -> 1.33)
LAST_OK = {
    CACHE_AWARE: (100, 75, 125),
    LEAST_LOADED: (50, 50, 75),
    PROMPT_AWARE: (150, 100, 125),
}


def _rows(reps: int = 3) -> list[RunResult]:
    return [r for rep in range(reps) for p, last in LAST_OK.items()
            for r in _staircase(p, rep, last[rep])]


def test_summary_takes_medians_over_repetitions_and_the_ratio_within_each() -> None:
    s = summarize(_rows(), [K16])[K16.name]
    pa, ca = s["policies"][PROMPT_AWARE], s["policies"][CACHE_AWARE]
    assert pa["throughput_at_slo_reps"] == [150, 100, 125]
    assert (pa["throughput_at_slo"], pa["throughput_at_slo_min"], pa["throughput_at_slo_max"]) \
        == (125, 100, 150)
    assert (ca["throughput_at_slo"], ca["throughput_at_slo_min"], ca["throughput_at_slo_max"]) \
        == (100, 75, 125)
    # the step details are those of the repetition at the median (rep 2 for prompt_aware)
    assert pa["details_rep"] == 2 and pa["at_rate"] == 125
    assert ca["details_rep"] == 0 and ca["at_rate"] == 100
    v = s["verdict"]
    assert v["reps"] == 3
    assert v["best_baseline_per_rep"] == [CACHE_AWARE] * 3 and v["best_baseline"] == CACHE_AWARE
    assert v["speedup_per_rep"] == pytest.approx([1.5, 100 / 75, 1.0])
    assert v["speedup_vs_best_baseline"] == pytest.approx(100 / 75)  # not 125 / 100
    assert (v["speedup_min"], v["speedup_max"]) == pytest.approx((1.0, 1.5))
    assert v["hit_rate_prompt_aware"] == 0.9 and v["hit_rate_cache_aware"] == 0.8


def test_one_repetition_summarises_as_before() -> None:
    s = summarize(_rows(1), [K16])[K16.name]
    assert s["policies"][PROMPT_AWARE]["throughput_at_slo"] == 150
    assert s["verdict"]["speedup_vs_best_baseline"] == pytest.approx(1.5)
    assert s["verdict"]["reps"] == 1


def test_markdown_states_the_number_of_repetitions_and_a_row_per_repetition() -> None:
    info = {"cpus": 2}
    rows = _rows()
    md = markdown(summarize(rows, [K16]), rows, [K16], EngineConfig(), RunConfig(reps=3), [],
                  info, 60.0)
    assert "median over 3 repetitions" in md and "(3 reps)" in md
    assert "| 125.0 (100.0–150.0) |" in md  # prompt_aware: median (min–max)
    assert "1.33x (1.00–1.50) vs cache_aware" in md
    steps = [line for line in md.splitlines() if line.startswith(f"| {K16.name} | ")
             and line.count("|") == 12]  # the every-step table, with its rep column
    assert len(steps) == len(rows)
    assert {line.split(" | ")[1] for line in steps} == {"0", "1", "2"}
    single = _rows(1)
    md1 = markdown(summarize(single, [K16]), single, [K16], EngineConfig(), RunConfig(), [],
                   info, 60.0)
    assert "1 repetition:" in md1 and "| rep |" not in md1


def test_results_files_without_repetitions_read_as_repetition_zero() -> None:
    rows = _rows(1)
    data = {"results": [{k: v for k, v in asdict(r).items() if k != "rep"} for r in rows],
            "workloads": [asdict(K16)]}
    back, workloads = load_results(json.loads(json.dumps(data)))
    assert [r.rep for r in back] == [0] * len(rows) and workloads == [K16]
    assert summarize(back, workloads) == summarize(rows, [K16])


def test_repetition_zero_keeps_the_single_run_arrivals_and_others_differ() -> None:
    classes = make_classes(K16)
    one = arrivals(K16, classes, 50.0, 0.0, 1.0, 4.0, 3, 0)
    assert arrivals(K16, classes, 50.0, 0.0, 1.0, 4.0, 3, 0, rep=0) == one
    again = arrivals(K16, classes, 50.0, 0.0, 1.0, 4.0, 3, 0, rep=1)
    assert again == arrivals(K16, classes, 50.0, 0.0, 1.0, 4.0, 3, 0, rep=1)  # per policy
    assert [r.t for r in again] != [r.t for r in one]


async def test_a_tiny_sweep_runs_every_policy_once_per_repetition() -> None:
    """The real harness, two repetitions of a one-rate staircase: a row per (repetition,
    policy), and within a repetition every policy was offered the same requests."""
    w = Workload("tiny", 4, 1.0, (20.0,), prefix_tokens=(300, 400), out_mean=(4.0, 8.0))
    run = RunConfig(first_warmup_s=0.3, warmup_s=0.2, measure_s=0.6, tail_s=2.0, reps=2)
    rows = await sweep([w], [PULL, PROMPT_AWARE], EngineConfig(time_scale=0.2), run,
                       log=lambda *_: None)
    assert sorted((r.rep, r.policy) for r in rows) == sorted(
        (k, p) for k in range(2) for p in (PULL, PROMPT_AWARE))
    for k in range(2):
        assert len({r.requests for r in rows if r.rep == k}) == 1
    assert summarize(rows, [w])["tiny"]["verdict"]["reps"] == 2
