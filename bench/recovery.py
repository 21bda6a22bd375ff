"""Recovery: an LM worker dies holding a full batch; how long until its requests finish?

What is measured (one *trial*): a throw-away redis-server, one `lm` stage on the `sim`
engine (every call generates exactly `tokens` tokens, so every call costs the same), two
real `alto worker` processes for it, each with `runs / 2` slots. A burst of `runs` runs is
submitted; once every entry has been delivered and the calls are under way, the worker
holding the most entries is SIGKILLed and not restarted. From the kill on, the driver
samples the stage's pending list (XPENDING: who holds which entry) and follows every run's
events, and reports:

- `held`: entries pending under the dead worker right after the kill (its batch);
- `detect_s`: kill -> first of them seen claimed by the survivor (sampling resolution);
- `recover_s`: kill -> the last of the dead worker's runs delivered its `result` event;
- `peak_rerunning`: most of them at once claimed by the survivor and not yet acknowledged,
  i.e. re-running there (the runner acknowledges an entry when its call's last unit is
  committed; sampled, so a peak shorter than the sampling interval can be missed);
- exactly-once checks: every run ended with one `result` event whose units equal a
  fault-free embedded run of the same input, nothing is left pending or unread in the
  stage's stream, and the dead-letter stream is empty.

Why an A/B in one run: the question is what commit 0a117f7 ("Recovery": take over a dead
worker's entries once its membership expires, and re-run entries delivered once together)
changed, and on a shared 2-core machine only alternating trials of the old and the new code
in the same run are comparable. The old code is `git archive`d from `old_ref` into a temp
dir and the old trials' workers import alto from there (PYTHONPATH and cwd); the driver,
the pipeline file and the settings are the same for both.

Why two settings: with the defaults (`claim_idle_ms` 30 s, `heartbeat_ms` 1 s) the old code
waits for the idle sweep while the new one moves after the member TTL (5 heartbeats), so
both changes show at once; with `claim_idle_ms` 5 s detection is about equal and the
difference left is the serial vs parallel re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    CpuMeter,
    fault_free_units,
    fnum,
    machine,
    median,
    redis_server,
    source_tree,
    update_markdown,
    write_json,
    write_spec,
)
from bench.procs import Worker, WorkerProcs
from orchestrator.spec import PipelineSpec, parse_pipeline

SECTION = "recovery"
TITLE = "Recovery: a worker dies holding a full batch"
STAGE = "lm"
CODES = ("old", "new")
Log = Callable[[str], None]


@dataclass
class RecoveryConfig:
    runs: int = 64
    reps: int = 3
    tokens: int = 200  # every call generates exactly this many tokens
    capacity: int = 64  # the sim engine's batch
    concurrency: int | None = None  # slots per worker; default runs / 2 (both hold a batch)
    time_scale: float = 1.0  # sim: wall seconds per simulated second
    claim_idle_ms: list[int] = field(default_factory=lambda: [30_000, 5_000])
    heartbeat_ms: int = 1_000
    codes: list[str] = field(default_factory=lambda: list(CODES))
    old_ref: str = "e66af41"
    kill_after_s: float | None = None  # after all entries are delivered; default 40% of a call
    sample_ms: int = 50
    run_deadline_s: float = 300.0
    out_dir: Path = field(default_factory=lambda: REPO / "bench" / "results")
    markdown: Path | None = REPO / "BENCHMARKS.md"
    tag: str = SECTION
    progress: bool = True

    @property
    def slots(self) -> int:
        return self.concurrency or max(1, self.runs // 2)

    def call_s(self, batch: int) -> float:
        """Wall seconds of one call at `batch` sequences (decode steps only: prompts are short)."""
        from workers.engines.sim import CALIBRATION

        step_ms = CALIBRATION.decode_base_ms + CALIBRATION.decode_per_seq_ms * batch
        return self.tokens * step_ms / 1000 * self.time_scale

    @property
    def kill_after(self) -> float:
        return self.kill_after_s if self.kill_after_s is not None else 0.4 * self.call_s(
            self.slots)


# ---- the workload -------------------------------------------------------------------------


def recovery_spec(cfg: RecoveryConfig, time_scale: float | None = None) -> PipelineSpec:
    """One LM stage, sentences out (so a resumed call's units are checked one by one)."""
    return parse_pipeline({
        "name": "recovery",
        "engines": {"default": {"kind": "sim", "capacity": cfg.capacity,
                                "time_scale": cfg.time_scale if time_scale is None
                                else time_scale,
                                "min_tokens": cfg.tokens}},
        "stages": [
            {"name": STAGE, "kind": "lm", "framing": "sentences", "max_tokens": cfg.tokens,
             "prompt": "Write about {input}:", "concurrency": cfg.slots},
        ],
    })


def inputs(n: int) -> list[str]:
    return [f"topic number {i}" for i in range(n)]


# ---- code trees ---------------------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()


@contextlib.contextmanager
def code_trees(cfg: RecoveryConfig) -> Iterator[dict[str, dict[str, Any]]]:
    """{"new": this checkout, "old": `old_ref` extracted (`source_tree`)} (only those in
    `cfg.codes`), each with the commit and whether its workers really import their tree."""
    trees: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if "new" in cfg.codes:
            dirty = _git("status", "--porcelain", "--", "workers", "orchestrator", "app")
            trees["new"] = {"dir": REPO, "commit": _git("rev-parse", "HEAD"),
                            "uncommitted_runtime_changes": bool(dirty)}
        if "old" in cfg.codes:
            tmp = stack.enter_context(source_tree(cfg.old_ref))
            trees["old"] = {"dir": tmp, "commit": _git("rev-parse", cfg.old_ref),
                            "uncommitted_runtime_changes": False}
        for tree in trees.values():
            tree.update(_probe(tree["dir"]))
        yield trees


def _probe(code_dir: Path) -> dict[str, Any]:
    """Which runner a worker started there imports, and whether it has the new takeover:
    the A/B is void if both sides silently load the same code (an installed copy wins)."""
    probe = ("import workers.runner as r; "
             "print(r.__file__); print(hasattr(r.StageRunner, '_recover'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=code_dir, check=True, text=True,
                         capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(code_dir)}).stdout.split()
    return {"runner_file": out[0], "has_member_takeover": out[1] == "True"}


