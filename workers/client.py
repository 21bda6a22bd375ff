"""Starting runs and following their events: what the CLI and the gateway share.

A run is started by publishing one envelope (the input, holding all of the run's
credit) to the entry stage and a `run` event. Following a run means reading its event
log through a RunTracker, which knows exactly when the run is complete.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

from orchestrator.envelope import Envelope
from orchestrator.routing import stream_for
from orchestrator.spec import PipelineSpec
from orchestrator.tracker import RunTracker, event_order
from orchestrator.transport import Commit, Transport
from workers.router import Router


def new_run_id() -> str:
    """128 random bits from the OS CSPRNG: a run id cannot be guessed (runs are also
    readable only with the API key that created them)."""
    return "run_" + secrets.token_hex(16)


async def fail_run(transport: Transport, run: str, code: str, message: str,
                   ttl_s: int = 3600) -> None:
    """End a run from outside its stages: its cancel flag (workers stop its calls and drop
    its inputs) and an `error` event, the first of which followers take as its end. The
    gateway (deadline, disconnect, POST cancel) and `alto run` (Ctrl-C, deadline) both."""
    await transport.cancel(run, ttl_s=ttl_s)
    event = {"type": "error", "mid": f"error:{code}:{run}", "run": run, "code": code,
             "message": message}
    await transport.commit(Commit(events=[(run, event)]))


async def start_run(
    transport: Transport,
    spec: PipelineSpec,
    text: str,
    *,
    run: str | None = None,
    meta: dict[str, Any] | None = None,
    router: Router | None = None,
) -> str:
    """`router`: where the entry stage's placement policy wants the input (a scheduling
    router); by default the entry stage's plain stream."""
    run = run or new_run_id()
    env = Envelope(
        run=run,
        pipeline=spec.name,
        stage=spec.entry_stage,
        lineage=(),
        kind="unit",
        credit=Fraction(1),
        payload=text,
        context={"input": text},
    )
    event = {
        "type": "run",
        "mid": f"run:{run}",
        "run": run,
        "pipeline": spec.name,
        "created": int(time.time()),
        **(meta or {}),
    }
    stream = router.stream_for(env) if router is not None else stream_for(spec, env)
    await transport.commit(Commit(messages=[(stream, env)], events=[(run, event)]))
    return run


async def follow_run(
    transport: Transport,
    spec: PipelineSpec,
    run: str,
    *,
    after: str | None = None,
    deadline_s: float | None = None,
    block_ms: int = 1000,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Yield (event id, event) for the run, from the start or after `after`, until it ends.

    Replays from the beginning through a fresh tracker either way (cheap: a run's log is
    small) so that derived events are rebuilt exactly; only events after `after` are
    yielded. Raises TimeoutError past the deadline.
    """
    tracker = RunTracker(spec, run)
    skip_until = event_order(after) if after else None
    cursor: str | None = None
    end = time.monotonic() + deadline_s if deadline_s else None
    while not tracker.finished:
        wait = block_ms
        if end is not None:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"run {run} did not finish within {deadline_s} s")
            wait = max(1, min(block_ms, int(left * 1000)))
        batch = await transport.read_events(run, cursor, 512, wait)
        for raw_id, event in batch:
            cursor = raw_id
            for eid, ev in tracker.feed(raw_id, event):
                if skip_until is None or event_order(eid) > skip_until:
                    yield eid, ev
            if tracker.finished:
                return


async def run_to_completion(
    transport: Transport, spec: PipelineSpec, text: str, *, deadline_s: float | None = 300.0
) -> tuple[str, list[dict[str, Any]]]:
    """Start a run and collect all of its events; the last is `result` or `error`."""
    run = await start_run(transport, spec, text)
    events = [ev async for _, ev in follow_run(transport, spec, run, deadline_s=deadline_s)]
    return run, events
