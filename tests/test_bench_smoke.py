"""The benchmarks, run in tiny configurations: they finish, every request they send
completes, and the files they write have the structure BENCHMARKS.md and the plots rely on.

No timing assertions (speed is what the benchmarks report, not what tests check); the
deadlines given to the runs are generous bounds, not expectations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from bench.common import percentile, section_markers, update_markdown
from bench.overhead import OverheadConfig, Trace, hops_of, run_overhead, top_functions
from bench.streaming import (
    FACTOOL_KBQA_CLAIMS,
    StreamingConfig,
    arrivals,
    headline,
    load_inputs,
    run_streaming,
    sentence_pool,
    slo_capacity,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _check_streaming(data: dict[str, Any], requests: int) -> None:
    assert data["benchmark"] == "streaming"
    assert {"headline", "aggregate", "points", "config", "machine", "workload"} <= set(data)
    assert {p["mode"] for p in data["points"]} == {"streaming", "barrier"}
    for p in data["points"]:
        assert p["measured"] == requests
        assert p["completed"] == requests, p.get("error_samples")
        assert set(p["latency"]) == {"p50", "p95", "p99", "mean"}
        assert set(p["ttfp"]) == {"p50", "p95", "p99"}
        assert math.isfinite(p["latency"]["p99"]) and p["latency"]["p99"] > 0
        # every stage of the pipeline emitted something for every request
        assert all(math.isfinite(v) for v in p["first_partial_by_stage_p50"].values())
    assert {r["mode"] for r in data["aggregate"]} == {"streaming", "barrier"}
    h = data["headline"]
    assert {"throughput_ratio_at_slo", "p99_ratio_barrier_over_streaming",
            "slo_throughput", "fixed_rate"} <= set(h)


def test_streaming_embedded_via_cli(tmp_path: Path) -> None:
    """`alto bench streaming` end to end (embedded, sim engine at 20x real time)."""
    from app.cli import cli

    md = tmp_path / "BENCH.md"
    md.write_text("# mine\n\nother text stays\n")
    res = CliRunner().invoke(cli, [
        "bench", "streaming", "--rates", "20", "--requests", "3", "--reps", "1",
        "--time-scale", "0.05", "--prewarm", "0", "--drain", "4000", "--out", str(tmp_path),
        "--markdown", str(md), "--tag", "smoke", "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    _check_streaming(_json(tmp_path / "smoke.json"), 3)
    assert (tmp_path / "smoke.png").read_bytes()[:8] == PNG
    text = md.read_text()
    begin, end = section_markers("smoke")
    assert "other text stays" in text and text.count(begin) == 1 and text.count(end) == 1
    assert "| offered req/s | mode |" in text


@pytest.mark.redis
@pytest.mark.slow
async def test_streaming_redis_workers(tmp_path: Path) -> None:
    """Over Redis with real `alto worker` processes (one per stage and mode)."""
    cfg = StreamingConfig(transport="redis", rates=[20.0], requests=2, reps=1, time_scale=0.05,
                          instances=1, prewarm_s=0, drain_s=4000, out_dir=tmp_path,
                          markdown=None, tag="smoke_redis", progress=False)
    await run_streaming(cfg, log=lambda s: None)
    _check_streaming(_json(tmp_path / "smoke_redis.json"), 2)


@pytest.mark.redis
@pytest.mark.slow
async def test_overhead_smoke(tmp_path: Path) -> None:
    md = tmp_path / "BENCH.md"
    cfg = OverheadConfig(messages=200, chain_runs=30, latency_runs=5, loaded_seconds=0.5,
                         redis_requests=2000, out_dir=tmp_path, markdown=md, tag="ovh")
    await run_overhead(cfg, log=lambda s: None)
    data = _json(tmp_path / "ovh.json")
    assert data["redis_benchmark"]["P1"]["rps"] > 0 and data["redis_benchmark"]["P16"]["rps"] > 0
    assert data["one_worker"]["inputs"] == 200 and data["one_worker"]["inputs_per_s"] > 0
    # the runtime's Redis traffic per input, as counted by the server
    assert data["one_worker"]["redis_commands_per_input"]["xack"] == pytest.approx(1.0)
    hops = data["latency"]["unloaded"]["hops"]
    assert {"client->s1", "s1->s2", "s2->s3", "s3->result", "end_to_end"} <= set(hops)
    assert all(v["n"] == 5 for v in hops.values())
    assert data["latency"]["loaded"]["runs"] >= 0
    assert {"ratio_vs_P1", "hop_p50_ms", "hop_p99_ms", "ratio_target_met"} <= set(data["headline"])
    assert section_markers("ovh")[0] in md.read_text()


@pytest.mark.redis
@pytest.mark.slow
def test_recovery_smoke(tmp_path: Path) -> None:
    """`alto bench recovery` on the new code only: a SIGKILLed worker's entries are taken
    over and every run completes exactly once (a 1 s member TTL keeps it short)."""
    from app.cli import cli

    res = CliRunner().invoke(cli, [
        "bench", "recovery", "--runs", "8", "--reps", "1", "--codes", "new",
        "--claim-idle-ms", "30000", "--heartbeat-ms", "200", "--time-scale", "0.5",
        "--no-markdown", "--out", str(tmp_path), "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    data = _json(tmp_path / "recovery.json")
    assert data["codes"]["new"]["has_member_takeover"] is True
    (tr,) = data["trials"]
    assert tr["code"] == "new" and tr["held"] >= 1
    assert tr["completed"] == 8 and tr["wrong_or_duplicated"] == []
    assert tr["left_in_stream"] == {"pending": 0, "lag": 0} and tr["dead_letters"] == 0
    # every entry the dead worker held was claimed by the survivor and its run finished
    assert len(tr["victim_done_s"]) == tr["held"] and tr["max_deliveries"] >= 2
    assert tr["peak_rerunning"] >= 1 and tr["ok"] is True
    assert (tmp_path / "recovery.png").read_bytes()[:8] == PNG


@pytest.mark.redis
def test_hop_ab_smoke(tmp_path: Path) -> None:
    """`alto bench hop-ab REV`: the baseline's workers run from the revision's files, the
    other side's from this checkout, and every run of both sides is measured."""
    from app.cli import cli

    res = CliRunner().invoke(cli, [
        "bench", "hop-ab", "HEAD", "--blocks", "2", "--per-block", "3", "--rounds", "2",
        "--drain-runs", "20", "--out", str(tmp_path / "ab.json"),
    ])
    assert res.exit_code == 0, res.output
    data = _json(tmp_path / "ab.json")
    for side in ("base", "new"):
        # 2 blocks x 3 runs on each side, 2 worker-to-worker hops per run of 3 stages
        assert data[side]["hops"] == 12
        assert len(data[side]["drains_runs_per_s"]) == 2
        # each drain was timed to its end: its 20 runs' 60 entries (1 unit + 2 end markers
        # each) read by the last stage, and nothing left in its stream
        assert data[side]["read_per_drain"] == [60, 60]
        assert data[side]["left_after_drains"] == [0, 0]
        assert 0 < data[side]["hop_p50_ms"] <= data[side]["hop_p99_ms"]


