"""Worker-side observability: the observer hook feeds Prometheus series, and a real
`alto worker --metrics-port` process serves /healthz, /readyz and /metrics (what the
Helm chart's probes and scrape config point at)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.embedded import EmbeddedTransport
from orchestrator.routing import stage_group
from orchestrator.spec import load_pipeline, parse_pipeline
from orchestrator.template import StageContext
from tests.toy import stages
from tests.waiting import eventually, eventually_sync
from workers.client import follow_run, run_to_completion, start_run
from workers.metrics import WorkerMetrics, probe
from workers.redis_transport import RedisTransport
from workers.runner import RunnerConfig, StageRunner
from workers.runtime import Runtime, StageSelection
from workers.stagefn import StageFunction

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "toy" / "pipeline4.yaml"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_observer_events_become_series() -> None:
    m = WorkerMetrics()
    stage = {"pipeline": "p", "stage": "s", "instance": "i"}
    m.observe("call", {**stage, "seconds": 0.2, "first_unit_s": 0.05, "units": 3,
                       "prompt_tokens": 11, "completion_tokens": 7, "cached_tokens": 0})
    m.observe("call", {**stage, "seconds": 0.4, "first_unit_s": None, "units": 0})
    m.observe("error", {**stage, "run": "r1"})
    m.observe("reclaimed", {**stage, "count": 4})
    m.observe("reclaimed", {**stage, "count": 0})
    m.observe("call", {"seconds": "not a number"})  # must not raise
    got = samples(m.render().decode())
    ps = (("pipeline", "p"), ("stage", "s"))
    assert got[("alto_stage_call_seconds_count", ps)] == 2
    assert got[("alto_stage_call_seconds_sum", ps)] == pytest.approx(0.6)
    assert got[("alto_stage_first_unit_seconds_count", ps)] == 1
    def tokens(kind: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return "alto_stage_tokens_total", tuple(sorted((*ps, ("kind", kind))))

    assert got[tokens("prompt")] == 11
    assert got[tokens("completion")] == 7
    assert tokens("cached") not in got
    assert got[("alto_stage_units_total", ps)] == 3
    assert got[("alto_stage_call_errors_total", ps)] == 1
    assert got[("alto_stage_reclaimed_messages_total", ps)] == 4


def explode(value: Any, ctx: StageContext) -> str:
    raise RuntimeError(f"cannot handle {value!r}")


GATED = parse_pipeline({"name": "gated", "stages": [
    {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
     "framing": "items", "to": ["gate"]},
    {"name": "gate", "kind": "tool", "function": "tests.toy.stages:gated"},
]})
FAILING = parse_pipeline({"name": "failing", "stages": [
    {"name": "boom", "kind": "tool", "function": "tests.test_worker_metrics:explode"},
]})
def value(m: WorkerMetrics, name: str, pipeline: str, stage: str) -> float:
    got = m.registry.get_sample_value(name, {"pipeline": pipeline, "stage": stage})
    return got or 0.0


FAST = RunnerConfig(claim_idle_ms=200, block_ms=20, heartbeat_ms=50)


async def test_runner_reports_reclaimed_messages_and_errors() -> None:
    """The runner's observer calls behind alto_stage_reclaimed_messages_total (another
    instance's abandoned input taken over) and alto_stage_call_errors_total."""
    m = WorkerMetrics()
    t = EmbeddedTransport()
    upstream = Runtime(t, [GATED], config=FAST)
    await upstream.start([StageSelection("gated", "split")])
    run = "run_reclaim_1"
    stages.GATES[run] = asyncio.Event()
    fn = StageFunction(GATED, GATED.stage("gate"))
    a = StageRunner(GATED, "gate", t, fn, instance="gate-a", config=FAST)
    task_a = asyncio.create_task(a.run(asyncio.Event()))
    try:
        await start_run(t, GATED, "one two three", run=run)
        await eventually(lambda: a.inflight >= 2)  # two words wait at the gate
        await a.abort()  # crash: its inputs stay pending
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)
        b = StageRunner(GATED, "gate", t, fn, instance="gate-b", config=FAST, observer=m.observe)
        stop_b = asyncio.Event()
        task_b = asyncio.create_task(b.run(stop_b))
        # a stateless stage may take abandoned inputs one at a time: wait for the first
        await eventually(lambda: value(m, "alto_stage_reclaimed_messages_total", "gated", "gate") >= 1)
        stages.GATES[run].set()
        events = [ev async for _, ev in follow_run(t, GATED, run, deadline_s=30)]
        stop_b.set()
        await task_b
    finally:
        stages.GATES.pop(run, None)
        await upstream.stop()
    assert events[-1]["type"] == "result", events[-1]
    assert value(m, "alto_stage_reclaimed_messages_total", "gated", "gate") == 2
    assert value(m, "alto_stage_call_errors_total", "gated", "gate") == 0

    rt = Runtime(t, [FAILING], config=FAST, observer=m.observe)
    await rt.start()
    try:
        _, events = await run_to_completion(t, FAILING, "x", deadline_s=30)
    finally:
        await rt.stop()
    assert any(e["type"] == "error" and e.get("stage") == "boom" for e in events), events
    assert value(m, "alto_stage_call_errors_total", "failing", "boom") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def worker_proc(redis_url: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALTO_HEARTBEAT_MS": "100",
           "ALTO_LOG_FORMAT": "json"}
    p = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--pipeline", str(PIPELINE),
         "--stage", "expandx5", "--redis-url", redis_url, "--metrics-port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        yield p, port
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stderr:
            p.stderr.close()