# ---- one trial ----------------------------------------------------------------------------


@dataclass
class _Run:
    run: str
    text: str
    results: int = 0
    errors: int = 0
    units: list[Any] | None = None
    done_at: float | None = None


async def _follow(t: Any, spec: PipelineSpec, r: _Run, deadline_s: float) -> None:
    from workers.client import follow_run

    with contextlib.suppress(TimeoutError):
        async for _, ev in follow_run(t, spec, r.run, deadline_s=deadline_s):
            if ev["type"] == "result":
                r.results += 1
                r.units, r.done_at = ev["units"], time.monotonic()
            elif ev["type"] == "error":
                r.errors += 1
                r.done_at = time.monotonic()


async def _held(t: Any, stream: str, group: str) -> dict[str, int]:
    """How many entries each consumer holds pending on the stage's stream."""
    return (await t.pending_consumers([stream], group)).get(stream, {})


def _owner(consumer: str, workers: list[Worker]) -> Worker | None:
    """The process behind a consumer name (`host-pid-stage-index-uuid`, workers/runtime.py)."""
    for w in workers:
        if f"-{w.pid}-{STAGE}-" in consumer:
            return w
    return None


async def trial(cfg: RecoveryConfig, code: str, code_dir: Path, claim_idle_ms: int,
                spec: PipelineSpec, spec_file: Path, expected: dict[str, list[Any]],
                logdir: Path) -> dict[str, Any]:
    """Start two workers of `code`, submit the burst, kill the busier worker, measure."""
    from orchestrator.envelope import Envelope
    from orchestrator.routing import stage_group, stage_streams
    from workers.client import start_run
    from workers.redis_transport import RedisTransport
    from workers.runner import dead_letter_stream

    group = stage_group(spec.name, STAGE)
    (stream,) = stage_streams(spec, STAGE)
    env = {"ALTO_CLAIM_IDLE_MS": str(claim_idle_ms), "ALTO_HEARTBEAT_MS": str(cfg.heartbeat_ms),
           "ALTO_SIM_TIME_SCALE": str(cfg.time_scale)}
    began = time.monotonic()
    with redis_server() as server:
        procs = WorkerProcs(server.url, spec_file, env, logdir=logdir, code_dir=code_dir)
        t = RedisTransport(server.url, max_connections=4 * cfg.runs + 64)
        followers: list[asyncio.Task[None]] = []
        try:
            workers = procs.start(STAGE, 2)
            await procs.wait_ready(t, timeout_s=120)
            runs = [_Run(await start_run(t, spec, x), x) for x in inputs(cfg.runs)]
            followers[:] = [asyncio.create_task(_follow(t, spec, r, cfg.run_deadline_s))
                         for r in runs]
            # every entry delivered (each worker takes at most its slots)
            deadline = time.monotonic() + 60
            while sum((await _held(t, stream, group)).values()) < cfg.runs:
                if time.monotonic() > deadline:
                    raise TimeoutError("the burst was not fully delivered within 60 s")
                await asyncio.sleep(0.01)  # delivery has no event to await; bounded above
            await asyncio.sleep(cfg.kill_after)  # part of the workload: kill mid-call
            held_by = await _held(t, stream, group)
            consumer = max(held_by, key=lambda c: held_by[c])
            victim = _owner(consumer, workers)
            if victim is None:
                raise RuntimeError(f"no worker process behind consumer {consumer!r}")
            survivor = next(w for w in workers if w is not victim)
            meter = CpuMeter({"survivor": survivor.pid, "redis": server.pid,
                              "driver": os.getpid()})
            meter.begin()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(timeout=10)
            killed = time.monotonic()
            # what it held at death: nothing moves until a survivor claims it (seconds away)
            mine = {p.entry_id: p for p in await t.pending(stream, group, 10 * cfg.runs,
                                                           consumer=consumer)}
            run_of: dict[str, str] = {}
            for eid in mine:
                rows = await t._r.xrange(t._stream_key(stream), eid, eid)
                run_of[eid] = Envelope.from_json(rows[0][1]["e"]).run
            victim_runs = {r.run: r for r in runs if r.run in set(run_of.values())}

            # from the kill on: who holds the dead worker's entries, until all its runs end
            samples: list[list[float]] = []  # [t, claimed and pending (re-running), done]
            first_claim: float | None = None
            peak = 0
            max_deliveries = 1
            end = killed + cfg.run_deadline_s
            while time.monotonic() < end:
                pend = {p.entry_id: p for p in await t.pending(stream, group, 10 * cfg.runs)}
                now = time.monotonic() - killed
                moved = [pend[e] for e in mine if e in pend and pend[e].consumer != consumer]
                gone = [e for e in mine if e not in pend]
                if first_claim is None and (moved or gone):
                    first_claim = now
                max_deliveries = max([max_deliveries, *(p.deliveries for p in moved)])
                done = sum(r.done_at is not None for r in victim_runs.values())
                if not samples or samples[-1][1:] != [len(moved), done]:
                    samples.append([round(now, 3), len(moved), done])
                peak = max(peak, len(moved))
                if done == len(victim_runs):
                    break
                await asyncio.sleep(cfg.sample_ms / 1000)
            cpu = meter.end()
            await asyncio.gather(*followers)

            # exactly once: one result per run, its units those of a fault-free run
            wrong = [r.run for r in runs if r.results != 1 or r.errors
                     or r.units != expected[r.text]]
            left = None
            for _ in range(100):  # the last acks may trail the result events by a moment
                st = await t.stats(stream, group)
                left = {"pending": st.pending, "lag": st.lag}
                if not st.pending and not st.lag:
                    break
                await asyncio.sleep(0.05)
            dead = int(await t._r.xlen(t._stream_key(dead_letter_stream(spec.name))))
        finally:
            for f in followers:
                f.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
            procs.stop(timeout_s=15)
            await t.close()

    victim_done = sorted(r.done_at - killed for r in victim_runs.values()
                         if r.done_at is not None)
    survivor_done = [r.done_at - killed for r in runs
                     if r.run not in victim_runs and r.done_at is not None]
    return {
        "code": code,
        "claim_idle_ms": claim_idle_ms,
        "held": len(mine),
        "held_by_consumer_at_kill": sorted(held_by.values(), reverse=True),
        "detect_s": first_claim,
        "recover_s": victim_done[-1] if len(victim_done) == len(victim_runs) else None,
        "first_rerun_done_s": victim_done[0] if victim_done else None,
        "peak_rerunning": peak,
        "max_deliveries": max_deliveries,
        "victim_done_s": [round(x, 3) for x in victim_done],
        "survivor_last_done_s": max(survivor_done) if survivor_done else None,
        "samples": samples,
        "completed": sum(r.results == 1 and not r.errors for r in runs),
        "wrong_or_duplicated": wrong,
        "left_in_stream": left,
        "dead_letters": dead,
        "ok": not wrong and left == {"pending": 0, "lag": 0} and dead == 0
              and len(victim_done) == len(victim_runs),
        "cpu": cpu,
        "wall_s": time.monotonic() - began,
    }


