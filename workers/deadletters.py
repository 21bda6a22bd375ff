"""The dead-letter queue, for operators: list what failed, replay it, or drop it.

Runners write an input that failed its stage (a stage error, a `stage_timeout`, an input
that kept killing its worker) to the pipeline's dead-letter stream, in the same commit as
the run's `error` event. Nothing else reads that stream, so without this module it only
grew: "nothing accepted is silently dropped" needs a way to see and act on what landed
there.

The stream is read through one consumer group, `operators`: an entry is *unresolved*
while it is new or pending in that group, and resolving it (replayed or dropped) is an
acknowledgement, after which the normal trim removes it. Listing takes new entries into
the group and reads the pending ones back with a claim (the only read of a pending
entry's body the transport contract has), so a listing changes no entry's state except
its delivery count in that group. Works the same on both transports; the CLI
(`alto dead-letters`) uses it over Redis, where dead letters outlive any process.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.embedded import NoGroupError
from orchestrator.spec import PipelineSpec
from orchestrator.transport import Delivery, Transport
from workers.client import start_run
from workers.runner import dead_letter_stream

OPERATORS = "operators"  # the consumer group (and consumer) of the dead-letter stream
_BATCH = 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One unresolved dead letter: where and why its input failed, and the run's input
    (what a replay submits again)."""

    entry_id: str
    stage: str
    run: str
    reason: str
    instance: str
    input: Any  # the failed run's input; None if the record has none
    record: dict[str, Any]  # the whole record, as the runner wrote it


def _letter(d: Delivery) -> DeadLetter:
    record: dict[str, Any] = d.envelope.payload if isinstance(d.envelope.payload, dict) else {}
    failed = record.get("envelope") if isinstance(record.get("envelope"), dict) else {}
    context = failed.get("ctx") if isinstance(failed.get("ctx"), dict) else {}
    return DeadLetter(
        entry_id=d.entry_id,
        stage=str(record.get("stage", d.envelope.stage)),
        run=str(record.get("run", d.envelope.run)),
        reason=str(record.get("reason", "")),
        instance=str(record.get("instance", "")),
        input=context.get("input"),
        record=record,
    )


async def unresolved(transport: Transport, pipeline: str, limit: int = 100) -> list[DeadLetter]:
    """Up to `limit` unresolved dead letters of `pipeline`, oldest first."""
    stream = dead_letter_stream(pipeline)
    await transport.ensure_group(stream, OPERATORS)
    while await transport.consume([stream], OPERATORS, OPERATORS, _BATCH, 0):
        pass  # new entries become pending in the group: listed, not yet resolved
    ids = [p.entry_id for p in await transport.pending(stream, OPERATORS, limit)]
    got = await transport.claim(stream, OPERATORS, OPERATORS, ids, 0)
    return [_letter(d) for d in got]


async def count(transport: Transport, pipeline: str) -> int:
    """How many dead letters of `pipeline` are unresolved (what to alert on)."""
    stream = dead_letter_stream(pipeline)
    try:
        stats = await transport.stats(stream, OPERATORS)
    except NoGroupError:  # never listed: every letter is unresolved (and looking creates nothing)
        return await transport.length(stream)
    return stats.pending + stats.lag


async def _resolve(transport: Transport, pipeline: str, entry_ids: Sequence[str]) -> None:
    await transport.ack(dead_letter_stream(pipeline), OPERATORS, list(entry_ids))


def _pick(letters: list[DeadLetter], entry_ids: Sequence[str] | None) -> list[DeadLetter]:
    if entry_ids is None:
        return letters
    by_id = {d.entry_id: d for d in letters}
    missing = [i for i in entry_ids if i not in by_id]
    if missing:
        raise LookupError(f"no unresolved dead letter with id {', '.join(missing)}")
    return [by_id[i] for i in entry_ids]


REPLAY_CLAIM_MS = 60_000  # how long a replay holds a failed run: start + resolve take ms


