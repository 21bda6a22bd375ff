"""The gateway's state and the life of one run as the gateway sees it.

A request that starts a run goes: admission (a slot, or 429) -> the pipeline exists (or
404) -> a live instance serves every stage (or 503) -> `start_run` -> follow the run's
event log through `follow_run` (the RunTracker decides completion exactly) -> close.

Closing is where disconnects are handled. Whoever started the run owns it; when its
connection ends before the run did, the run is cancelled (`transport.cancel`, which every
runner checks before each call and every ~50 ms while an LM call runs, closing the
engine's generator), an `error` event with code `cancelled` is appended to the log so
anyone following learns why, and the log is given its TTL. OpenAI-compatible endpoints
cancel at once (their clients cannot resume); the native SSE endpoint waits
`resume_grace_s` for a client to come back through `GET /v1/runs/{id}/events` and
cancels only if nobody is following by then. Followers announce themselves with
transport heartbeats (`watch:<run>`), so this works across several gateway replicas on
one Redis.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from app.admission import QueueGuard, same_owner
from app.engines import EnginePool
from app.errors import ApiError
from app.metrics import Metrics, run_outcome
from app.supervisor import WATCH_PREFIX, RunSupervisor, Watched
from orchestrator.spec import PipelineSpec
from orchestrator.tracker import RunTracker, event_order
from orchestrator.transport import Transport
from workers import deadletters
from workers.client import fail_run, follow_run, start_run
from workers.router import PolicyRouter, Router, entry_router
from workers.runtime import Runtime
from workers.settings import Settings
from workers.status import missing_stages
from workers.tracing import start_run_span

log = logging.getLogger("alto.gateway")

_MEMBERS_CACHE_S = 0.5
_ENTRY_REFRESH_S = 0.1  # how stale the entry stage's placement inputs may get


class Slot:
    """One admitted run (or proxied call); `release` is idempotent."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gateway.inflight -= 1
            self._gateway.metrics.inflight.set(self._gateway.inflight)


@dataclass
class RunHandle:
    """A run started by this gateway for one request (its owner)."""

    gateway: Gateway
    spec: PipelineSpec
    run: str
    text: str
    slot: Slot
    deadline_s: float
    created: int = field(default_factory=lambda: int(time.time()))
    t0: float = field(default_factory=time.monotonic)
    finished: bool = False
    outcome: str | None = None
    last_id: str | None = None
    span: Any = None  # the run's OpenTelemetry span (workers/tracing.py), None when off
    _closed: bool = False

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The run's client-visible events, from the start; ends after result/error."""
        follow = self.gateway.follow(self.spec, self.run, deadline_s=self.deadline_left(),
                                     total_s=self.deadline_s)
        async for eid, ev in follow:
            self.last_id = eid
            self._observe(ev)
            yield eid, ev

    def deadline_left(self) -> float:
        return max(0.001, self.deadline_s - (time.monotonic() - self.t0))

    def _observe(self, ev: dict[str, Any]) -> None:
        m = self.gateway.metrics
        kind = ev.get("type")
        if kind == "stage_done":
            m.stage_done_seconds.labels(self.spec.name, ev.get("stage", "")).observe(
                time.monotonic() - self.t0
            )
        elif kind == "result":
            self.finished = True
            self.outcome = "completed"
            m.run_seconds.labels(self.spec.name).observe(time.monotonic() - self.t0)
        elif kind == "error":
            self.finished = True
            self.outcome = run_outcome(ev.get("code"))
            m.run_error(self.spec.name, ev)

    async def close(self, *, grace_s: float = 0.0) -> None:
        """End of the owner's connection: release the slot and cancel unfinished work, or
        with `grace_s`, leave both to a reaper that waits for the client to come back."""
        if self._closed:
            return
        self._closed = True
        self._end_span(grace_s)
        gw = self.gateway
        if not self.finished and grace_s > 0:
            gw.metrics.runs.labels(self.spec.name, "detached").inc()
            # the slot goes with the run: it is released when the run ends or is reaped
            gw.reap_later(self.spec, self.run, grace_s, slot=self.slot,
                          deadline_s=self.deadline_left(), total_s=self.deadline_s)
            return
        self.slot.release()
        if self.finished:
            gw.metrics.runs.labels(self.spec.name, self.outcome or "completed").inc()
            await gw.expire(self.run)
            return
        gw.metrics.runs.labels(self.spec.name, "cancelled").inc()
        await gw.cancel(self.run, "the client disconnected before the run finished")

    def _end_span(self, grace_s: float) -> None:
        """End the run span with the outcome `alto_runs_total` counts (a detached run may
        still be resumed and complete: not an error)."""
        if self.span is None:
            return
        try:
            outcome = (self.outcome or "completed") if self.finished else (
                "detached" if grace_s > 0 else "cancelled")
            self.span.set_attribute("alto.outcome", outcome)
            if outcome not in ("completed", "detached"):
                from opentelemetry.trace import Status, StatusCode

                self.span.set_status(Status(StatusCode.ERROR, outcome))
            self.span.end()
        except Exception:  # noqa: BLE001 - tracing must not break a request
            log.exception("ending the run span failed")


