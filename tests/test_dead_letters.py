"""The dead-letter queue (workers/deadletters.py, `alto dead-letters`): failed inputs are
listed with their stage, run, reason and run input; listing resolves nothing; a letter is
resolved by dropping it or by replaying its input as a new run (after a fix), and then
trimmed away. Before, dead letters were written and never read: nothing showed them and
the stream only grew."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator.spec import load_pipeline
from orchestrator.transport import Transport
from tests.toy import faulty
from tests.waiting import eventually
from tests.worker_procs import ROOT
from workers import deadletters
from workers.client import follow_run, run_to_completion
from workers.redis_transport import RedisTransport
from workers.runner import RunnerConfig, dead_letter_stream
from workers.runtime import Runtime

PIPELINE = ROOT / "tests" / "toy" / "dead.yaml"
SPEC = load_pipeline(PIPELINE)
CONFIG = RunnerConfig(claim_idle_ms=200, block_ms=20, lease_ttl_ms=300, heartbeat_ms=50)


@pytest.fixture
def broken() -> Iterator[set[str]]:
    """The words the `check` stage fails on; empty again after the test."""
    faulty.BROKEN.clear()
    yield faulty.BROKEN
    faulty.BROKEN.clear()


async def _fail_two(transport: Transport) -> list[str]:
    """Two runs that each dead-letter one input ("bad" fails at `check`)."""
    runs = []
    for text in ("good bad", "bad fine"):
        run, events = await run_to_completion(transport, SPEC, text, deadline_s=30)
        assert events[-1]["type"] == "error" and events[-1]["stage"] == "check"
        runs.append(run)
    return runs


async def _result(transport: Transport, run: str) -> dict:
    events = [ev async for _, ev in follow_run(transport, SPEC, run, deadline_s=30)]
    return events[-1]


async def test_list_drop_and_replay(transport: Transport, broken: set[str]) -> None:
    broken.add("bad")
    rt = Runtime(transport, [SPEC], config=CONFIG)
    await rt.start()
    try:
        runs = await _fail_two(transport)
        first = await deadletters.unresolved(transport, SPEC.name)
        again = await deadletters.unresolved(transport, SPEC.name)
        total = await deadletters.count(transport, SPEC.name)

        with pytest.raises(LookupError, match="no unresolved dead letter with id 9-9"):
            await deadletters.drop(transport, SPEC.name, ["9-9"])
        assert await deadletters.drop(transport, SPEC.name, [first[0].entry_id]) == 1
        left = await deadletters.unresolved(transport, SPEC.name)

        broken.clear()  # the bug is fixed: the second input now goes through
        replayed = await deadletters.replay(transport, SPEC)
        result = await _result(transport, replayed[first[1].entry_id])
        after = await deadletters.count(transport, SPEC.name)
        stream = await transport.stats(dead_letter_stream(SPEC.name), deadletters.OPERATORS)
    finally:
        await rt.stop()
    assert [d.run for d in first] == runs  # oldest first
    assert [d.input for d in first] == ["good bad", "bad fine"]  # the run's input, whole
    assert all(d.stage == "check" and "ValueError" in d.reason for d in first)
    assert all(d.record["envelope"]["x"] == "bad" for d in first)  # the failed input itself
    assert [d.entry_id for d in again] == [d.entry_id for d in first]  # listing resolves nothing
    assert total == 2
    assert [d.entry_id for d in left] == [first[1].entry_id]
    assert list(replayed) == [first[1].entry_id]
    assert result["type"] == "result" and result["units"] == ["final[bad,fine]"]
    assert after == 0
    assert stream.length == 0  # resolved letters are trimmed away


async def test_a_letter_that_arrives_after_a_listing_is_listed_next_time(
    transport: Transport, broken: set[str]
) -> None:
    broken.add("bad")
    rt = Runtime(transport, [SPEC], config=CONFIG)
    await rt.start()
    try:
        assert await deadletters.unresolved(transport, SPEC.name) == []
        await run_to_completion(transport, SPEC, "bad", deadline_s=30)
        listed = await deadletters.unresolved(transport, SPEC.name)
    finally:
        await rt.stop()
    assert [d.input for d in listed] == ["bad"]


async def test_a_run_with_several_letters_is_replayed_once(
    transport: Transport, broken: set[str]
) -> None:
    """Two inputs of one run fail side by side: two letters, one run to submit again."""
    broken.update({"bad", "worse"})
    rt = Runtime(transport, [SPEC], config=CONFIG)
    await rt.start()
    try:
        run, _ = await run_to_completion(transport, SPEC, "bad worse", deadline_s=30)

        async def both_listed() -> bool:
            return len(await deadletters.unresolved(transport, SPEC.name)) == 2

        await eventually(both_listed, 10)
        broken.clear()
        first = (await deadletters.unresolved(transport, SPEC.name))[0].entry_id
        replayed = await deadletters.replay(transport, SPEC, [first])  # one of the two named
        result = await _result(transport, next(iter(replayed.values())))
        left = await deadletters.count(transport, SPEC.name)
    finally:
        await rt.stop()
    assert len(replayed) == 2 and len(set(replayed.values())) == 1  # one new run, both resolved
    assert result["type"] == "result" and result["units"] == ["final[bad,worse]"]
    assert left == 0


# ---- the CLI, against a real Redis ------------------------------------------------------


async def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`alto ARGS -p dead.yaml --redis-url URL` in a thread: the runtime on this loop must
    go on (heartbeating, serving) meanwhile."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app.cli", *args, "-p", str(PIPELINE), "--redis-url", redis_url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


async def alto(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await cli(redis_url, "dead-letters", *args)


async def listed(redis_url: str) -> list[dict]:
    proc = await alto(redis_url, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.redis
async def test_replays_at_once_start_each_failed_run_once(
    transport: Transport, broken: set[str]
) -> None:
    """Two replays at once (two operators, a retried request, the CLI beside the gateway):
    both listed the letters before either resolved them, and each started every run."""
    broken.add("bad")
    rt = Runtime(transport, [SPEC], config=CONFIG)
    await rt.start()
    try:
        for text in ("bad", "bad a", "bad b"):
            await run_to_completion(transport, SPEC, text, deadline_s=30)
        letters = await deadletters.unresolved(transport, SPEC.name)
        broken.clear()
        one, two = await asyncio.gather(deadletters.replay(transport, SPEC),
                                        deadletters.replay(transport, SPEC))
        left = await deadletters.count(transport, SPEC.name)
    finally:
        await rt.stop()
    assert len(letters) == 3
    assert sorted([*one, *two]) == sorted(d.entry_id for d in letters)  # each letter once
    assert len(set(one.values()) | set(two.values())) == 3 and left == 0


async def test_the_cli_lists_drops_and_replays(
    redis_url: str, redis_t: RedisTransport, broken: set[str]
) -> None:
    broken.add("bad")
    rt = Runtime(redis_t, [SPEC], config=CONFIG)
    await rt.start()
    try:
        runs = await _fail_two(redis_t)
        letters = await listed(redis_url)
        table = await alto(redis_url, "list")
        unknown = await alto(redis_url, "drop", "0-1")
        neither = await alto(redis_url, "drop")
        dropped = await alto(redis_url, "drop", letters[0]["id"])
        broken.clear()
        replay = await alto(redis_url, "replay", "--all")
        entry, _, run = replay.stdout.strip().partition(" -> ")
        result = await _result(redis_t, run)
        rest = await listed(redis_url)
    finally:
        await rt.stop()
    assert [d["run"] for d in letters] == runs
    assert [d["input"] for d in letters] == ["good bad", "bad fine"]
    assert all(d["stage"] == "check" and "ValueError" in d["reason"] for d in letters)
    assert "2 of 2 unresolved" in table.stdout and letters[0]["id"] in table.stdout
    assert unknown.returncode == 1 and "no unresolved dead letter with id 0-1" in unknown.stderr
    assert neither.returncode == 2 and "--all" in neither.stderr
    assert dropped.returncode == 0 and "dropped 1" in dropped.stderr
    assert replay.returncode == 0, replay.stderr
    assert entry == letters[1]["id"]
    assert result["type"] == "result" and result["units"] == ["final[bad,fine]"]
    assert rest == []


def test_the_cli_needs_redis() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "dead-letters", "list", "-p", str(PIPELINE)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "ALTO_REDIS_URL"},
    )
    assert proc.returncode == 2 and "--redis-url" in proc.stderr


@pytest.mark.redis
async def test_alto_status_shows_instances_queues_and_dead_letters(
    redis_url: str, redis_t: RedisTransport, broken: set[str]
) -> None:
    """`alto status`: what /metrics reports, at a terminal (both read workers/status.py)."""
    broken.add("bad")
    rt = Runtime(redis_t, [SPEC], config=CONFIG)
    await rt.start()
    try:
        await run_to_completion(redis_t, SPEC, "good bad", deadline_s=30)

        as_json, table = await cli(redis_url, "status", "--json"), await cli(redis_url, "status")
    finally:
        await rt.stop()
    assert as_json.returncode == 0, as_json.stderr
    st = json.loads(as_json.stdout)
    assert st["pipeline"] == "dead" and st["dead_letters"] == 1
    assert [s["stage"] for s in st["stages"]] == ["split", "check", "final"]
    assert all(s["instances"] == 1 and s["lag"] == 0 for s in st["stages"]), st
    assert table.returncode == 0 and "1 unresolved dead letter" in table.stdout
    assert all(name in table.stdout for name in ("split", "check", "final"))


@pytest.mark.redis
async def test_a_replay_leaves_no_key_behind_on_redis(
    redis_t: Transport, redis_url: str, broken: set[str]
) -> None:
    """A replay's lease on a failed run is a plain lock: it left a `fence:` counter per
    replayed run, which never expires."""
    import redis.asyncio as aioredis

    broken.add("bad")
    rt = Runtime(redis_t, [SPEC], config=CONFIG)
    await rt.start()
    try:
        await run_to_completion(redis_t, SPEC, "bad", deadline_s=30)
        broken.clear()
        assert len(await deadletters.replay(redis_t, SPEC)) == 1
    finally:
        await rt.stop()
    r = aioredis.from_url(redis_url)
    try:
        fences = [k async for k in r.scan_iter(match="*fence:replay:*")]
        leases = [k async for k in r.scan_iter(match="*lease:replay:*")]
        ttls = [await r.pttl(k) for k in leases]
    finally:
        await r.aclose()
    assert fences == [] and all(t > 0 for t in ttls)  # the lease itself expires