@pytest.mark.redis
async def test_worker_serves_probes_and_metrics(
    worker_proc: tuple[subprocess.Popen[bytes], int], redis_url: str
) -> None:
    proc, port = worker_proc
    base = f"http://127.0.0.1:{port}"
    spec = load_pipeline(PIPELINE)

    def answers(path: str) -> bool:
        try:
            return httpx.get(base + path, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    assert eventually_sync(lambda: answers("/healthz") or proc.poll() is not None, 30)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    assert eventually_sync(lambda: answers("/readyz"), 30)
    assert probe([port])  # the image's HEALTHCHECK finds the worker by ALTO_METRICS_PORT
    assert httpx.get(base + "/nope", timeout=2).status_code == 404

    t = RedisTransport(redis_url)
    rt = Runtime(t, [spec])
    try:
        await rt.start([StageSelection(spec.name, s) for s in ("split", "group", "final")])
        await eventually(lambda: _has_member(t, stage_group(spec.name, "expandx5")), 30)
        _, events = await run_to_completion(t, spec, "one two three four five", deadline_s=60)
    finally:
        await rt.stop()
        await t.close()
    assert events[-1]["type"] == "result", events[-1]
    words = sum(1 for e in events if e["type"] == "partial" and e["stage"] == "split")
    assert words == 5

    got = samples(httpx.get(base + "/metrics", timeout=5).text)
    ps = (("pipeline", "toy4"), ("stage", "expandx5"))
    assert got[("alto_stage_call_seconds_count", ps)] == words  # one call per split unit
    assert got[("alto_stage_units_total", ps)] > 0
    assert got[("alto_queue_lag", ps)] == 0
    assert got[("alto_stage_capacity", ps)] >= 1
    infos = [k for k in got if k[0] == "alto_worker_info"]
    assert len(infos) == 1 and dict(infos[0][1])["stage"] == "expandx5"

    proc.send_signal(signal.SIGTERM)  # drains, closes the endpoint, exits 0
    assert proc.wait(timeout=30) == 0
    assert not probe([port])


async def _has_member(t: RedisTransport, group: str) -> bool:
    return len(await t.members(group)) > 0


@pytest.mark.redis
async def test_worker_with_several_instances_reports_their_sum(
        redis_url: str, redis_t: RedisTransport, tmp_path: Path) -> None:
    """`--instances 3 --concurrency 2`: one process, three runners of one stage, so
    alto_stage_inflight and alto_stage_capacity are the three runners' sum (the process's
    load, as the counters beside them are). Each runner set the same series, so the last
    one won: capacity read 2, not 6, and a saturated worker looked a third busy."""
    path = tmp_path / "hold.yaml"  # a sim engine at an hour per decode step: calls never end
    path.write_text(yaml.safe_dump({
        "name": "hold", "engines": {"default": {"kind": "sim", "decode_base_ms": 3_600_000}},
        "stages": [{"name": "ask", "kind": "lm", "prompt": "{input}", "max_tokens": 8}]}))
    spec = load_pipeline(path)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTO_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "-p", str(path), "--stage", "ask",
         "--redis-url", redis_url, "--metrics-port", str(port), "--instances", "3",
         "--concurrency", "2"],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "ALTO_HEARTBEAT_MS": "100"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    group = stage_group("hold", "ask")
    try:
        async def busy(n: int) -> bool:
            """All three instances registered, with `n` inputs in flight in all (their
            heartbeats in Redis: what `alto status` reads, not the endpoint under test)."""
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            members = await redis_t.members(group)
            return len(members) == 3 and sum(m["inflight"] for m in members.values()) == n

        await eventually(lambda: busy(0), 60, every=0.05)
        for i in range(6):  # two per runner: each takes only what its slots hold
            await start_run(redis_t, spec, f"question {i}")
        await eventually(lambda: busy(6), 60, every=0.05)
        got = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    finally:
        proc.kill()  # its calls never end: a drain would wait for them
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    ps = (("pipeline", "hold"), ("stage", "ask"))
    assert got[("alto_stage_capacity", ps)] == 6
    assert got[("alto_stage_inflight", ps)] == 6
    assert got[("alto_queue_pending", ps)] == 6  # the group's, once, not per runner
    assert got[("alto_queue_lag", ps)] == 0
    assert len([k for k in got if k[0] == "alto_worker_info"]) == 3  # one per consumer
