"""`alto bench ...` (also `python -m bench ...`): run a benchmark, write bench/results/ and
its section of BENCHMARKS.md.

Kept free of heavy imports at module level: `app.cli` mounts this group, and `alto run`
must not pay for matplotlib or the benchmark harness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmarks: runtime overhead, streaming vs barrier, scheduling, soak, "
                       "recovery, supervisor (see BENCHMARKS.md).")
console = Console(stderr=True)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"not a comma-separated list of numbers: {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise typer.BadParameter("rates must be positive")
    return rates


@app.command()
def overhead(
    messages: Annotated[int, typer.Option(help="inputs preloaded for the one-worker rate")] = 20_000,
    chain_runs: Annotated[int, typer.Option(help="runs preloaded for the chain rate")] = 5_000,
    stages: Annotated[int, typer.Option(help="length of the instant-tool chain")] = 3,
    latency_runs: Annotated[int, typer.Option(help="sequential runs for unloaded latency")] = 500,
    loaded_fraction: Annotated[float, typer.Option(help="loaded latency at this share of the "
                                                        "chain's rate (0 = skip)")] = 0.3,
    loaded_seconds: Annotated[float, typer.Option(help="duration of the loaded phase")] = 5.0,
    redis_requests: Annotated[int, typer.Option(help="redis-benchmark -n")] = 200_000,
    redis_clients: Annotated[int, typer.Option(help="redis-benchmark -c")] = 50,
    concurrency: Annotated[int, typer.Option(help="stage concurrency of the tool stages")] = 64,
    sync_tools: Annotated[bool, typer.Option(help="plain functions (thread hop)")] = False,
    profile: Annotated[bool, typer.Option(help="py-spy a second one-worker drain")] = False,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("bench/results"),
    markdown: Annotated[Path | None, typer.Option(help="file whose section to update")] = Path(
        "BENCHMARKS.md"),
    no_markdown: Annotated[bool, typer.Option("--no-markdown", help="do not touch it")] = False,
    tag: Annotated[str, typer.Option(help="name of the JSON file and markdown section")] = "overhead",
) -> None:
    """Message rate of one `alto worker` vs redis-benchmark XADD; per-hop latency."""
    from bench.overhead import OverheadConfig, main

    cfg = OverheadConfig(
        messages=messages, chain_runs=chain_runs, chain_stages=stages, latency_runs=latency_runs,
        loaded_fraction=loaded_fraction, loaded_seconds=loaded_seconds,
        redis_requests=redis_requests, redis_clients=redis_clients, concurrency=concurrency,
        sync_tools=sync_tools, profile=profile, out_dir=out,
        markdown=None if no_markdown else markdown, tag=tag,
    )
    r = main(cfg, log=lambda s: console.print(s))
    h = r["headline"]
    console.print(
        f"[bold]one worker[/bold] {h['one_worker_inputs_per_s']:,.0f} inputs/s = "
        f"{h['ratio_vs_P1']:.1%} of XADD -P1 ({h['redis_xadd_P1_per_s']:,.0f}/s) "
        f"{'[green]met[/green]' if h['ratio_target_met'] else '[red]target 30% missed[/red]'}; "
        f"hop p50 {h['hop_p50_ms']:.3f} ms p99 {h['hop_p99_ms']:.3f} ms "
        f"{'[green]met[/green]' if h['hop_target_met'] else '[red]target missed[/red]'}")
    console.print("wrote " + ", ".join(r["files"]))


@app.command()
def streaming(
    pipeline: Annotated[Path | None, typer.Option(help="pipeline YAML (default: FacTool on "
                                                      "the sim engine)")] = None,
    inputs: Annotated[Path | None, typer.Option(help=".jsonl with a `text` per line, or one "
                                                    "input per line")] = None,
    transport: Annotated[str, typer.Option(help="embedded | redis (with `alto worker`s)")]
    = "embedded",
    engine: Annotated[str | None, typer.Option(help="override the LM engine kind "
                                                    "(sim|local|openai|vllm)")] = None,
    engine_opt: Annotated[list[str] | None, typer.Option("--engine-opt", help="KEY=VALUE")]
    = None,
    rates: Annotated[str, typer.Option(help="offered loads, req/s, comma-separated")]
    = "4,8,12,16,20",
    duration: Annotated[float, typer.Option(help="measured arrivals per point (s)")] = 8.0,
    warmup: Annotated[float, typer.Option(help="unmeasured arrivals before them (s)")] = 3.0,
    requests: Annotated[int | None, typer.Option(help="instead: N arrivals, all measured")]
    = None,
    reps: Annotated[int, typer.Option(help="repetitions per point (medians reported)")] = 3,
    slo: Annotated[float, typer.Option(help="p99 latency SLO (s)")] = 4.0,
    time_scale: Annotated[float, typer.Option(help="sim: wall seconds per simulated second")]
    = 2.0,
    instances: Annotated[int | None, typer.Option(help="engine instances / workers per LM "
                                                       "stage")] = None,
    tool_workers: Annotated[int, typer.Option(help="redis: workers per tool/reduce stage")] = 1,
    concurrency: Annotated[int | None, typer.Option(help="override stage concurrency")] = None,
    partitions: Annotated[int | None, typer.Option(help="override aggregating stages' "
                                                        "partitions")] = None,
    fixed_rate: Annotated[float | None, typer.Option(help="compare p99 at this load")] = None,
    drain: Annotated[float, typer.Option(help="wait this long after the last arrival (s)")]
    = 12.0,
    prewarm: Annotated[float, typer.Option(help="unrecorded warm-up per mode (s)")] = 3.0,
    seed: Annotated[int, typer.Option(help="arrival/input seed")] = 7,
    fanout: Annotated[str, typer.Option(help="factool: request texts with FacTool KB-QA's "
                                              "claims per response; file: inputs as is")]
    = "factool",
    timeline: Annotated[int, typer.Option(help="embedded: profile this many lone requests "
                                                "per mode first (0: off)")] = 4,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("bench/results"),
    markdown: Annotated[Path | None, typer.Option(help="file whose section to update")] = Path(
        "BENCHMARKS.md"),
    no_markdown: Annotated[bool, typer.Option("--no-markdown", help="do not touch it")] = False,
    tag: Annotated[str | None, typer.Option(help="output name (default streaming_<transport>"
                                                 "[_<engine>])")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="log lines, no bar")]
    = False,
) -> None:
    """Open-loop Poisson load, streaming vs barrier on the same engines, any pipeline/engine."""
    from bench.streaming import StreamingConfig, main

    if transport not in ("embedded", "redis"):
        raise typer.BadParameter("--transport must be embedded or redis")
    defaults = StreamingConfig()
    cfg = StreamingConfig(
        pipeline=pipeline or defaults.pipeline, inputs=inputs or defaults.inputs,
        transport=transport, engine=engine, engine_opts=list(engine_opt or []),
        rates=_rates(rates), duration_s=duration, warmup_s=warmup, requests=requests, reps=reps,
        slo_s=slo, time_scale=time_scale, instances=instances, tool_workers=tool_workers,
        concurrency=concurrency, partitions=partitions, fixed_rate=fixed_rate, drain_s=drain,
        prewarm_s=prewarm, seed=seed, fanout=fanout, timeline=timeline, out_dir=out,
        markdown=None if no_markdown else markdown,
        tag=tag, progress=not no_progress,
    )
    r = main(cfg, log=lambda s: console.print(s))
    h = r["headline"]
    console.print(
        f"[bold]{r['name']}[/bold]: throughput at p99 ≤ {h['slo_s']:g}s "
        f"streaming/barrier = {h['throughput_ratio_at_slo']:.2f}x (target 3.5x); "
        f"p99 barrier/streaming at {h['fixed_rate']:g} req/s = "
        f"{h['p99_ratio_barrier_over_streaming']:.2f}x (target 2x)")
    console.print("wrote " + ", ".join(r["files"]))


@app.command()
def scheduling(
    quick: Annotated[bool, typer.Option("--quick", help="a short smoke run (no markdown)")]
    = False,
    redis: Annotated[bool, typer.Option("--redis", help="add a cross-check over Redis")] = False,
    workloads: Annotated[str, typer.Option(help="comma-separated workload names (default all)")]
    = "",
    policies: Annotated[str, typer.Option(help="comma-separated policies (default all)")] = "",
    time_scale: Annotated[float, typer.Option(help="sim: wall seconds per simulated second")]
    = 1.0,
    reps: Annotated[int, typer.Option(help="repetitions of every staircase, each on its own "
                                      "arrival seed (medians and min-max reported)")] = 1,
    no_markdown: Annotated[bool, typer.Option("--no-markdown", help="do not touch it")] = False,
    out: Annotated[Path, typer.Option(help="results file")] = Path(
        "bench/results/scheduling.json"),
    render_only: Annotated[Path | None, typer.Option("--render", help="only rewrite "
                                                     "BENCHMARKS.md from this results file")]
    = None,
) -> None:
    """Prompt-aware placement vs pull, round-robin, least-loaded and cache-aware routing."""
    from bench.scheduling import main

    argv = ["--workloads", workloads, "--policies", policies, "--time-scale", str(time_scale),
            "--reps", str(reps), "--out", str(out)]
    argv += ["--quick"] * quick + ["--redis"] * redis + ["--no-markdown"] * no_markdown
    if render_only is not None:
        argv += ["--render", str(render_only)]
    raise typer.Exit(main(argv))


@app.command()
def soak(
    duration: Annotated[float, typer.Option(help="seconds per phase (fault-free, faulty)")] = 60.0,
    probe: Annotated[float, typer.Option(help="seconds of closed-loop capacity probe")] = 15.0,
    load: Annotated[float, typer.Option(help="share of the measured capacity offered")] = 0.8,
    kill_every: Annotated[float, typer.Option(help="seconds between worker SIGKILLs")] = 6.0,
    no_redis_restart: Annotated[bool, typer.Option("--no-redis-restart")] = False,
    seed: Annotated[int, typer.Option(help="inputs and fault schedule")] = 7,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("bench/results"),
    markdown: Annotated[Path | None, typer.Option(help="file whose section to update")] = Path(
        "BENCHMARKS.md"),
    no_markdown: Annotated[bool, typer.Option("--no-markdown", help="do not touch it")] = False,
) -> None:
    """Faults under load: ~80% of capacity, periodic worker kills and a Redis restart."""
    from bench.soak import SoakConfig, main

    cfg = SoakConfig(duration_s=duration, probe_s=probe, load=load, kill_every_s=kill_every,
                     redis_restart=not no_redis_restart, seed=seed, out_dir=out,
                     markdown=None if no_markdown else markdown)
    r = main(cfg, log=lambda s: console.print(s))
    console.print(f"completed {r['completed']}, errored {r['errored']}, hung {r['hung']}, "
                  f"units lost {r['units_lost']}, duplicates {r['duplicate_units']}")
    console.print("wrote " + ", ".join(r["files"]))


@app.command()
def recovery(
    runs: Annotated[int, typer.Option(help="burst size; each of the 2 workers takes half")] = 64,
    reps: Annotated[int, typer.Option(help="alternating old/new trials per setting")] = 3,
    tokens: Annotated[int, typer.Option(help="tokens every sim call generates")] = 200,
    time_scale: Annotated[float, typer.Option(help="sim: wall seconds per simulated second")]
    = 1.0,
    claim_idle_ms: Annotated[str, typer.Option(help="ALTO_CLAIM_IDLE_MS settings, "
                                               "comma-separated")] = "30000,5000",
    heartbeat_ms: Annotated[int, typer.Option(help="ALTO_HEARTBEAT_MS")] = 1_000,
    codes: Annotated[str, typer.Option(help="old,new | new | old")] = "old,new",
    old_ref: Annotated[str, typer.Option(help="git commit of the old code")] = "e66af41",
    out: Annotated[Path, typer.Option(help="results folder")] = Path("bench/results"),
    markdown: Annotated[Path | None, typer.Option(help="file whose section to update")] = Path(
        "BENCHMARKS.md"),
    no_markdown: Annotated[bool, typer.Option("--no-markdown", help="do not touch it")] = False,
    tag: Annotated[str, typer.Option(help="name of the result files and section")] = "recovery",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="log lines, no bar")]
    = False,
) -> None:
    """A worker SIGKILLed holding a full batch: time until its runs finish, old vs new code."""
    from bench.recovery import RecoveryConfig, main

    idles = [int(r) for r in _rates(claim_idle_ms)]
    picked = [c for c in codes.replace(" ", "").split(",") if c]
    if not picked or set(picked) - {"old", "new"}:
        raise typer.BadParameter("--codes takes old and/or new")
    cfg = RecoveryConfig(runs=runs, reps=reps, tokens=tokens, time_scale=time_scale,
                         claim_idle_ms=idles, heartbeat_ms=heartbeat_ms, codes=picked,
                         old_ref=old_ref, out_dir=out, markdown=None if no_markdown else markdown,
                         tag=tag, progress=not no_progress)
    r = main(cfg, log=lambda s: console.print(s))
    for row in r["aggregate"]:
        console.print(f"claim_idle {row['claim_idle_ms']} ms {row['code']}: held "
                      f"{row['held']:g}, recovered in {row['recover_s']} s (median), peak "
                      f"{row['peak_rerunning']:g} at once, all ok {row['all_ok']}")
    console.print("wrote " + ", ".join(r["files"]))


@app.command()
def supervisor(
    runs: Annotated[str, typer.Option(help="watched runs per trial, comma-separated")]
    = "64,256,1024",
    reps: Annotated[int, typer.Option(help="alternating reps of each way of reading")] = 5,
    idle_s: Annotated[float, typer.Option(help="seconds of the real supervisor per trial")]
    = 5.0,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("bench/results"),
    markdown: Annotated[Path | None, typer.Option(help="file whose section to update")] = Path(
        "BENCHMARKS.md"),
    no_markdown: Annotated[bool, typer.Option("--no-markdown", help="do not touch it")] = False,
) -> None:
    """The gateway's cost of watching runs nobody follows: run-by-run vs bulk log reads."""
    from bench.supervisor_sweep import SweepConfig, main

    counts = [int(r) for r in _rates(runs)]
    cfg = SweepConfig(runs=counts, reps=reps, idle_s=idle_s, out_dir=out,
                      markdown=None if no_markdown else markdown)
    r = main(cfg, log=lambda s: console.print(s))
    console.print("wrote " + ", ".join(r["files"]))