# ---- pure helpers ------------------------------------------------------------------------


def test_arrivals_depend_on_seed_rate_rep_only() -> None:
    texts = load_inputs(StreamingConfig().inputs)
    cfg = StreamingConfig(warmup_s=2.0, duration_s=10.0)
    a, b = arrivals(cfg, 5.0, 0, texts), arrivals(cfg, 5.0, 0, texts)
    assert a == b and a  # replayed identically for both modes
    assert a != arrivals(cfg, 5.0, 1, texts)
    assert all(x.measured == (x.at_s > 2.0) for x in a)
    assert all(x.at_s <= 12.0 for x in a)
    n = arrivals(StreamingConfig(requests=7), 5.0, 0, texts)
    assert len(n) == 7 and all(x.measured for x in n)


def _row(mode: str, rate: float, thr: float, p99: float, done: float = 1.0) -> dict[str, Any]:
    return {"mode": mode, "rate": rate, "throughput": thr, "completed_share": done,
            "latency": {"p50": p99 / 2, "p95": p99, "p99": p99}, "ttfp": {"p50": 0.1}}


def test_headline_uses_only_points_within_slo() -> None:
    agg = [_row("streaming", 4, 4.0, 1.0), _row("barrier", 4, 4.0, 2.0),
           _row("streaming", 8, 7.9, 3.0), _row("barrier", 8, 7.5, 9.0),
           _row("streaming", 12, 9.0, 3.5, done=0.9), _row("barrier", 12, 8.0, math.inf)]
    h = headline(StreamingConfig(slo_s=4.0), agg)
    s, b = h["slo_throughput"]["streaming"], h["slo_throughput"]["barrier"]
    # streaming: 12 had unfinished runs, so no interpolation past 8
    assert (s["rate"], s["rate_interpolated"], s["throughput"]) == (8, 8, 7.9)
    # barrier: p99 crosses 4 s between 4 (2 s) and 8 (9 s): 4 + 2/7 * 4
    assert (b["rate"], b["throughput"]) == (4, 4.0)
    assert b["rate_interpolated"] == pytest.approx(4 + 4 * 2 / 7)
    assert h["throughput_ratio_at_slo"] == pytest.approx(8 / (4 + 4 * 2 / 7))
    assert h["fixed_rate"] == 4  # barrier's own SLO load
    assert h["p99_ratio_barrier_over_streaming"] == pytest.approx(2.0)


