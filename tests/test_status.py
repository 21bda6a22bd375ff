"""`workers/status.py` (behind `/metrics` and `alto status`): per stage, live instances and
what waits. A stage whose workers never came has no consumer group on its streams; its
backlog used to read as 0 ("nothing queued") while its stream filled up."""

from __future__ import annotations

import pytest

from orchestrator.embedded import NoGroupError
from orchestrator.routing import stage_group, stage_streams
from orchestrator.spec import parse_pipeline
from orchestrator.transport import Transport
from tests.waiting import eventually
from workers.client import start_run
from workers.deadletters import OPERATORS
from workers.runner import RunnerConfig, dead_letter_stream
from workers.runtime import Runtime, StageSelection
from workers.status import pipeline_status

SPEC = parse_pipeline({
    "name": "halfway",
    "stages": [
        {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
         "framing": "items", "to": ["up"]},
        {"name": "up", "kind": "tool", "function": "tests.toy.stages:upper"},
    ],
})


async def test_a_stage_without_workers_shows_its_backlog(transport: Transport) -> None:
    rt = Runtime(transport, [SPEC], config=RunnerConfig(block_ms=20, heartbeat_ms=50))
    await rt.start([StageSelection("halfway", "split")])  # nobody serves `up`
    try:
        await start_run(transport, SPEC, "a b c")

        async def split_done() -> bool:
            return rt.runners[0].processed == 1

        await eventually(split_done, 10)
        status = await pipeline_status(transport, SPEC)
        up_stream = stage_streams(SPEC, "up")[0]
        with pytest.raises(NoGroupError):  # looking created nothing
            await transport.stats(up_stream, stage_group(SPEC.name, "up"))
        with pytest.raises(NoGroupError):
            await transport.stats(dead_letter_stream(SPEC.name), OPERATORS)
    finally:
        await rt.stop()
    split, up = status.stages
    assert (split.stage, split.instances, split.lag, split.pending) == ("split", 1, 0, 0)
    assert (up.stage, up.instances) == ("up", 0)
    assert up.lag == up.length == 4  # 3 words and the end marker wait for `up`
    assert status.dead_letters == 0
