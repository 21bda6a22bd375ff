"""Runs the gateway answers for while no client follows them: a native stream whose client
dropped (it may resume within the grace period) and dead letters replayed over HTTP.

Such a run still holds its admission slot (a dropped stream must not free room for another
run while its own goes on), is cancelled when the grace period passes with nobody
following, and is failed at its deadline. One task looks after all of them, with
non-blocking reads of each run's log: a blocking follower per run held a Redis connection
each (hundreds of replayed runs emptied the pool), and a per-run task that met one Redis
error ended, releasing the slot and enforcing nothing more. Here an error is logged and
the check is tried again at the next tick; the slot goes only when the run's end is seen
(or, if its log is gone, a minute past its deadline).

A replayed run is followed by the gateway itself: the supervisor heartbeats as its
watcher, so a client that opens and drops its stream (here or at another gateway) does not
start a grace period that would cancel it.

Supervision lives as long as the gateway: on shutdown the slots go with the process, and
the deadline the `run` event records is enforced by the next `GET /v1/runs/{id}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.metrics import run_outcome
from orchestrator.spec import PipelineSpec
from orchestrator.tracker import RunTracker
from orchestrator.transport import Transport

if TYPE_CHECKING:
    from app.gateway import Slot

log = logging.getLogger("alto.gateway")

TICK_S = 0.25
GIVE_UP_S = 60.0  # past the deadline with no end in sight (the log is gone): let go
CALL_TIMEOUT_S = 5.0  # one transport call of a check; a black-holed bus must not stall all
READS_PER_TICK = 8  # batches of events per run and tick: a huge log is read over ticks
EVENTS_PER_READ = 512  # at most, per run and batch
RUNS_PER_READ = 256  # runs per bulk read (one pipeline on Redis)
# events one bulk read may return in all (each run's batch shrinks when many are read at
# once, down to 16): 256 runs x 512 events took seconds to decode, in one loop turn
ENTRIES_PER_READ = 8_192
BEAT_S = 10.0  # how often the supervisor renews its watch of a replayed run
WATCH_PREFIX = "watch:"  # a run's followers heartbeat as members of this group + run id
_BUS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)


@dataclass
class Watched:
    spec: PipelineSpec
    run: str
    deadline_at: float  # time.monotonic()
    total_s: float  # the whole deadline, for the message
    grace_at: float | None  # check for a follower then; None: no grace period
    slot: Slot | None
    account: bool  # count the outcome in the run metrics (replayed runs)
    t0: float = field(default_factory=time.monotonic)
    tracker: RunTracker = field(init=False)  # the run's log as read so far
    cursor: str | None = None
    failed: bool = False  # our deadline error was written
    outcome: str | None = None
    ended_at: float | None = None
    beat_at: float = 0.0  # when the supervisor last renewed its watch (replayed runs)
    error: dict[str, Any] | None = None  # the run's error event, if it failed

    def __post_init__(self) -> None:
        self.tracker = RunTracker(self.spec, self.run)


class RunSupervisor:
    """The gateway's one task for runs nobody follows (see the module docstring)."""

    def __init__(
        self,
        transport: Transport,
        fail: Callable[[str, str, str], Awaitable[None]],
        expire: Callable[[str], Awaitable[None]],
        observe: Callable[[Watched], None],
        *,
        tick_s: float = TICK_S,
        give_up_s: float = GIVE_UP_S,
    ) -> None:
        self.transport = transport
        self._fail = fail
        self._expire = expire
        self._observe = observe  # metrics of a run that ended (when `account`)
        self.tick_s = tick_s
        self.give_up_s = give_up_s
        self.runs: dict[str, Watched] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._sweeping = asyncio.Lock()  # the loop's sweeps and a caller's never overlap
        # the bus itself is down: the rest of a sweep would fail alike, so it waits a tick
        self._bus_down = (*_BUS_DOWN, *transport.transient_errors)
        self._member = f"supervisor:{uuid.uuid4().hex[:12]}"

    def watch(self, spec: PipelineSpec, run: str, *, deadline_s: float, total_s: float,
              grace_s: float | None = None, slot: Slot | None = None,
              account: bool = False) -> None:
        now = time.monotonic()
        old = self.runs.get(run)
        if old is not None:  # watched again (a resumed stream dropped): one slot per run
            old.deadline_at = min(old.deadline_at, now + max(0.0, deadline_s))
            if grace_s is not None and not old.account:  # a replay is the gateway's own
                old.grace_at = now + grace_s
            if slot is not None and old.slot is None:
                old.slot = slot
            elif slot is not None:
                slot.release()
            return
        self.runs[run] = Watched(
            spec, run, now + max(0.0, deadline_s), total_s,
            None if grace_s is None or account else now + grace_s, slot, account,
        )
        if self._closed:
            self._end(self.runs[run])
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                                name="run-supervisor")

    async def _loop(self) -> None:
        while self.runs and not self._closed:
            await asyncio.sleep(self.tick_s)
            try:
                await self.sweep()
            except self._bus_down:  # every run's check would fail alike: next tick
                log.warning("checking unfollowed runs: the bus is unreachable; trying "
                            "again", exc_info=True)
            except Exception:  # noqa: BLE001 - the task must outlive any one sweep
                log.warning("checking unfollowed runs failed; trying again", exc_info=True)

    async def sweep(self) -> None:
        """One look at every watched run: read what their logs gained (a few round trips
        for all of them, not one per run), then act on each one's grace period, deadline
        and give-up time. A run's own trouble is logged and tried again next tick; an
        unreachable bus ends the sweep (raised)."""
        async with self._sweeping:
            watched = list(self.runs.values())
            read_errors = await self._read(watched)
            for w in watched:
                if self.runs.get(w.run) is w:  # not ended meanwhile (closed, watched anew)
                    await self._act_logged(w, read_errors.get(w.run))

    async def _act_logged(self, w: Watched, read_error: Exception | None) -> None:
        try:
            await self._act(w, read_error)
        except self._bus_down:
            raise
        except Exception:  # noqa: BLE001 - this run's trouble; the others go on
            log.warning("checking unfollowed run %s failed; trying again", w.run,
                        extra={"run": w.run}, exc_info=True)

    async def _call(self, call: Awaitable[Any]) -> Any:
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives
        # as its call completes, and close() then waited on this loop for good
        async with asyncio.timeout(CALL_TIMEOUT_S):
            return await call

    async def _read(self, watched: list[Watched]) -> dict[str, Exception]:
        """Feed each unfinished run's tracker what its log gained since its cursor, in
        bulk reads of RUNS_PER_READ runs; a run whose batch came back full is read again,
        up to READS_PER_TICK times (a huge log is read over several ticks). Returns the
        runs whose log could not be read, with why."""
        errors: dict[str, Exception] = {}
        todo = [w for w in watched if not w.tracker.finished]
        for _ in range(READS_PER_TICK):
            if not todo:
                break
            more: list[Watched] = []
            for i in range(0, len(todo), RUNS_PER_READ):
                chunk = {w.run: w for w in todo[i:i + RUNS_PER_READ]}
                per_run = min(EVENTS_PER_READ, max(16, ENTRIES_PER_READ // len(chunk)))
                try:
                    got = await self._call(self.transport.read_events_many(
                        {run: w.cursor for run, w in chunk.items()}, per_run))
                except self._bus_down:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. a reply out of shape: each
                    for run in chunk:  # run's deadline is still acted on
                        errors[run] = exc
                    continue
                for run, batch in got.items():
                    w = chunk[run]
                    if isinstance(batch, Exception):
                        errors[run] = batch
                        continue
                    try:
                        for raw_id, event in batch:
                            w.cursor = raw_id
                            for _, ev in w.tracker.feed(raw_id, event):
                                self._note(w, ev)
                    except Exception as exc:  # noqa: BLE001 - e.g. an entry out of shape
                        errors[run] = exc
                        continue
                    if len(batch) >= per_run and not w.tracker.finished:
                        more.append(w)
                await asyncio.sleep(0)  # let the gateway's streams run between reads
            todo = more
        return errors

    async def _act(self, w: Watched, read_error: Exception | None) -> None:
        """Act on what is known of a run: its end, else its grace period, deadline and
        give-up time, whatever the read did (a log that cannot be read must still be
        failed at its deadline). Raises the first error, once all is tried."""
        errors: list[Exception] = [read_error] if read_error is not None else []
        now = time.monotonic()
        if w.tracker.finished:
            await self._finish(w)
            return
        try:
            grace = w.grace_at
            if grace is not None and now >= grace:
                followed = await self._call(self.transport.members(WATCH_PREFIX + w.run))
                if w.grace_at == grace:  # no client dropped again meanwhile (a new grace)
                    if not followed:
                        await self._call(self._fail(
                            w.run, "cancelled",
                            "no client followed the run within the resume grace period"))
                    if w.grace_at == grace:
                        w.grace_at = None  # resumed, or cancelled (its end: next tick)
            if now >= w.deadline_at and not w.failed:
                await self._call(self._fail(
                    w.run, "deadline_exceeded",
                    f"the run did not finish within its deadline ({w.total_s:g} s)"))
                w.failed = True
            if w.account and now - w.beat_at >= BEAT_S:
                ttl_ms = int((max(0.0, w.deadline_at - now) + self.give_up_s + BEAT_S) * 1000)
                await self._call(self.transport.heartbeat(
                    WATCH_PREFIX + w.run, self._member, {"supervisor": True}, ttl_ms))
                w.beat_at = now
        except self._bus_down:
            raise
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        if now >= w.deadline_at + self.give_up_s:
            log.warning("run %s: no end in its log a minute past its deadline; letting go",
                        w.run, extra={"run": w.run})
            if w.outcome is None and w.failed:
                w.outcome, w.ended_at = "timeout", now
            await self._finish(w)
            return
        if errors:
            raise errors[0]

    async def _finish(self, w: Watched) -> None:
        self._end(w)
        with contextlib.suppress(Exception):
            await self._call(self._expire(w.run))
        if w.account:
            with contextlib.suppress(Exception):
                await self._call(self.transport.leave(WATCH_PREFIX + w.run, self._member))

    @staticmethod
    def _note(w: Watched, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "result":
            w.outcome, w.ended_at = "completed", time.monotonic()
        elif kind == "error":
            w.error = ev
            w.outcome = run_outcome(ev.get("code"))
            w.ended_at = time.monotonic()

    def _end(self, w: Watched) -> None:
        self.runs.pop(w.run, None)
        if w.slot is not None:
            w.slot.release()
        if w.account and w.outcome is not None:
            self._observe(w)

    async def close(self) -> None:
        """Stop watching (the gateway is closing): slots go back, no outcome is counted."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for w in list(self.runs.values()):
            if w.slot is not None:
                w.slot.release()
            if w.account:
                with contextlib.suppress(Exception):
                    await self._call(self.transport.leave(WATCH_PREFIX + w.run, self._member))
        self.runs.clear()