def test_slo_capacity_stops_at_the_first_failure() -> None:
    """A pass above a failing rate is noise, not capacity; all passing is a lower bound."""
    cfg = StreamingConfig(slo_s=4.0)
    rows = [_row("barrier", 4, 4.0, 1.0), _row("barrier", 8, 7.0, 5.0),
            _row("barrier", 12, 11.0, 3.0)]
    c = slo_capacity(cfg, rows)
    assert c["rate"] == 4 and c["first_failing_rate"] == 8 and not c["at_sweep_edge"]
    assert c["rate_interpolated"] == pytest.approx(4 + 4 * 3 / 4)
    c = slo_capacity(cfg, rows[:1])
    assert c["rate_interpolated"] == 4 and c["at_sweep_edge"]
    c = slo_capacity(cfg, [_row("barrier", 4, 4.0, 6.0)])
    assert c["rate"] is None and c["rate_interpolated"] == 0.0


def test_factool_fanout_follows_the_kbqa_distribution() -> None:
    texts = load_inputs(StreamingConfig().inputs)
    a = arrivals(StreamingConfig(requests=400), 5.0, 0, texts)
    assert a == arrivals(StreamingConfig(requests=400), 5.0, 0, texts)
    sizes = [len(sentence_pool([x.text])[0]) for x in a]
    assert set(sizes) <= set(FACTOOL_KBQA_CLAIMS)
    mean = sum(k * n for k, n in FACTOOL_KBQA_CLAIMS.items()) / sum(FACTOOL_KBQA_CLAIMS.values())
    assert mean == pytest.approx(4.68)
    assert abs(sum(sizes) / len(sizes) - mean) < 0.5
    plain = arrivals(StreamingConfig(requests=50, fanout="file"), 5.0, 0, texts)
    assert all(x.text in texts for x in plain)


def test_hops_of_and_percentiles() -> None:
    ms = 1_000_000
    tr = Trace(t_pub=0, t_done=10 * ms, stamps=[("s1", 1 * ms, 2 * ms), ("s2", 5 * ms, 5 * ms),
                                                ("s3", 6 * ms, 7 * ms)])
    h = hops_of([tr])
    assert h == {"client->s1": [1.0], "s1->s2": [3.0], "s2->s3": [1.0], "s3->result": [3.0],
                 "end_to_end": [10.0]}
    assert percentile([1.0, 2.0, 3.0, math.inf], 50) == 2.5
    assert percentile([1.0, math.inf], 99) == math.inf
    assert math.isnan(percentile([], 50))


def test_top_functions_from_collapsed_stacks() -> None:
    raw = ("main (a.py:1);work (b.py:2);send (c.py:3) 6\n"
           "main (a.py:1);work (b.py:9) 4\n")
    t = top_functions(raw)
    assert t["total_samples"][0]["samples"] == 10
    incl = {r["function"]: r["share"] for r in t["inclusive"]}
    selfs = {r["function"]: r["share"] for r in t["self"]}
    assert incl["main (a.py)"] == 1.0 and incl["work (b.py)"] == 1.0
    assert selfs["send (c.py)"] == 0.6 and selfs["work (b.py)"] == 0.4


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>\r"),
               max_size=200)


@given(before=_text, after=_text, body1=_text, body2=_text)
def test_update_markdown_replaces_only_its_section(
    tmp_path_factory: pytest.TempPathFactory, before: str, after: str, body1: str, body2: str
) -> None:
    path = tmp_path_factory.mktemp("md") / "B.md"
    update_markdown(path, "other", "OTHER")
    text = path.read_text()
    path.write_text(before + "\n" + text + "\n" + after)
    update_markdown(path, "x", body1 or "-")
    update_markdown(path, "x", body2 or "-")
    out = path.read_text()
    begin, end = section_markers("x")
    assert out.count(begin) == 1 and out.count(end) == 1
    assert (body2 or "-").rstrip() in out
    assert section_markers("other")[0] + "\nOTHER\n" + section_markers("other")[1] in out
    assert before.rstrip() in out and after.rstrip() in out