# ---- the A/B -------------------------------------------------------------------------------


async def run_recovery(cfg: RecoveryConfig, log: Log = print) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    spec = recovery_spec(cfg)
    expected = await fault_free_units(recovery_spec(cfg, time_scale=0.0), inputs(cfg.runs))
    workdir = Path(tempfile.mkdtemp(prefix="alto-bench-recovery-"))
    spec_file = write_spec(spec, workdir / "recovery.yaml")
    trials: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    started = time.monotonic()
    try:
        with code_trees(cfg) as trees:
            for code, tree in trees.items():
                log(f"{code}: {tree['commit'][:10]} runner {tree['runner_file']} "
                    f"(member takeover: {tree['has_member_takeover']})")
            total = cfg.reps * len(cfg.claim_idle_ms) * len(trees)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), disable=not cfg.progress) as bar:
                task = bar.add_task("recovery", total=total)
                for rep in range(cfg.reps):
                    for idle in cfg.claim_idle_ms:
                        order = list(trees) if rep % 2 == 0 else list(reversed(trees))
                        for code in order:
                            bar.update(task, description=f"{code} claim_idle {idle} ms "
                                                         f"rep {rep + 1}")
                            tr = await trial(cfg, code, trees[code]["dir"], idle, spec,
                                             spec_file, expected, workdir)
                            tr["rep"] = rep
                            trials.append(tr)
                            bar.advance(task)
                            if not cfg.progress:
                                log(f"{code} claim_idle {idle} rep {rep}: held {tr['held']} "
                                    f"detect {fnum(tr['detect_s'])} s recover "
                                    f"{fnum(tr['recover_s'])} s peak {tr['peak_rerunning']} "
                                    f"ok {tr['ok']}")
            code_info = {c: {k: str(v) if isinstance(v, Path) else v for k, v in tree.items()
                             if k != "dir"} for c, tree in trees.items()}
    except BaseException:
        logs = sorted(workdir.glob("worker-*.log"))
        if logs:
            log(f"last worker log {logs[-1]}:\n" + logs[-1].read_text(errors="replace")[-3000:])
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "recovery",
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "call_s": {"batch_1": cfg.call_s(1), f"batch_{cfg.slots}": cfg.call_s(cfg.slots)},
        "kill_after_s": cfg.kill_after,
        "codes": code_info,
        "trials": trials,
        "aggregate": aggregate(trials),
        "load": {"loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                 "others_cores_median": median([tr["cpu"].get("others_cores", 0.0)
                                                for tr in trials])},
        "wall_s": time.monotonic() - started,
    }


