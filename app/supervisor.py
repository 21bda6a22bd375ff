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

Supervision lives as long as the gateway: on shutdown the slots go with the process, and
the deadline the `run` event records is enforced by the next `GET /v1/runs/{id}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.spec import PipelineSpec
from orchestrator.tracker import RunTracker
from orchestrator.transport import Transport

if TYPE_CHECKING:
    from app.gateway import Slot

log = logging.getLogger("alto.gateway")

TICK_S = 0.25
GIVE_UP_S = 60.0  # past the deadline with no end in sight (the log is gone): let go
WATCH_PREFIX = "watch:"  # a run's followers heartbeat as members of this group + run id


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
    tracker: RunTracker | None = None
    cursor: str | None = None
    failed: bool = False  # our deadline error was written
    outcome: str | None = None
    ended_at: float | None = None


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
    ) -> None:
        self.transport = transport
        self._fail = fail
        self._expire = expire
        self._observe = observe  # metrics of a run that ended (when `account`)
        self.tick_s = tick_s
        self.runs: dict[str, Watched] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, spec: PipelineSpec, run: str, *, deadline_s: float, total_s: float,
              grace_s: float | None = None, slot: Slot | None = None,
              account: bool = False) -> None:
        now = time.monotonic()
        old = self.runs.get(run)
        if old is not None:  # watched again (a resumed stream dropped): one slot per run
            if grace_s is not None:
                old.grace_at = now + grace_s
            if slot is not None and old.slot is None:
                old.slot = slot
            elif slot is not None:
                slot.release()
            old.account = old.account or account
            return
        self.runs[run] = Watched(
            spec, run, now + max(0.0, deadline_s), total_s,
            None if grace_s is None else now + grace_s, slot, account,
            tracker=RunTracker(spec, run),
        )
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                                name="run-supervisor")

    async def _loop(self) -> None:
        while self.runs:
            await asyncio.sleep(self.tick_s)
            for w in list(self.runs.values()):
                try:
                    await self._check(w)
                except Exception:  # noqa: BLE001 - the bus may be restarting: next tick
                    log.warning("checking unfollowed run %s failed; trying again", w.run,
                                exc_info=True)

    async def _check(self, w: Watched) -> None:
        assert w.tracker is not None
        while not w.tracker.finished:
            batch = await self.transport.read_events(w.run, w.cursor, 512, 0)
            if not batch:
                break
            for raw_id, event in batch:
                w.cursor = raw_id
                for _, ev in w.tracker.feed(raw_id, event):
                    self._note(w, ev)
        now = time.monotonic()
        if w.tracker.finished:
            self._end(w)
            with contextlib.suppress(Exception):
                await self._expire(w.run)
            return
        if w.grace_at is not None and now >= w.grace_at:
            if not await self.transport.members(WATCH_PREFIX + w.run):
                await self._fail(w.run, "cancelled",
                                 "no client followed the run within the resume grace period")
            w.grace_at = None  # resumed, or cancelled (its end is read at the next tick)
        if now >= w.deadline_at and not w.failed:
            await self._fail(w.run, "deadline_exceeded",
                             f"the run did not finish within its deadline ({w.total_s:g} s)")
            w.failed = True
        if now >= w.deadline_at + GIVE_UP_S:
            log.warning("run %s: no end in its log a minute past its deadline; letting go",
                        w.run)
            self._end(w)

    @staticmethod
    def _note(w: Watched, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "result":
            w.outcome, w.ended_at = "completed", time.monotonic()
        elif kind == "error":
            code = ev.get("code") or "error"
            w.outcome = {"deadline_exceeded": "timeout", "cancelled": "cancelled"}.get(
                code, "failed")
            w.ended_at = time.monotonic()

    def _end(self, w: Watched) -> None:
        self.runs.pop(w.run, None)
        if w.slot is not None:
            w.slot.release()
        if w.account and w.outcome is not None:
            self._observe(w)

    async def close(self) -> None:
        """Stop watching (the gateway is closing): slots go back, no outcome is counted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for w in list(self.runs.values()):
            if w.slot is not None:
                w.slot.release()
        self.runs.clear()
