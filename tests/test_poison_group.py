"""A group whose firing kills its worker every time is dead-lettered after
`max_deliveries` firings (workers/runner.py `_count_fire`), instead of moving from owner
to owner forever: its entries are acknowledged in the same commit as the run's `error`
event (code `max_deliveries`, naming the stage), and the stage goes on serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.routing import stage_group, stage_streams
from orchestrator.spec import load_pipeline
from tests.worker_procs import (
    ROOT,
    WorkerPool,
    dead_letters,
    follow_restarting,
    wait_exit,
    wait_for_members,
)
from workers.client import follow_run, run_to_completion, start_run
from workers.redis_transport import RedisTransport

POISON_GROUP = ROOT / "tests" / "toy" / "poison_group.yaml"
POISON_ONCE = ROOT / "tests" / "toy" / "poison_group_once.yaml"


@pytest.mark.redis
async def test_group_that_kills_its_worker_every_firing_is_dead_lettered(
    redis_url: str, redis_t: RedisTransport
) -> None:
    spec = load_pipeline(POISON_GROUP)
    pool = WorkerPool(redis_url, POISON_GROUP, {"ALTO_MAX_DELIVERIES": "2"})
    try:
        for stage in spec.by_name:
            pool.start(stage)
        await wait_for_members(redis_t, spec, 1)
        run = await start_run(redis_t, spec, "a poison b")
        events, crashes = await follow_restarting(pool, redis_t, spec, run, "group")
        # the healthy run after it is served by the same (restarted) worker
        _, after = await run_to_completion(redis_t, spec, "x y", deadline_s=60)
        dead = await dead_letters(redis_t, spec.name)
        [stream] = stage_streams(spec, "group")
        pending = (await redis_t.stats(stream, stage_group(spec.name, "group"))).pending
    finally:
        pool.stop()
    err = events[-1]
    assert err["type"] == "error", err
    assert err["stage"] == "group" and err["code"] == "max_deliveries"
    assert "fired 2 times" in err["message"]
    assert crashes == 2  # fired twice (both killed their worker); the third try never ran
    assert len(dead) == 1 and dead[0]["stage"] == "group" and dead[0]["run"] == run
    # the whole group went: the three words and split's end marker, all acknowledged
    assert len(dead[0]["entries"]) == 4
    assert pending == 0
    assert after[-1]["type"] == "result" and after[-1]["units"] == ["group[x,y]"]


@pytest.mark.redis
async def test_group_that_crashes_once_fires_again_and_completes(
    redis_url: str, redis_t: RedisTransport, tmp_path: Path
) -> None:
    """Under the limit a crashed firing is simply retried by the next owner: counting
    firings must not dead-letter a group that a single crash interrupted."""
    spec = load_pipeline(POISON_ONCE)
    marker = tmp_path / "crashed"
    pool = WorkerPool(redis_url, POISON_ONCE,
                      {"ALTO_MAX_DELIVERIES": "2", "ALTO_TEST_CRASH_MARKER": str(marker)})
    try:
        for stage in spec.by_name:
            pool.start(stage)
        await wait_for_members(redis_t, spec, 1)
        run = await start_run(redis_t, spec, "a poison b")
        assert await wait_exit(pool.procs["group"][0]) != 0  # the first firing killed it
        assert marker.read_text() == run
        pool.restart_dead("group")
        events = [ev async for _, ev in follow_run(redis_t, spec, run, deadline_s=60)]
        dead = await dead_letters(redis_t, spec.name)
    finally:
        pool.stop()
    assert events[-1]["type"] == "result", events[-1]
    assert events[-1]["units"] == ["group[a,poison,b]"]
    assert dead == []