def aggregate(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (setting, code), and min-max, over the reps."""
    out = []
    keys = sorted({(tr["claim_idle_ms"], tr["code"]) for tr in trials},
                  key=lambda k: (-k[0], CODES.index(k[1]) if k[1] in CODES else 9))
    for idle, code in keys:
        ts = [tr for tr in trials if (tr["claim_idle_ms"], tr["code"]) == (idle, code)]
        row: dict[str, Any] = {"claim_idle_ms": idle, "code": code, "reps": len(ts),
                               "all_ok": all(tr["ok"] for tr in ts)}
        for k in ("held", "detect_s", "recover_s", "first_rerun_done_s", "peak_rerunning",
                  "max_deliveries"):
            vals = [tr[k] for tr in ts if tr[k] is not None]
            row[k] = median(vals) if vals else None
            row[f"{k}_range"] = [min(vals), max(vals)] if vals else None
        out.append(row)
    return out


def speedups(agg: list[dict[str, Any]]) -> dict[int, float | None]:
    """Per setting: median recovery time of the old code / of the new code."""
    out: dict[int, float | None] = {}
    for idle in sorted({r["claim_idle_ms"] for r in agg}, reverse=True):
        by = {r["code"]: r for r in agg if r["claim_idle_ms"] == idle}
        old, new = (by.get(c, {}).get("recover_s") for c in CODES)
        out[idle] = old / new if old and new else None
    return out


# ---- output ---------------------------------------------------------------------------------


def plot(r: dict[str, Any], path: Path) -> Path:
    """Per setting (columns): the dead worker's runs completed (top) and its entries
    re-running on the survivor (bottom) vs seconds since the kill, every rep drawn."""
    from matplotlib.ticker import MaxNLocator

    from bench.plot import plt

    idles = sorted({tr["claim_idle_ms"] for tr in r["trials"]}, reverse=True)
    colors = {"old": "#d62728", "new": "#1f77b4"}
    fig, axes = plt.subplots(2, len(idles), figsize=(5.8 * len(idles), 7.0), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [3, 2]})
    hb = r["config"]["heartbeat_ms"]
    for col, idle in enumerate(idles):
        top, bottom = axes[0][col], axes[1][col]
        for code in CODES:
            ts = [tr for tr in r["trials"] if tr["claim_idle_ms"] == idle and tr["code"] == code]
            for i, tr in enumerate(ts):
                label = f"{code} ({r['codes'][code]['commit'][:7]})" if i == 0 else None
                done = tr["victim_done_s"]
                top.step([0.0, *done], list(range(len(done) + 1)), where="post",
                         color=colors[code], alpha=0.8, linewidth=1.4, label=label)
                xs = [s[0] for s in tr["samples"]]
                bottom.step(xs, [s[1] for s in tr["samples"]], where="post",
                            color=colors[code], alpha=0.8, linewidth=1.2, label=label)
        for ax in (top, bottom):
            ax.axvline(idle / 1000, color="grey", linestyle=":",
                       label=f"claim_idle {idle / 1000:g} s")
            ax.axvline(hb * 5 / 1000, color="grey", linestyle="--",
                       label=f"member TTL {hb * 5 / 1000:g} s")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        top.set_title(f"ALTO_CLAIM_IDLE_MS={idle}", fontsize=10)
        top.set_ylabel("dead worker's runs completed")
        top.legend(fontsize=8, loc="center right")
        bottom.set_ylabel("its entries re-running\n(claimed, not yet acked)")
        bottom.set_xlabel("seconds since the SIGKILL")
    c = r["config"]
    fig.suptitle(f"Recovery after a worker SIGKILL: {c['runs']} runs on 2 workers,\n"
                 f"{c['tokens']}-token sim calls, every rep drawn", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def command(cfg: RecoveryConfig) -> str:
    d = RecoveryConfig()
    parts = [".venv/bin/alto bench recovery"]
    for flag, v, dv in (("--runs", cfg.runs, d.runs), ("--reps", cfg.reps, d.reps),
                        ("--tokens", cfg.tokens, d.tokens),
                        ("--time-scale", cfg.time_scale, d.time_scale),
                        ("--old-ref", cfg.old_ref, d.old_ref)):
        if v != dv:
            parts.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    if cfg.claim_idle_ms != d.claim_idle_ms:
        parts.append("--claim-idle-ms " + ",".join(str(x) for x in cfg.claim_idle_ms))
    return " ".join(parts)


def render_markdown(r: dict[str, Any], files: list[str]) -> str:
    m, c = r["machine"], r["config"]
    codes = r["codes"]
    agg = r["aggregate"]
    sp = {int(k): v for k, v in speedups(agg).items()}
    slots = c["concurrency"] or max(1, c["runs"] // 2)
    lines = [
        f"Measured {m['date']} on {m['cpus']} CPU cores ({m['cpu_model']}, shared: others "
        f"used a median {r['load']['others_cores_median']:.2f} cores during the recoveries; "
        f"load average {r['load']['loadavg_start'][0]:.2f} at the start, "
        f"{r['load']['loadavg_end'][0]:.2f} at the end), Redis {m['redis']}, Python "
        f"{m['python']}. Workload: one `lm` stage on the sim engine (capacity {c['capacity']}, "
        f"time_scale {c['time_scale']:g}), every call exactly {c['tokens']} tokens "
        f"(≈{r['call_s'][f'batch_{slots}']:.2f} s in a batch of {slots}, "
        f"≈{r['call_s']['batch_1']:.2f} s alone); 2 `alto worker` processes with {slots} "
        f"slots each; a burst of {c['runs']} runs, then {r['kill_after_s']:.2f} s after the "
        f"last entry was delivered the worker holding the most entries is SIGKILLed and not "
        f"restarted. `ALTO_HEARTBEAT_MS={c['heartbeat_ms']}` (member TTL "
        f"{c['heartbeat_ms'] * 5 / 1000:g} s). Old and new code alternate, {c['reps']} reps "
        f"each; medians, min-max in brackets.",
        "",
        "Code: " + "; ".join(
            f"**{name}** = `{info['commit'][:7]}`" + (" + uncommitted runtime changes"
                                                      if info["uncommitted_runtime_changes"]
                                                      else "")
            for name, info in codes.items()) + ".",
        "",
        "| ALTO_CLAIM_IDLE_MS | code | entries held by the dead worker | kill → first claim "
        "(s) | kill → last of its runs done (s) | peak re-running at once | all runs "
        "exactly once |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def rng(row: dict[str, Any], k: str, digits: int = 1) -> str:
        v, span = row[k], row[f"{k}_range"]
        if v is None:
            return "n/a"
        if digits == 0:
            return f"{v:g} [{span[0]:g}-{span[1]:g}]"
        return f"{fnum(v, digits)} [{fnum(span[0], digits)}-{fnum(span[1], digits)}]"

    for row in agg:
        lines.append(
            f"| {row['claim_idle_ms']} | {row['code']} | {rng(row, 'held', 0)} | "
            f"{rng(row, 'detect_s')} | **{rng(row, 'recover_s')}** | "
            f"{rng(row, 'peak_rerunning', 0)} | {'yes' if row['all_ok'] else '**NO**'} |")
    lines.append("")
    for idle, s in sp.items():
        if s is not None:
            lines.append(f"- claim_idle {idle} ms: the dead worker's runs finish "
                         f"**{s:.1f}x** sooner with the new code (median old / median new).")
    lines += [
        "",
        "\"Peak re-running\" is the most of the dead worker's entries seen at once claimed by "
        f"the survivor and not yet acknowledged (XPENDING sampled every {c['sample_ms']} ms). "
        "\"Exactly once\": every run ended with one `result` event whose units equal a "
        "fault-free embedded run of the same input, the stream was left with nothing pending "
        "or unread, and no dead letters.",
        "",
        "Files: " + ", ".join(f"`{_rel(f)}`" for f in files) + ".",
        "",
        f"Reproduce: `{command(_cfg_of(c))}`",
    ]
    return "\n".join(lines)


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else path


def _cfg_of(c: dict[str, Any]) -> RecoveryConfig:
    keep = {k: v for k, v in c.items() if k in RecoveryConfig.__dataclass_fields__
            and k not in ("out_dir", "markdown")}
    return RecoveryConfig(**keep)


def main(cfg: RecoveryConfig, log: Log = print) -> dict[str, Any]:
    r = asyncio.run(run_recovery(cfg, log))
    js = cfg.out_dir / f"{cfg.tag}.json"
    png = plot(r, cfg.out_dir / f"{cfg.tag}.png")
    files = [str(js), str(png)]
    r["files"] = files
    write_json(js, r)
    if cfg.markdown is not None:
        update_markdown(cfg.markdown, cfg.tag, render_markdown(r, files), title=TITLE)
        files.append(str(cfg.markdown))
    return r


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(RecoveryConfig())