@app.command("hop-ab")
def hop_ab(
    base_ref: Annotated[str, typer.Argument(help="git revision of the baseline's workers")],
    blocks: Annotated[int, typer.Option(help="alternating blocks of sequential runs")] = 24,
    per_block: Annotated[int, typer.Option(help="sequential runs per block")] = 25,
    rounds: Annotated[int, typer.Option(help="alternating preloaded drains")] = 4,
    drain_runs: Annotated[int, typer.Option(help="runs preloaded per drain")] = 1_500,
    out: Annotated[Path | None, typer.Option(help="JSON file for the results")] = None,
) -> None:
    """Hop latency and chain throughput, a git revision against this checkout, interleaved
    in one run (both sides see the same machine noise)."""
    from bench.hop_ab import HopABConfig, main

    main(HopABConfig(base_ref=base_ref, blocks=blocks, per_block=per_block, rounds=rounds,
                     drain_runs=drain_runs, out=out), log=lambda s: console.print(s))


@app.command()
def render(
    results: Annotated[list[Path], typer.Argument(help="bench/results/*.json files")],
    markdown: Annotated[Path, typer.Option(help="file whose sections to update")] = Path(
        "BENCHMARKS.md"),
) -> None:
    """Rewrite BENCHMARKS.md sections (and plots) from saved results, without re-running."""
    import json

    from bench.common import restore, update_markdown

    for path in results:
        data = restore(json.loads(path.read_text()))
        kind = data.get("benchmark")
        if kind == "streaming":
            from bench.plot import plot_streaming
            from bench.streaming import StreamingConfig, headline
            from bench.streaming import render_markdown as render_streaming

            c = data["config"]  # recompute: the headline rules may be newer than the file
            data["headline"] = headline(
                StreamingConfig(slo_s=c["slo_s"], fixed_rate=c["fixed_rate"]), data["aggregate"])

            png = plot_streaming(data, path.with_suffix(".png"))
            update_markdown(markdown, data["name"], render_streaming(data, [path, png]),
                            title=f"Streaming vs barrier: {data['name']}")
        elif kind == "overhead":
            from bench.overhead import render_markdown as render_overhead

            update_markdown(markdown, data["config"]["tag"], render_overhead(data),
                            title="Runtime overhead")
        else:
            raise typer.BadParameter(f"{path}: not a benchmark result")
        console.print(f"rendered {path}")