async def replay(
    transport: Transport, spec: PipelineSpec, entry_ids: Sequence[str] | None = None,
    *, limit: int = 100_000, owner: str | None = None, deadline_s: float | None = None,
    may_start: Callable[[], bool] | None = None,
    on_start: Callable[[str], Awaitable[None]] | None = None,
) -> dict[str, str]:
    """Submit the input of each run these dead letters (all unresolved ones if None) come
    from again, as a new run, then resolve the letters; returns {entry id: new run id}.
    One failed run can leave several letters (inputs that failed side by side before the
    cancel reached them): its input is submitted once and all of its letters are resolved,
    named or not (else a later replay of one left behind would submit it again). Replays
    running at once (two operators, a retried request, the CLI beside the gateway) start
    each failed run once: a lease per failed run, and a look that its letters are still
    unresolved once it is held. A letter
    without an input raises before anything is submitted. Each run is started before its
    letters are resolved: if this process dies between the two, they stay unresolved and a
    later replay submits the input again (a duplicate run rather than a lost one).

    A new run belongs to its failed run's owner (the API key hash its `run` event
    records), so only that key reads it, as it read the original; when that log has
    expired, to `owner` (the admin who replays, over HTTP), else to nobody in particular.
    `deadline_s` is recorded in each new run's `run` event, as a gateway's runs record theirs.
    `may_start()` is asked before each run starts (oldest failed runs first): False stops
    the replay there, leaving the letters of the rest unresolved; `on_start(run)` is told
    of each run as soon as it has started.
    """
    listed = await unresolved(transport, spec.name, limit)
    letters = _pick(listed, entry_ids)
    runs_named = {d.run for d in letters}  # a run's other letters go with it: its input is
    letters = [d for d in listed if d.run in runs_named]  # submitted once, for all of them
    blank = [d.entry_id for d in letters if d.input is None]
    if blank:
        raise ValueError(f"dead letter(s) {', '.join(blank)} carry no run input to replay")
    by_run: dict[str, list[DeadLetter]] = {}
    for d in letters:
        by_run.setdefault(d.run, []).append(d)
    runs: dict[str, str] = {}
    me = uuid.uuid4().hex
    stream = dead_letter_stream(spec.name)
    for failed, group in by_run.items():
        ids = [d.entry_id for d in group]
        # one replay of a failed run at a time, and none once its letters are resolved:
        # two operators (or a retried request) replaying together each started it
        lease = f"replay:{spec.name}:{failed}"
        if not await transport.acquire_lease(lease, me, REPLAY_CLAIM_MS):
            continue  # another replay is starting it
        try:  # until the run has started, any failure gives the failed run back
            if not await transport.claim(stream, OPERATORS, OPERATORS, ids, 0):
                await transport.release_lease(lease, me)
                continue  # replayed (or dropped) since we listed it
            if may_start is not None and not may_start():  # may raise: the gateway's 429
                await transport.release_lease(lease, me)
                break
            meta: dict[str, Any] = {"replay_of": failed, "dead_letters": ids}
            if deadline_s is not None:
                meta["deadline_s"] = deadline_s
            first = await transport.read_events(failed, None, 1, 0)
            recorded = first[0][1].get("owner") if first and first[0][1].get("type") == "run" \
                else owner
            if recorded is not None:
                meta["owner"] = recorded
            run = await start_run(transport, spec, str(group[0].input), meta=meta)
        except BaseException:
            with contextlib.suppress(Exception):
                await transport.release_lease(lease, me)
            raise
        if on_start is not None:
            await on_start(run)
        await _resolve(transport, spec.name, ids)  # the lease expires on its own: by then
        # every replay that listed these letters finds them resolved
        runs.update((d.entry_id, run) for d in group)
    await transport.trim(dead_letter_stream(spec.name))  # resolved letters go, once
    return runs


async def drop(
    transport: Transport, pipeline: str, entry_ids: Sequence[str] | None = None,
    *, limit: int = 100_000,
) -> int:
    """Resolve these dead letters (all unresolved ones if None) without replaying them."""
    letters = _pick(await unresolved(transport, pipeline, limit), entry_ids)
    if letters:
        await _resolve(transport, pipeline, [d.entry_id for d in letters])
        await transport.trim(dead_letter_stream(pipeline))
    return len(letters)
