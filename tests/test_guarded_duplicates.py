"""A duplicate entry of finished work, seen for the first time by an engine-less stage,
publishes nothing: the runner skips its pre-call read there and relies on the `Guard` its
commits carry (see workers/runner.py). Runs on both transports (real Redis included)."""

from __future__ import annotations

from fractions import Fraction

from orchestrator.envelope import Envelope
from orchestrator.routing import stage_group, stream_for
from orchestrator.spec import parse_pipeline
from orchestrator.transport import Commit, Transport
from tests.waiting import eventually
from workers.client import run_to_completion
from workers.runner import RunnerConfig
from workers.runtime import Runtime

SPEC = parse_pipeline(
    {
        "name": "dups",
        "stages": [
            {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
             "framing": "items", "to": ["up"]},
            {"name": "up", "kind": "tool", "function": "tests.toy.stages:upper",
             "to": ["final"]},
            {"name": "final", "kind": "reduce", "function": "tests.toy.stages:collect",
             "aggregate_by": ["request"]},
        ],
    }
)


def entry_envelope(run: str, text: str) -> Envelope:
    """The run's input exactly as `start_run` publishes it (same deterministic id)."""
    return Envelope(run=run, pipeline=SPEC.name, stage=SPEC.entry_stage, lineage=(),
                    kind="unit", credit=Fraction(1), payload=text, context={"input": text})


async def test_duplicate_of_a_finished_input_publishes_nothing(transport: Transport) -> None:
    rt = Runtime(transport, [SPEC], config=RunnerConfig(block_ms=20))
    await rt.start()
    try:
        run, events = await run_to_completion(transport, SPEC, "a b c", deadline_s=30)
        assert events[-1]["type"] == "result", events[-1]
        log_before = await transport.read_events(run, None, 10_000, 0)
        env = entry_envelope(run, "a b c")
        entry = stream_for(SPEC, env)
        group = stage_group(SPEC.name, "split")
        up = stream_for(SPEC, Envelope(run=run, pipeline=SPEC.name, stage="up",
                                       lineage=(("split", 1),), kind="unit",
                                       credit=Fraction(1)))
        up_read = (await transport.stats(up, stage_group(SPEC.name, "up"))).entries_read
        split = next(r for r in rt.runners if r.stage.name == "split")
        processed = split.processed

        await transport.commit(Commit(messages=[(entry, env)]))  # the duplicate

        async def handled() -> bool:
            st = await transport.stats(entry, group)
            return st.entries_read == 2 and st.pending == 0

        await eventually(handled, 10)
        log_after = await transport.read_events(run, None, 10_000, 0)
        up_after = (await transport.stats(up, stage_group(SPEC.name, "up"))).entries_read
    finally:
        await rt.stop()
    assert log_after == log_before  # no partial, credit or any other event was appended
    assert up_after == up_read  # nothing reached the next stage
    assert split.processed == processed  # the guarded-out call is not counted as work