class Gateway:
    def __init__(
        self,
        settings: Settings,
        pipelines: dict[str, PipelineSpec],
        transport: Transport,
        runtime: Runtime | None,
        metrics: Metrics,
        engines: EnginePool,
    ) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.transport = transport
        self.runtime = runtime
        self.metrics = metrics
        self.engines = engines
        self.inflight = 0
        self.viewers = 0  # GET /v1/runs/{id}/events streams open (admit_viewer)
        self.instance = uuid.uuid4().hex[:12]
        self.tracer: Any = None  # set by app/main.py when OpenTelemetry is configured
        self._members_cache: dict[str, tuple[float, int]] = {}
        self.queues = QueueGuard(settings, transport, metrics)
        self.supervisor = RunSupervisor(transport, self.fail, self.expire, self._replayed_ended)
        # per pipeline: where entry messages go (a scheduling policy's placement) and when
        # its inputs (live instances, queue lengths, arrival counts) were last refreshed
        self._entry: dict[str, tuple[Router, float]] = {}
        self._entry_busy: set[str] = set()

    # ---- lookup & admission ----------------------------------------------------------------
    def pipeline(self, name: str, *, param: str | None = None) -> PipelineSpec:
        spec = self.pipelines.get(name)
        if spec is None:
            raise ApiError(
                404,
                f"no pipeline named {name!r} (known: {sorted(self.pipelines)})",
                code="pipeline_not_found",
                param=param,
            )
        return spec

    def admit_viewer(self) -> Callable[[], None]:
        """Let one more client follow a run's events, or refuse with 429 at once: every
        viewer holds a bus connection in a blocking read, and the Redis pool is sized for
        ALTO_MAX_RUN_VIEWERS of them beside the admitted runs. Returns the (idempotent)
        release."""
        if self.viewers >= self.settings.max_run_viewers:
            self.metrics.rejected.inc()
            raise ApiError(
                429,
                f"too many clients following runs ({self.settings.max_run_viewers}); retry "
                "later",
                code="too_many_viewers",
                retry_after_s=self.settings.retry_after_s,
            )
        self.viewers += 1
        self.metrics.viewers.set(self.viewers)
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.viewers -= 1
                self.metrics.viewers.set(self.viewers)

        return release

    def admit(self) -> Slot:
        """Take a slot or refuse with 429 at once: queueing here would hold memory and
        connections without bound, which is what admission control exists to prevent."""
        if self.inflight >= self.settings.max_inflight_runs:
            self.metrics.rejected.inc()
            raise ApiError(
                429,
                f"too many runs in flight ({self.settings.max_inflight_runs}); retry later",
                code="too_many_runs",
                retry_after_s=self.settings.retry_after_s,
            )
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        return Slot(self)

    async def _live(self, group: str) -> int:
        if self.runtime is not None and self.runtime.serves(group):
            return 1  # a runner in this process: alive without a fresh heartbeat
        now = time.monotonic()
        hit = self._members_cache.get(group)
        if hit is not None and now - hit[0] < _MEMBERS_CACHE_S:
            return hit[1]
        n = len(await self.transport.members(group))
        self._members_cache[group] = (now, n)
        return n

    async def missing_stages(self, spec: PipelineSpec) -> list[str]:
        """Stages of `spec` with no live instance (heartbeat) right now."""
        return await missing_stages(self.transport, spec, self._live)

    async def require_workers(self, spec: PipelineSpec) -> None:
        if self.runtime is not None and (failure := self.runtime.failed()) is not None:
            raise ApiError(503, f"the embedded runtime failed: {failure}", code="runtime_failed")
        missing = await self.missing_stages(spec)
        if missing:
            self.metrics.errors.labels("no_workers").inc()
            raise ApiError(
                503,
                f"no worker serves stage(s) {missing} of pipeline {spec.name!r}; "
                f"start them with `alto worker --pipeline FILE --stage NAME`",
                code="no_workers",
                retry_after_s=self.settings.retry_after_s,
            )

    # ---- runs ------------------------------------------------------------------------------
    async def start(
        self, spec: PipelineSpec, text: str, *, owner: str | None = None,
        deadline_s: float | None = None,
    ) -> RunHandle:
        """Admit, check workers and queue bounds, start; the caller must `close()` the
        handle when done. `owner`: the caller's key hash, recorded in the `run` event
        (only that key may read the run); `deadline_s`: default `run_deadline_s`."""
        deadline = self.settings.run_deadline_s if deadline_s is None else deadline_s
        t_ns = time.time_ns()  # the run span starts at admission
        slot = self.admit()
        try:
            await self.require_workers(spec)
            await self.queues.check(spec)
            meta: dict[str, Any] = {"deadline_s": deadline}
            if owner is not None:
                meta["owner"] = owner
            run = await start_run(self.transport, spec, text, meta=meta,
                                  router=await self.entry_router(spec))
            # safety net: the log expires even if this gateway dies before the run ends
            # (the run's end, or its cancel, sets the shorter run_ttl_s)
            await self.expire(run, int(deadline + self.settings.resume_grace_s)
                              + self.settings.run_ttl_s)
        except BaseException:
            slot.release()
            raise
        self.metrics.runs_started.labels(spec.name).inc()
        handle = RunHandle(self, spec, run, text, slot, deadline)
        if self.tracer is not None:
            handle.span = start_run_span(run, "run", self.tracer, start_time=t_ns,
                                         pipeline=spec.name)
        return handle

    async def entry_router(self, spec: PipelineSpec) -> Router:
        """The router entry messages are published with: the plain stream unless the entry
        stage has a scheduling policy (spec or ALTO_POLICY), whose placement needs fresh
        numbers. Refreshed on the request path at most every `_ENTRY_REFRESH_S` (one
        refresh at a time): no background task, and an idle gateway costs nothing."""
        now = time.monotonic()
        entry = self._entry.get(spec.name)
        if entry is None:
            entry = (self._new_entry_router(spec), -_ENTRY_REFRESH_S)
        router, last = entry
        if (isinstance(router, PolicyRouter) and now - last >= _ENTRY_REFRESH_S
                and spec.name not in self._entry_busy):
            self._entry_busy.add(spec.name)
            try:
                await router.refresh_targets(self.transport)
                last = now
            except Exception:  # noqa: BLE001 - stale placement inputs beat a failed run
                log.warning("entry placement refresh failed for %s", spec.name, exc_info=True)
            finally:
                self._entry_busy.discard(spec.name)
        self._entry[spec.name] = (router, last)
        return router

    def _new_entry_router(self, spec: PipelineSpec) -> Router:
        """Placement must match what the entry stage's instances read: in embedded mode,
        their routers (the runtime may have been given a policy other than ALTO_POLICY);
        otherwise ALTO_POLICY, which every process of a deployment must share."""
        if self.runtime is not None:
            for r in self.runtime.runners:
                if r.spec.name == spec.name and r.stage.name == spec.entry_stage:
                    if isinstance(r.router, PolicyRouter):
                        return PolicyRouter(spec, None, override=r.router.override,
                                            options=r.router.opts)
                    return Router(spec)
        return entry_router(spec, self.settings.policy)

    async def lookup_run(
        self, run: str, owner: str | None = None
    ) -> tuple[PipelineSpec, dict[str, Any]]:
        """The pipeline of a run and its `run` event, or 404: unknown, expired, or
        created with another API key (404, not 403: other keys must not learn that the
        run exists)."""
        first = await self.transport.read_events(run, None, 1, 0)
        if (not first or first[0][1].get("type") != "run"
                or not same_owner(first[0][1].get("owner"), owner)):
            raise ApiError(404, f"no run {run!r} (unknown, or its events have expired)",
                           code="run_not_found", param="run_id")
        ev = first[0][1]
        spec = self.pipelines.get(str(ev.get("pipeline")))
        if spec is None:
            raise ApiError(404, f"run {run!r} belongs to pipeline {ev.get('pipeline')!r}, "
                                "which this gateway does not serve", code="pipeline_not_found")
        return spec, ev

    async def follow(
        self,
        spec: PipelineSpec,
        run: str,
        *,
        after: str | None = None,
        deadline_s: float,
        total_s: float | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Follow a run (after event id `after`) as a registered watcher.

        Past the deadline the run is failed for good: an `error` event (code
        `deadline_exceeded`) is appended to its log and its work cancelled, and that event
        is what this follower (and any later one) sees last.
        """
        member = f"{self.instance}:{uuid.uuid4().hex[:8]}"
        group = WATCH_PREFIX + run
        ttl_ms = int((deadline_s + self.settings.resume_grace_s + 60) * 1000)
        await self.transport.heartbeat(group, member, {"gateway": self.instance}, ttl_ms)
        last = after
        try:
            try:
                async for eid, ev in follow_run(
                    self.transport, spec, run, after=after, deadline_s=deadline_s
                ):
                    last = eid
                    yield eid, public_event(ev)
                return
            except TimeoutError:
                pass
            total = self.settings.run_deadline_s if total_s is None else total_s
            await self.fail(run, "deadline_exceeded",
                            f"the run did not finish within its deadline ({total:g} s)")
            try:
                async for eid, ev in follow_run(
                    self.transport, spec, run, after=last, deadline_s=5.0
                ):
                    yield eid, public_event(ev)
            except TimeoutError:  # the log itself is unreachable: say so without an id
                yield "", {"type": "error", "run": run, "code": "deadline_exceeded",
                           "message": "the run did not finish in time"}
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.transport.leave(group, member)

    async def fail(self, run: str, code: str, message: str) -> None:
        """End a run with an error event (first one wins for followers) and cancel it."""
        await fail_run(self.transport, run, code, message, max(1, self.settings.run_ttl_s))
        await self.expire(run)

    async def cancel(self, run: str, reason: str) -> None:
        try:
            await self.fail(run, "cancelled", reason)
        except Exception:  # noqa: BLE001 - a cancel that cannot be sent is logged, not raised
            log.exception("could not cancel run %s", run)

    async def expire(self, run: str, ttl_s: int | None = None) -> None:
        with contextlib.suppress(Exception):
            ttl = self.settings.run_ttl_s if ttl_s is None else ttl_s
            await self.transport.expire_run(run, max(1, ttl))

    async def finished(self, spec: PipelineSpec, run: str) -> bool:
        """Whether the run's log already holds its end (replayed through a tracker)."""
        tracker = RunTracker(spec, run)
        cursor = None
        while True:
            batch = await self.transport.read_events(run, cursor, 512, 0)
            if not batch:
                return tracker.finished
            for eid, ev in batch:
                cursor = eid
                tracker.feed(eid, ev)
                if tracker.finished:
                    return True

    def reap_later(self, spec: PipelineSpec, run: str, grace_s: float, *, deadline_s: float,
                   total_s: float, slot: Slot | None = None) -> None:
        """A run whose client went away: cancelled after `grace_s` unless someone follows
        it again by then, failed at its deadline (`deadline_s` left of `total_s`), and
        holding `slot` (its admission slot) until it ends; see app/supervisor.py."""
        self.supervisor.watch(spec, run, deadline_s=deadline_s, total_s=total_s,
                              grace_s=grace_s, slot=slot)

    async def replay(self, spec: PipelineSpec, entry_ids: list[str] | None, *,
                     owner: str | None) -> dict[str, str]:
        """Replay dead letters as new runs this gateway answers for as for its own: each
        takes an admission slot before it starts (as many runs as there are free slots;
        the letters of the others stay unresolved for a later replay, 429 when not even
        one fits), gets the run deadline, enforced although no client follows it, the log
        TTL and the run metrics of a run a request started."""
        deadline = self.settings.run_deadline_s
        slots: list[Slot] = []
        started: list[str] = []

        def may_start() -> bool:
            try:
                slots.append(self.admit())
            except ApiError:
                if not started:
                    raise  # not one fits: 429
                return False
            return True

        async def on_start(run: str) -> None:  # watched at once: a later failure strands none
            started.append(run)
            self.metrics.runs_started.labels(spec.name).inc()
            self.supervisor.watch(spec, run, deadline_s=deadline, total_s=deadline,
                                  slot=slots.pop(), account=True)
            await self.expire(run, int(deadline + self.settings.resume_grace_s)
                              + self.settings.run_ttl_s)

        try:
            return await deadletters.replay(self.transport, spec, entry_ids, owner=owner,
                                            deadline_s=deadline, may_start=may_start,
                                            on_start=on_start)
        finally:
            for slot in slots:  # taken for a run that did not start
                slot.release()

    def _replayed_ended(self, w: Watched) -> None:
        """Count a replayed run's outcome, time and error as a request's run is counted
        (RunHandle._observe)."""
        m = self.metrics
        m.runs.labels(w.spec.name, w.outcome or "completed").inc()
        if w.outcome == "completed" and w.ended_at is not None:
            m.run_seconds.labels(w.spec.name).observe(w.ended_at - w.t0)
        if w.error is not None:
            m.run_error(w.spec.name, w.error)
        elif w.outcome == "timeout":  # failed by us, its error event never read back
            m.errors.labels("run_deadline_exceeded").inc()

    async def close(self) -> None:
        await self.supervisor.close()
        await self.engines.close()


def public_event(ev: dict[str, Any]) -> dict[str, Any]:
    """What clients see of a raw event: without the internal de-duplication id and the
    owner's key hash."""
    return {k: v for k, v in ev.items() if k not in ("mid", "owner")}


def valid_event_id(value: str) -> bool:
    try:
        event_order(value)
    except ValueError:
        return False
    return True
