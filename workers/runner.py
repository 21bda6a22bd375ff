"""One instance of one stage: consume its stream(s), call the stage, publish units.

The runner is where the correctness contract of DESIGN.md is kept:
* each unit is published the moment the framer completes it (barrier mode: all at the
  end), together with a progress record, in one atomic commit; units that only exist once
  the call is over (a plain function's result, `whole` framing, an LM's last unit) ride in
  the call's final commit with the end marker, which is no later and one commit cheaper;
* the input is acknowledged in the same commit as its end marker, never earlier, so a
  crash at any instruction leaves the input pending for another instance to claim;
* a re-run of an input (after a crash, or a duplicate entry) reads the progress record:
  it publishes nothing twice (ids are deterministic, and units already published are
  skipped) and gives its end marker exactly the credit not yet handed out;
* an entry seen for the first time by a stage without an engine skips that read (one
  round trip per hop): every commit for it carries a `Guard`, so if it turns out to be a
  duplicate of finished work, or its run was cancelled, the transport applies only its
  ack, atomically; an end marker is forwarded the same way;
* an aggregating stage keeps each key's messages *unacknowledged* until the key fires,
  so its state lives in the stream's pending list and survives the instance: a new
  owner of the partition claims those entries and rebuilds the state;
* every write an aggregating owner makes for a group is fenced by its partition lease's
  token: once the lease has moved, the stale owner's commit is refused atomically and it
  drops the partition;
* an input that fails (engine error, bad data) or keeps killing its worker (delivered
  more than `max_deliveries` times) goes to the pipeline's dead-letter stream with the
  reason, acknowledged in the same commit as the run's `error` event; the run is then
  cancelled so no stage keeps work (or pending entries) for it;
* the loop survives an unreachable bus (`Transport.transient_errors`): it backs off and
  goes on; a step that failed half-way leaves its input pending, to be claimed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from orchestrator.embedded import NoGroupError
from orchestrator.envelope import (
    Envelope,
    Lineage,
    credit_str,
    dumps_json,
    end_id,
    lineage_str,
    loads_json,
    parse_lineage,
    unit_id,
)
from orchestrator.routing import (
    PREFIX,
    aggregation_key,
    end_credit,
    expected_credit,
    key_lineage,
    stage_group,
    unit_credit,
)
from orchestrator.spec import PipelineSpec
from orchestrator.template import StageContext
from orchestrator.transport import (
    Commit,
    Delivery,
    Fence,
    FencedError,
    Guard,
    PendingEntry,
    Progress,
    Transport,
)
from workers.router import Router
from workers.stagefn import DEFAULT_SLOTS, CallStats, StageFunction, StageTimeout

log = logging.getLogger("alto.runner")

Observer = Callable[[str, dict[str, Any]], None]
_SCAN = 1_000  # pending entries listed per holder when looking for abandoned work


def dead_letter_stream(pipeline: str) -> str:
    """Where a pipeline's failed inputs go (never consumed by a stage, never trimmed by
    the runtime): one envelope per failure, payload {reason, stage, run, entries, envelope}."""
    return f"{PREFIX}:{pipeline}:dead"


def _rank(member: str, salt: str) -> bytes:
    return hashlib.blake2b(f"{member}|{salt}".encode()).digest()


def partition_owners(members: list[str], partitions: int) -> list[str]:
    """Owner of each partition: balanced rendezvous hashing. Every member gets
    floor(P/M) or ceil(P/M) partitions (plain rendezvous can give one member most of them),
    each partition going to its highest-ranked member that still has room; deterministic
    from the member set, so every instance computes the same table."""
    members = sorted(set(members))
    if not members:
        return []
    quota, extra = divmod(partitions, len(members))
    room = {m: quota for m in members}
    for m in sorted(members, key=lambda m: _rank(m, "extra"), reverse=True)[:extra]:
        room[m] += 1
    owners = []
    for i in range(partitions):
        best = max((m for m in members if room[m] > 0), key=lambda m, i=i: _rank(m, str(i)))
        room[best] -= 1
        owners.append(best)
    return owners


@dataclass
class RunnerConfig:
    claim_idle_ms: int = 30_000  # pending this long => its consumer is presumed dead
    block_ms: int = 200
    lease_ttl_ms: int = 5_000
    heartbeat_ms: int = 1_000
    partial_events: bool = True  # publish every unit as a `partial` run event
    read_ahead: int = 64  # entries an aggregating stage may read beyond its free slots
    max_deliveries: int = 5  # an input delivered more often than this is dead-lettered
    trim_interval_ms: int = 5_000  # how often the runner trims the streams it reads
    cancel_ttl_s: int = 3_600  # how long a failed run's cancel flag lives

    @property
    def member_ttl_ms(self) -> int:
        """How long an instance stays a member without a heartbeat; a consumer that is not
        a member is dead, and its pending entries are taken over once this idle."""
        return self.heartbeat_ms * 5

    @classmethod
    def from_settings(cls, settings: Any) -> RunnerConfig:
        """The runner knobs of `workers.settings.Settings` (the gateway's embedded stages and
        `alto worker` must read the same ones)."""
        return cls(
            claim_idle_ms=settings.claim_idle_ms,
            lease_ttl_ms=settings.lease_ttl_ms,
            heartbeat_ms=settings.heartbeat_ms,
            max_deliveries=settings.max_deliveries,
            trim_interval_ms=settings.trim_interval_ms,
        )


@dataclass
class _Group:
    """Messages of one aggregation key received so far (unacknowledged)."""

    key: str
    klin: Lineage
    expected: Fraction
    partition: str
    got: dict[str, Delivery] = field(default_factory=dict)
    extra: list[Delivery] = field(default_factory=list)  # duplicates: acked with the group
    total: Fraction = Fraction(0)
    firing: bool = False


class _Slot:
    """The runner slot one input's task holds. It is handed back as soon as the call is
    over, before the final commit: the slot bounds calls (an engine's batch), and holding
    it through the commit's round trip made a worker alternate between computing and
    waiting for Redis instead of overlapping the two. From then on the task no longer
    counts in `inflight` (the load routers see, and what decides how many new entries the
    runner reads)."""

    __slots__ = ("runner", "released")

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.runner.inflight -= 1  # what routers and heartbeats report as load
            self.runner._slots.release()
            self.runner._slot_freed.set()


async def _wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` passes. `asyncio.timeout`, not `wait_for`: on
    Python 3.11, `wait_for` returns normally if the event is set in the same loop turn as
    the caller is cancelled, swallowing the cancellation (a runner told to stop while its
    tasks were ending kept running forever: a test hung in CI)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


class LeftPending(Exception):
    """A call given up without failing its input: the entry stays pending, for this or
    another worker to take again (a retry's backoff interrupted by a drain)."""


RETRY_CANCEL_POLL_S = 0.5  # how often a retry's backoff looks at its run's cancel flag


class CallCut(Exception):
    """A call the run's cancel cut short raised (its cleanup failed, or a stage timeout
    raced the cancel): the run is over, so its input is acknowledged; failing the run
    would dead-letter an input nobody waits for."""


class OutputNotJSON(Exception):
    """A stage's unit could not be written: units travel as JSON (between stages, in
    events, to clients). The run fails with this message instead of the encoder's bare
    TypeError and a traceback through the transport."""

    def __init__(self, stage: str, exc: Exception) -> None:
        super().__init__(
            f"stage {stage!r} produced a unit that is not JSON ({exc}); a stage's output "
            "must be made of str, int, float, bool, None, lists and dicts with str keys")


_SCALARS = (str, int, float, bool)  # exact types: units that read back as they are
# What encoding a value JSON cannot hold raises (RecursionError: nested too deep to write;
# caught alike on both transports, so such a unit is not retried on either).
_NOT_JSON = (TypeError, ValueError, RecursionError)
BACKLOG_MS = 1_000  # an entry this much older than now waited in a backlog


def _waited(entry_id: str) -> bool:
    """Whether a Redis stream entry (id "<ms>-<seq>", the server's clock) was appended
    more than BACKLOG_MS ago: its run may have been cancelled or timed out meanwhile, so
    it is worth a round trip to ask before the call. Entries read as they arrive are not
    (that read was one round trip on every hop). Other ids (the embedded transport's
    counters) never look old."""
    ms = entry_id.partition("-")[0]
    return ms.isdigit() and int(ms) > 10**12 and time.time() * 1000 - int(ms) > BACKLOG_MS


def _error_code(exc: BaseException) -> str:
    """The `code` of the run's error event for a call that raised `exc`."""
    return exc.code if isinstance(exc, StageTimeout) else "stage_error"


def _fires(g: _Group) -> str:
    """The progress key counting a group's firing attempts (`_count_fire`)."""
    return f"fires:{g.key}"


class StageRunner:
    def __init__(
        self,
        spec: PipelineSpec,
        stage: str,
        transport: Transport,
        function: StageFunction,
        *,
        instance: str,
        concurrency: int | None = None,
        config: RunnerConfig | None = None,
        observer: Observer | None = None,
        router: Router | None = None,
    ):
        self.spec = spec
        self.router = router or Router(spec)
        self.stage = spec.stage(stage)
        self.transport = transport
        self.function = function
        self.instance = instance
        self.config = config or RunnerConfig()
        self.observer = observer
        # slots: what the spec (or the caller) asks for, never more than the engine batches;
        # unset on an LM stage = the engine's capacity (vLLM batches 256 sequences: a fixed
        # default of 8 would leave most of the batch idle), unset elsewhere = DEFAULT_SLOTS
        cap = concurrency or self.stage.concurrency
        if function.engine is not None:
            cap = min(cap or function.engine.capacity, function.engine.capacity)
        cap = cap or DEFAULT_SLOTS
        self.capacity = max(1, cap)
        function.slots = self.capacity  # sizes its threads, for a plain function
        self.group = stage_group(spec.name, stage)
        self.streams = self.router.all_streams(stage)
        self.owned: list[str] = [] if self.stage.aggregates else list(self.streams)
        self.successors = list(self.stage.to)
        self.is_sink = not self.successors
        self.is_output = stage == spec.output_stage
        # `_emit` checks a unit only where nothing else encodes it: the embedded transport
        # passes envelopes on as objects, and a unit no message or event carries is written
        # nowhere. On Redis the commit encodes every unit anyway, and `_commit_units` turns
        # the encoder's error into the same OutputNotJSON: one encoding of a unit, not two.
        self._check_units = transport.in_process or not (
            self.successors or self.config.partial_events or self.is_output)
        self.streaming = spec.streaming_for(stage)
        self._slots = asyncio.Semaphore(self.capacity)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._groups: dict[str, _Group] = {}
        self._held: set[tuple[str, str]] = set()  # (stream, entry id) kept pending in groups
        self._running: set[tuple[str, str]] = set()  # (stream, entry id) being processed here
        self._suspect: tuple[str, str] | None = None  # the claimed entry running in isolation
        self._tokens: dict[str, int] = {}  # owned partition stream -> its lease's fencing token
        self._handing_over: set[str] = set()  # partitions moving away, kept while groups fire
        self._leaving = False  # draining: hand every partition over
        self._leases = {s: f"{self.group}:p{i}" for i, s in enumerate(self.streams)}
        self._next_beat = self._next_claim = self._next_trim = self._next_touch = 0.0
        self._fired: OrderedDict[str, None] = OrderedDict()
        self._cancelled_runs: OrderedDict[str, None] = OrderedDict()
        self._stop: asyncio.Event | None = None  # set: draining (run's `stop`)
        self.processed = 0
        self.inflight = 0
        self.sweeps = 0  # idle sweeps made (stats: tests wait on them)
        self.beats = 0  # heartbeats sent

    # ------------------------------------------------------------------ main loop
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        await self._ensure_groups()
        await self._heartbeat()
        backoff = 0.0
        try:
            while not stop.is_set():
                try:
                    await self._tick(stop)
                    backoff = 0.0
                except self.transport.transient_errors as exc:
                    # the bus is unreachable (Redis restarting): back off and go on; what
                    # failed half-way is still pending and will be claimed again
                    backoff = min(max(2 * backoff, 0.05), 2.0)
                    log.warning("stage %s: transport unavailable (%s); retrying in %.2fs",
                                self.stage.name, exc, backoff)
                    await _wait_event(stop, backoff)
                except NoGroupError:  # the bus lost its state (no persistence): recreate
                    log.warning("stage %s: consumer group missing; recreating", self.stage.name)
                    await self._ensure_groups()
        finally:
            await self._drain()

    async def _ensure_groups(self) -> None:
        for s in self.streams:
            await self.transport.ensure_group(s, self.group)

    async def _tick(self, stop: asyncio.Event) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            await self._heartbeat()
            if self.stage.aggregates:
                await self._rebalance()
                await self._drop_cancelled_groups()
            else:
                await self._recover(sweep=False)
            await self.router.refresh(self)
            self._next_beat = now + self.config.heartbeat_ms / 1000
        if now >= self._next_touch and not self.stage.aggregates:
            # a long call (a long generation) must not look abandoned to the idle sweeps
            self._next_touch = now + self.config.claim_idle_ms / 3000
            await self._touch_running()
        if now >= self._next_claim:
            self._next_claim = now + self.config.claim_idle_ms / 2000
            await self._claim_abandoned()
        if now >= self._next_trim:
            for s in self.owned:  # the janitor: never drops an unacknowledged entry
                await self.transport.trim(s)
            self._next_trim = now + self.config.trim_interval_ms / 1000
        free = self.capacity - self.inflight
        if free <= 0 or not self.owned:
            await self._wait_slot(stop)
            return
        # an aggregator holds what it reads without using a slot until a group is
        # complete: read ahead, or a full group waits one read per missing piece
        want = max(free, self.config.read_ahead) if self.stage.aggregates else free
        got = await self.router.consume(self, want)
        for d in got:
            await self._accept(d)
        if got:
            # let the calls just spawned start before the next read goes out: building and
            # sending that read is ~0.1 ms of Python that otherwise sits between an input's
            # arrival and its call (A/B in BENCHMARKS.md: hop p50 -0.16 ms, p99 -0.9 ms);
            # and one turn more, for the commits of calls that ended in their first step
            # (their group commit goes out from a task scheduled behind this one)
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    async def _wait_slot(self, stop: asyncio.Event) -> None:
        """Until a slot may be free (a task ended, or handed its slot back) or `block_ms`
        passes. An event, not `asyncio.wait` over all tasks: that registers and removes a
        callback on each of them per wait, on the path of every input."""
        if not self._tasks:
            await _wait_event(stop, self.config.block_ms / 1000)
            return
        self._slot_freed.clear()
        await _wait_event(self._slot_freed, self.config.block_ms / 1000)

    async def _drain(self) -> None:
        """Let in-flight work finish (SIGTERM drain); what does not finish stays pending.

        Heartbeats, and touches of the entries still running, go on meanwhile: a draining
        worker is alive, and once its membership expired the others would take over (and
        re-run) the calls it is finishing, as they do a dead worker's. An aggregator
        leaves the members at once instead, so the others take its partitions now; each
        is handed over as soon as no group of it is firing (`_rebalance`)."""
        if self.stage.aggregates:
            self._leaving = True
            with contextlib.suppress(*self.transport.transient_errors):
                await self.transport.leave(self.group, self.instance)
        while True:
            try:
                if self.stage.aggregates:
                    await self._rebalance()
                else:
                    await self._heartbeat()
                    await self._touch_running()
            except Exception as exc:  # noqa: BLE001 - a drain goes on whatever the bus says
                log.warning("stage %s: while draining: %s: %s",
                            self.stage.name, type(exc).__name__, exc)
            if not self._tasks:
                break
            await asyncio.wait(list(self._tasks), timeout=self.config.heartbeat_ms / 1000)
        with contextlib.suppress(Exception):
            await self.transport.leave(self.group, self.instance)
            if self.stage.aggregates:  # nothing fires any more
                for s in {*self.owned, *self._handing_over}:
                    await self.transport.release_lease(self._leases[s], self.instance)

    async def abort(self) -> None:
        """Stop at once without finishing: in-flight inputs stay pending (crash-like)."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        self.inflight += 1
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self.inflight -= 1
            self._slot_freed.set()
            if not t.cancelled() and t.exception() is not None:
                log.error("stage %s task failed", self.stage.name, exc_info=t.exception())

        task.add_done_callback(done)

    async def _heartbeat(self) -> None:
        info = {
            "stage": self.stage.name,
            "pipeline": self.spec.name,
            "capacity": self.capacity,
            "inflight": self.inflight,
            "processed": self.processed,
            "engine": getattr(self.function.engine, "name", None),
        }
        await self.transport.heartbeat(self.group, self.instance, info, self.config.member_ttl_ms)
        self.beats += 1

    async def _claim_abandoned(self) -> None:
        """The idle sweep: entries pending longer than `claim_idle_ms`, whoever holds them.
        Running entries are kept fresh (`_touch_running`), so this finds entries nobody
        runs: a transient error left one pending, or its worker's loop stalled."""
        if not self.stage.aggregates:
            self.sweeps += 1
            await self._recover(sweep=True)
            return
        # an aggregator holds its groups' entries pending on purpose; claiming them back is
        # a no-op, so it must look at all of them or a lost one could hide behind them
        for s in self.owned:
            got = await self.transport.claim_abandoned(
                s, self.group, self.instance, self.config.claim_idle_ms, 100_000
            )
            self._report_reclaimed(got)
            for d in got:
                await self._accept(d)

    async def _touch_running(self) -> None:
        """Reset the idle time of the entries running here (not a delivery), every
        `claim_idle_ms` / 3: an entry idle past `claim_idle_ms` then means a worker whose
        loop stalled (or an entry a transient error left pending), never a long call. An
        aggregator's held entries need none: only the partition's owner sweeps them."""
        by: dict[str, list[str]] = {}
        for stream, entry_id in self._running:
            by.setdefault(stream, []).append(entry_id)
        for stream, ids in by.items():
            await self.transport.touch(stream, self.group, self.instance, ids)

    def _report_reclaimed(self, got: list[Delivery]) -> None:
        if got and self.observer is not None:  # entries we hold already are not news
            fresh = sum((d.stream, d.entry_id) not in self._held for d in got)
            self.observer("reclaimed", {"pipeline": self.spec.name, "stage": self.stage.name,
                                        "instance": self.instance, "count": fresh})

    async def _recover(self, *, sweep: bool) -> None:
        """A stateless stage takes over abandoned entries: those of consumers whose
        heartbeat has expired (checked every heartbeat, so a crashed worker's backlog moves
        within about one member TTL, not `claim_idle_ms`), and with `sweep` those idle past
        `claim_idle_ms`.

        A claim counts a delivery, and a crash charges every entry its worker held. An
        entry delivered once was near at most one crash: such entries are claimed
        together, up to the free slots, and run in parallel (before, a crashed LM worker's
        256 calls were re-run one after another). An entry delivered more often has been
        near two crashes: it is claimed alone, and the next such one only after it ends
        ("isolation"), so a poison input goes on crashing workers by itself until it is
        dead-lettered. An innocent entry is thus charged for at most two crashes it did not
        cause (its worker's, and one shared retry) before it runs alone; with
        `max_deliveries` below 3 that would dead-letter it, so every entry is isolated."""
        if not self.owned:
            return
        held = await self.transport.pending_consumers(self.owned, self.group)
        if not held:
            return
        live: set[str] | None = None
        for s, holders in held.items():
            found: dict[str, PendingEntry] = {}
            if sweep:
                for p in await self.transport.pending(
                    s, self.group, _SCAN, min_idle_ms=self.config.claim_idle_ms
                ):
                    found[p.entry_id] = p
            for holder in holders:
                if holder == self.instance:
                    continue
                if live is None:
                    live = set(await self.transport.members(self.group))
                if holder in live:
                    continue
                for p in await self.transport.pending(
                    s, self.group, _SCAN, min_idle_ms=self.config.member_ttl_ms,
                    consumer=holder,
                ):
                    found.setdefault(p.entry_id, p)
            # (each listing is oldest first: the idle sweep's, then each dead holder's)
            if found and await self._take_over(s, list(found.values())):
                return

    async def _take_over(self, stream: str, found: list[PendingEntry]) -> bool:
        """Claim what `_recover` found on one stream; True once a suspect runs alone.

        One idle bound serves both kinds of find: an entry's idle time only drops when
        someone claims or touches it, and then it is under either bound, so a claim that
        still sees it idle this long takes it before any other claimer or its owner's
        touch."""
        found = [p for p in found if (stream, p.entry_id) not in self._running]
        shared = self.config.max_deliveries >= 3  # room for a shared retry (_recover)
        once = [p for p in found if p.deliveries <= 1 and shared]
        batch = once[: max(1, self.capacity - self.inflight)]
        if len(batch) < len(once):
            self._next_claim = 0.0  # more than we had room for: come back next tick
        if not batch and self._suspect is None:
            batch = [p for p in found if p.deliveries > 1 or not shared][:1]
        if not batch:
            return False
        bound = min(self.config.claim_idle_ms, self.config.member_ttl_ms)
        got = await self.transport.claim(
            stream, self.group, self.instance, [p.entry_id for p in batch], bound
        )
        self._report_reclaimed(got)
        for d in got:
            await self._accept(d)
            if d.deliveries > 2 or not shared:  # claimed alone
                if (d.stream, d.entry_id) in self._running:
                    self._suspect = (d.stream, d.entry_id)
                    return True
                self._next_claim = 0.0  # settled at once (dead-lettered): take the next
        return False

    async def _rebalance(self) -> None:
        """Own the partitions balanced rendezvous hashing gives this instance among live
        members (none once it is leaving), each under its lease; a lease (re)acquired with a
        new fencing token means anything held for it is stale (another owner may have had
        it): rebuild.

        A partition that moves away while one of its groups is firing is handed over, not
        dropped: it is no longer read, its other groups are let go (their entries stay
        pending for the next owner), and its lease is renewed until the firing ends, then
        released. Dropping it at once let the next owner take the lease and fire the group
        again beside the running call (an LM aggregator's call, for every partition that
        moved when an instance joined or drained), the old call's commit then refused."""
        members = list(await self.transport.members(self.group)) or [self.instance]
        owners = [] if self._leaving else partition_owners(members, len(self.streams))
        owned = []
        for i, stream in enumerate(self.streams):
            lease = self._leases[stream]
            held = self._tokens.get(stream)
            if owners and owners[i] == self.instance:
                token = await self.transport.acquire_fenced(
                    lease, self.instance, self.config.lease_ttl_ms
                )
                if token is None:  # still held by another owner (handing it over)
                    if stream in self.owned or stream in self._handing_over:
                        self._drop_partition(stream)
                    continue
                if token != held:
                    # a new acquisition: what we held before is stale, firing groups
                    # included (their commits carry the old token and will be refused)
                    self._forget_partition(stream, firing=True)
                    self._tokens[stream] = token
                if token != held or stream not in self.owned:
                    # (re)gained: rebuild the partition's state from its pending entries
                    # (entries of groups still held here are skipped by `_accept`)
                    self._handing_over.discard(stream)
                    for d in await self.transport.claim_abandoned(
                        stream, self.group, self.instance, 0, 1_000_000
                    ):
                        await self._accept(d, partition=stream)
                owned.append(stream)
            elif stream in self.owned or stream in self._handing_over:
                self._forget_partition(stream)  # its groups that are not firing
                if self._firing_in(stream):
                    token = await self.transport.acquire_fenced(
                        lease, self.instance, self.config.lease_ttl_ms
                    )
                    if token is not None and token == held:
                        self._handing_over.add(stream)
                        continue
                    if token is not None:  # lapsed and taken anew by us: not wanted
                        await self.transport.release_lease(lease, self.instance)
                    self._drop_partition(stream)  # lost: its commits will be refused
                    continue
                await self.transport.release_lease(lease, self.instance)
                self._drop_partition(stream)
        self.owned = owned

    def _firing_in(self, stream: str) -> bool:
        return any(g.partition == stream and g.firing for g in self._groups.values())

    def _drop_partition(self, stream: str) -> None:
        """Forget a partition whose lease is gone or released, firing groups included."""
        self._handing_over.discard(stream)
        self._tokens.pop(stream, None)
        self._forget_partition(stream, firing=True)

    def _forget_partition(self, stream: str, *, firing: bool = False) -> None:
        """Drop the groups of a partition we no longer own (its entries stay pending for the
        owner to claim), and forget that we held them, or a later return of the partition
        would skip those entries as already held and the group could never complete."""
        for key in [k for k, g in self._groups.items()
                    if g.partition == stream and (firing or not g.firing)]:
            g = self._groups.pop(key)
            for d in [*g.got.values(), *g.extra]:
                self._held.discard((d.stream, d.entry_id))

    def _fence(self, g: _Group) -> Fence:
        """The fence for writes about group `g`; refused at once if we no longer own it."""
        token = self._tokens.get(g.partition)
        if token is None:
            raise FencedError(f"partition {g.partition} is no longer owned here")
        return Fence(self._leases[g.partition], token)

    def _fenced_out(self, g: _Group, fence: Fence | None) -> None:
        """A commit for `g` was refused: the lease moved. Drop the partition (unless it has
        been re-acquired since, under a newer token) and the group."""
        log.warning("stage %s: lost partition %s (fenced); dropping its groups",
                    self.stage.name, g.partition)
        if self._groups.get(g.key) is g:
            self._groups.pop(g.key)
        for d in [*g.got.values(), *g.extra]:
            self._held.discard((d.stream, d.entry_id))
        if fence is None or self._tokens.get(g.partition) == fence.token:
            self._drop_partition(g.partition)
            self.owned = [s for s in self.owned if s != g.partition]

    async def _drop_cancelled_groups(self) -> None:
        """Groups of a cancelled (or failed) run never complete: upstream stopped sending.
        Acknowledge them, or their entries stay pending forever and pin stream trimming."""
        runs = {next(iter(g.got.values())).envelope.run for g in self._groups.values()
                if g.got and not g.firing}
        for run in runs:
            if not await self._is_cancelled(run):
                continue
            for g in [g for g in self._groups.values()
                      if not g.firing and g.got and next(iter(g.got.values())).envelope.run == run]:
                await self._ack_group(g)

    # ------------------------------------------------------------------ intake
    async def _accept(self, d: Delivery, partition: str | None = None) -> None:
        env = d.envelope
        if not self.stage.aggregates:
            await self._start(d)
            return
        klin = key_lineage(self.stage, env.lineage)
        if klin is None:  # marker of an enclosing scope: not ours to hold
            if env.kind != "end":
                await self._fail(env, f"unit {env.id} lacks the aggregation scope", None, d)
                return
            await self._start(d)
            return
        # qualified by stage: two aggregators of one scope keep separate progress and ids
        key = f"{aggregation_key(env.run, klin)}@{self.stage.name}"
        if (d.stream, d.entry_id) in self._held:
            return  # re-claimed while we hold it (claims reset idle time): nothing new
        if key in self._fired:
            await self.transport.ack(d.stream, self.group, [d.entry_id])
            return
        g = self._groups.get(key)
        if g is None:
            prog = (await self.transport.get_progress(env.run, [key]))[0]
            if prog is not None and prog.done:
                self._remember(self._fired, key)
                await self.transport.ack(d.stream, self.group, [d.entry_id])
                return
            g = self._groups[key] = _Group(
                key, klin, expected_credit(self.stage, env), partition or d.stream
            )
        if env.id in g.got or g.firing:
            g.extra.append(d)
            self._held.add((d.stream, d.entry_id))
            if g.firing:
                await self.transport.ack(d.stream, self.group, [d.entry_id])
            return
        g.got[env.id] = d
        self._held.add((d.stream, d.entry_id))
        g.total += env.credit
        if g.total == g.expected:
            g.firing = True
            self._spawn(self._fire(g))
        elif g.total > g.expected:
            g.firing = True
            await self._fail(env, f"credit overflow for key {key}: {g.total} > {g.expected}", g)

    async def _start(self, d: Delivery) -> None:
        """Process one entry on its own (not part of a group): unless it is running here
        already (we claimed our own slow entry back: the claim only refreshed it), or it
        has been delivered too often (it keeps killing or stalling its worker)."""
        ref = (d.stream, d.entry_id)
        if ref in self._running:
            return
        if d.deliveries > self.config.max_deliveries and not self.stage.aggregates:
            await self._fail(
                d.envelope,
                f"delivered {d.deliveries} times without completing (max_deliveries="
                f"{self.config.max_deliveries}): it keeps crashing or stalling its worker",
                None, d, code="max_deliveries",
            )
            return
        self._running.add(ref)
        self._spawn(self._process(d))

    # ------------------------------------------------------------------ processing
    async def _process(self, d: Delivery) -> None:
        try:
            # an end marker needs no engine: forwarding it must not wait for a slot, or a
            # group downstream that only lacks this credit waits behind unrelated calls
            if d.envelope.kind == "end":
                await self._guarded(d, self._end)
                return
            slot = _Slot(self)
            await self._slots.acquire()
            try:
                await self._guarded(d, lambda d: self._unit(d, slot))
            finally:
                if slot.released:
                    self.inflight += 1  # the task's done callback takes it off again
                else:
                    self._slots.release()
        finally:
            ref = (d.stream, d.entry_id)
            self._running.discard(ref)
            if ref == self._suspect:  # isolation over: claim the next abandoned entry now
                self._suspect = None
                self._next_claim = 0.0

    async def _guarded(self, d: Delivery, step: Callable[[Delivery], Awaitable[None]]) -> None:
        try:
            await step(d)
        except asyncio.CancelledError:
            raise
        except (LeftPending, *self.transport.transient_errors) as exc:  # retry later
            log.warning("stage %s: %s on %s; left pending", self.stage.name,
                        exc if isinstance(exc, LeftPending) else f"transport unavailable ({exc})",
                        d.envelope.id)
        except CallCut as exc:
            log.warning("stage %s: a call on %s cut short by its run's cancel raised (%s): "
                        "acknowledged", self.stage.name, d.envelope.id, exc,
                        exc_info=exc.__cause__,
                        extra={"run": d.envelope.run, "stage": self.stage.name})
            await self.transport.ack(d.stream, self.group, [d.entry_id])
        except Exception as exc:  # a stage error fails the run visibly, never silently
            log.error("stage %s failed on %s", self.stage.name, d.envelope.id,
                      exc_info=not isinstance(exc, OutputNotJSON),
                      extra={"run": d.envelope.run, "stage": self.stage.name})
            await self._fail(d.envelope, f"{type(exc).__name__}: {exc}", None, d,
                             code=_error_code(exc))

    async def _end(self, d: Delivery) -> None:
        if d.envelope.run in self._cancelled_runs:
            await self.transport.ack(d.stream, self.group, [d.entry_id])
            return
        await self._forward_end(d)  # guarded: a cancelled run's marker is only acknowledged

    async def _unit(self, d: Delivery, slot: _Slot | None = None) -> None:
        env = d.envelope
        guard: Guard | None = None
        if d.deliveries == 1 and self.function.engine is None:
            # First sight of the entry at a stage without an engine: no read before the
            # call (it was one round trip on every hop). Nothing can have been published
            # for it unless it is a duplicate entry; the guard on every commit drops the
            # writes of a duplicate of finished work, or of a cancelled run, atomically.
            # An engine call is worth a round trip to avoid, so LM stages read first.
            # ... except where the read is free, or the entry waited in a backlog (a cancelled
            # or timed-out run's queued inputs must not run: calls cost and have effects)
            if env.run in self._cancelled_runs or (
                    (self.transport.in_process or _waited(d.entry_id))
                    and await self._is_cancelled(env.run)):
                await self.transport.ack(d.stream, self.group, [d.entry_id])
                return
            prog, guard = None, Guard(env.run, env.id)
        else:
            # progress first: the Redis transport reads the cancel flag along with it, so
            # the check below costs no second round trip
            prog = (await self.transport.get_progress(env.run, [env.id]))[0]
            if await self._is_cancelled(env.run) or (prog is not None and prog.done):
                await self.transport.ack(d.stream, self.group, [d.entry_id])
                return
        ctx = StageContext(env.run, env.pipeline, self.stage.name, env.lineage, env.context,
                           params=self._ctx_params())
        await self._produce(
            cause=env.id,
            ctx=ctx,
            credit=env.credit,
            base_lineage=env.lineage,
            scope=env.scope,
            context=env.context,
            value=env.payload,
            items=None,
            already=prog.units if prog else 0,
            acks=[(d.stream, [d.entry_id])],
            credit_mid=f"credit:{env.id}",
            guard=guard,
            slot=slot,
        )

    async def _fire(self, g: _Group) -> None:
        async with self._slots:
            first = next(iter(g.got.values())).envelope
            fence: Fence | None = None
            try:
                fence = self._fence(g)
                prog, fires = await self.transport.get_progress(first.run, [g.key, _fires(g)])
                if await self._is_cancelled(first.run):  # answered by the read above
                    await self._ack_group(g)
                    return
                if prog is not None and prog.done:
                    await self._ack_group(g)
                    return
                if not await self._count_fire(g, first, fires, fence):
                    return
                units = sorted(
                    (d.envelope for d in g.got.values() if d.envelope.kind == "unit"),
                    key=lambda e: e.lineage,
                )
                keep = {name for name, _ in g.klin} | {"input"}
                context = {k: v for k, v in first.context.items() if k in keep}
                scope = {k: v for k, v in first.scope.items() if k in keep}
                ctx = StageContext(
                    first.run, first.pipeline, self.stage.name, g.klin, context,
                    item_values=[u.context for u in units],
                    params=self._ctx_params(),
                )
                await self._produce(
                    cause=g.key,
                    ctx=ctx,
                    credit=g.expected,
                    base_lineage=g.klin,
                    scope=scope,
                    context=context,
                    value=None,
                    items=[u.payload for u in units],
                    already=prog.units if prog else 0,
                    acks=self._group_acks(g),
                    credit_mid=f"credit:{g.key}",
                    fence=fence,
                )
                self._drop_group(g)
                self._remember(self._fired, g.key)
            except asyncio.CancelledError:
                raise
            except FencedError:  # the lease moved while we fired: the new owner fires it
                self._fenced_out(g, fence)
            except (LeftPending, *self.transport.transient_errors) as exc:
                # entries stay pending: forget the group; the next claim rebuilds and fires it
                log.warning("stage %s: firing %s left pending (%s)", self.stage.name, g.key, exc)
                self._drop_group(g)
            except CallCut as exc:  # as in _guarded: the run is over
                log.warning("stage %s: firing %s cut short by its run's cancel raised (%s): "
                            "acknowledged", self.stage.name, g.key, exc,
                            exc_info=exc.__cause__,
                            extra={"run": first.run, "stage": self.stage.name})
                await self._ack_group(g)
            except Exception as exc:
                log.exception("stage %s failed on key %s", self.stage.name, g.key)
                await self._fail(first, f"{type(exc).__name__}: {exc}", g,
                                 code=_error_code(exc))

    async def _count_fire(
        self, g: _Group, first: Envelope, fires: Progress | None, fence: Fence
    ) -> bool:
        """The delivery limit for a group: its entries' delivery counts grow with every
        claim-back, so firings are counted instead, in a progress record written (fenced)
        before each one. A group fired `max_deliveries` times without completing (each try
        killed its worker) is dead-lettered whole instead of moving from owner to owner."""
        n = fires.units if fires is not None else 0
        if n >= self.config.max_deliveries:
            await self._fail(
                first,
                f"group {g.key} fired {n} times without completing (max_deliveries="
                f"{self.config.max_deliveries}): it keeps crashing or stalling its worker",
                g, code="max_deliveries",
            )
            return False
        await self.transport.commit(
            Commit(progress=[(first.run, _fires(g), Progress(n + 1, False))], fence=fence)
        )
        return True

    async def _produce(
        self,
        *,
        cause: str,
        ctx: StageContext,
        credit: Fraction,
        base_lineage: Lineage,
        scope: dict[str, Fraction],
        context: dict[str, Any],
        value: Any,
        items: list[Any] | None,
        already: int,
        acks: list[tuple[str, list[str]]],
        credit_mid: str,
        fence: Fence | None = None,
        guard: Guard | None = None,
        slot: _Slot | None = None,
    ) -> None:
        """Call the stage and publish its units. With a `guard`, no cancel or progress
        check is made here: each commit carries the guard and the transport makes it.
        A `slot` is handed back once the call is over, before the final commit."""
        run = ctx.run

        async def stop() -> bool:
            return await self._is_cancelled(run)

        attempt = 0
        while True:
            stats = CallStats()
            n = 0
            held: list[tuple[int, Any]] = []
            # units an earlier delivery published count too: a retry could continue them
            # differently (a redelivery after a crash resumes them, on the same assumption
            # of a deterministic call, but a failure is no crash: it fails the run)
            published, committing = already > 0, False
            try:
                async for unit in self.function.produce(ctx, value, items, stats, stop):
                    n += 1
                    if stats.first_unit_s is None:
                        stats.first_unit_s = time.perf_counter() - stats.started
                    if n <= already:
                        continue  # published by an earlier attempt
                    if self.streaming and stats.incremental:  # else the end commit carries it
                        c = Commit(fence=fence, guard=guard)
                        self._emit(c, run, n, unit, credit, base_lineage, scope, context)
                        c.progress.append((run, cause, Progress(n, False)))
                        committing = True
                        await self._commit_units(c)
                        committing, published = False, True
                    else:
                        held.append((n, unit))
                break
            except Exception as exc:
                if stats.cut:
                    raise CallCut(f"{type(exc).__name__}: {exc}") from exc
                if committing or published or attempt >= self.stage.retries \
                        or isinstance(exc, (OutputNotJSON, *self.transport.transient_errors)) \
                        or await self._is_cancelled(run):
                    raise
                attempt += 1
                if not await self._before_retry(cause, run, attempt, exc):
                    n, held = 0, []  # cancelled while waiting: nothing to publish, the ack
                    break
        if slot is not None:
            slot.release()
        if guard is None and await self._is_cancelled(run):
            c = Commit(acks=[(s, self.group, ids) for s, ids in acks], fence=fence)
            await self.transport.commit(c)
            return
        c = Commit(fence=fence, guard=guard)
        for i, unit in held:
            self._emit(c, run, i, unit, credit, base_lineage, scope, context)
        total_units = max(n, already)
        rest = end_credit(credit, total_units)
        self._end_markers(c, run, base_lineage, rest, scope, context, cause, credit_mid, credit)
        c.progress.append((run, cause, Progress(total_units, True)))
        c.acks.extend((s, self.group, ids) for s, ids in acks)
        if not await self._commit_units(c):
            return  # the guard stopped it: a duplicate of finished work, or a cancelled run
        self.processed += 1
        call: dict[str, Any] = {
            "run": run,
            "stage": self.stage.name,
            "pipeline": self.spec.name,
            "instance": self.instance,
            "seconds": time.perf_counter() - stats.started,
            "first_unit_s": stats.first_unit_s,
            "units": n,
            "prompt": stats.prompt,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "cached_tokens": stats.cached_tokens,
        }
        self.router.observe("call", call)
        if self.observer is not None:
            self.observer("call", call)

    async def _commit_units(self, c: Commit) -> bool:
        """Commit `c`, which holds this stage's units. A unit JSON cannot hold (a set, bytes,
        an object, a circular list) fails the call with OutputNotJSON on both transports
        alike: checked by `_emit` where nothing encodes it (`_check_units`), here where the
        transport's encoding of the commit (before anything is written) is the check."""
        try:
            return await self.transport.commit(c)
        except _NOT_JSON:
            self._find_not_json(c)  # raises OutputNotJSON if a unit is what failed
            raise

    def _find_not_json(self, c: Commit) -> None:
        """Raise `_check_json`'s OutputNotJSON for the first unit of `c` JSON cannot hold,
        in the order `_emit` added them (the unit the embedded transport's check names)."""
        units = {e.lineage: e.payload for _, e in c.messages
                 if e.kind == "unit" and e.sender == self.stage.name}
        for _, ev in c.events:
            if ev.get("type") == "partial":
                units.setdefault(parse_lineage(ev["lineage"]), ev["data"])
        for lineage in sorted(units):
            self._check_json(units[lineage])

    def _check_json(self, unit: Any) -> Any:
        """A unit travels as JSON (between stages, in events, to clients): one JSON cannot
        hold fails the call with this message, on both transports alike. Returns the unit
        as the next stage reads it from Redis: a tuple is a list, a dict key a string, an
        Enum its value, and nothing is shared with the object the function returned (it
        may change it after). The embedded transport passed the object itself on, so a
        tool's `{1: "a"}` reached the next stage as `{1: "a"}` there, `{"1": "a"}` on
        Redis."""
        if unit is None or type(unit) in _SCALARS:
            return unit
        try:
            return loads_json(dumps_json(unit))
        except _NOT_JSON as exc:
            raise OutputNotJSON(self.stage.name, exc) from None

    def _ctx_params(self) -> dict[str, Any]:
        """The stage's `params` for one call: a plain dict, deep-copied, so a function may
        change or return it (it is JSON, as the spec is) and the next call sees the spec's
        values all the same."""
        return copy.deepcopy(self.stage.params) if self.stage.params else {}

    async def _before_retry(self, cause: str, run: str, attempt: int, exc: Exception) -> bool:
        """A failed call that published nothing is tried again (the stage's `retries`),
        after its backoff; the observer counts it (`alto_stage_call_retries_total`). The
        backoff (up to a minute) watches the run's cancel flag, as a running call does:
        False when the run was cancelled meanwhile (no retry then)."""
        wait = min(self.stage.retry_backoff_s * 2 ** (attempt - 1), 60.0)
        log.warning("stage %s: call on %s failed (%s: %s); retry %d of %d in %.2fs",
                    self.stage.name, cause, type(exc).__name__, exc, attempt,
                    self.stage.retries, wait, extra={"run": run, "stage": self.stage.name})
        if self.observer is not None:
            self.observer("retry", {"pipeline": self.spec.name, "stage": self.stage.name,
                                    "instance": self.instance, "run": run})
        until = time.monotonic() + wait
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, RETRY_CANCEL_POLL_S))
            if await self._is_cancelled(run):
                return False
            if self._stop is not None and self._stop.is_set():
                # draining: a retry could outlast the pod's grace period; another worker
                # claims the entry (still pending) and tries it afresh
                raise LeftPending(f"stage {self.stage.name}: draining, retry left to others")
        return True

    def _emit(
        self,
        c: Commit,
        run: str,
        index: int,
        unit: Any,
        credit: Fraction,
        base_lineage: Lineage,
        scope: dict[str, Fraction],
        context: dict[str, Any],
    ) -> None:
        """Add unit `index` to a commit: to every successor, and as a run event."""
        if self._check_units:
            unit = self._check_json(unit)
        lin = (*base_lineage, (self.stage.name, index))
        lin_s = lineage_str(lin)
        share = unit_credit(credit, index)
        if self.successors:
            child_scope = {**scope, self.stage.name: share}
            child_ctx = {**context, self.stage.name: unit}
            part = share / len(self.successors)
            for t in self.successors:
                env = Envelope(
                    run=run,
                    pipeline=self.spec.name,
                    stage=t,
                    lineage=lin,
                    kind="unit",
                    credit=part,
                    payload=unit,
                    sender=self.stage.name,
                    scope=child_scope,
                    context=child_ctx,
                    id=unit_id(run, lin_s, t),
                )
                c.messages.append((self.router.stream_for(env), env))
        if self.config.partial_events or self.is_output:
            c.events.append(
                (
                    run,
                    {
                        "type": "partial",
                        "mid": f"partial:{run}:{lin_s}",
                        "stage": self.stage.name,
                        "key": lineage_str(base_lineage),
                        "lineage": lin_s,
                        "data": unit,
                        "final": self.is_output,
                    },
                )
            )

    async def _forward_end(self, d: Delivery) -> None:
        """An end marker passes a stage that cannot key it: split it over the successors."""
        env = d.envelope
        c = Commit(guard=Guard(env.run))
        self._end_markers(c, env.run, env.lineage, env.credit, env.scope, env.context, env.id,
                          f"credit:{env.id}", env.credit)
        c.acks.append((d.stream, self.group, [d.entry_id]))
        await self.transport.commit(c)

    def _end_markers(
        self,
        c: Commit,
        run: str,
        lineage: Lineage,
        rest: Fraction,
        scope: dict[str, Fraction],
        context: dict[str, Any],
        cause: str,
        credit_mid: str,
        processed: Fraction,
    ) -> None:
        """Add to a commit the end markers that hand `rest` on (split over the successors,
        ids derived from `cause`) and the `credit` event recording that this stage has
        processed `processed` credit of the run."""
        for t in self.successors:
            marker = Envelope(
                run=run,
                pipeline=self.spec.name,
                stage=t,
                lineage=lineage,
                kind="end",
                credit=rest / len(self.successors),
                sender=self.stage.name,
                scope=scope,
                context=context,
                id=end_id(cause, t),
            )
            c.messages.append((self.router.stream_for(marker), marker))
        c.events.append((run, {"type": "credit", "mid": credit_mid, "stage": self.stage.name,
                               "credit": credit_str(processed)}))

    # ------------------------------------------------------------------ helpers
    def _group_acks(self, g: _Group) -> list[tuple[str, list[str]]]:
        by: dict[str, list[str]] = {}
        for d in [*g.got.values(), *g.extra]:
            self._held.discard((d.stream, d.entry_id))
        for d in [*g.got.values(), *g.extra]:
            by.setdefault(d.stream, []).append(d.entry_id)
        return list(by.items())

    def _drop_group(self, g: _Group) -> None:
        """Forget `g` (only `g`: a rebuilt group of the same key may have replaced it)."""
        if self._groups.get(g.key) is g:
            self._groups.pop(g.key)
        for d in [*g.got.values(), *g.extra]:
            self._held.discard((d.stream, d.entry_id))

    async def _ack_group(self, g: _Group) -> None:
        fence: Fence | None = None
        try:
            fence = self._fence(g)
            await self.transport.commit(Commit(
                acks=[(s, self.group, ids) for s, ids in self._group_acks(g)], fence=fence
            ))
        except FencedError:
            self._fenced_out(g, fence)
            return
        self._drop_group(g)
        self._remember(self._fired, g.key)

    def _dead_letter(self, env: Envelope, reason: str, entries: list[Delivery]) -> Envelope:
        return Envelope(
            run=env.run,
            pipeline=self.spec.name,
            stage=self.stage.name,
            lineage=env.lineage,
            kind="unit",
            credit=Fraction(0),
            payload={
                "reason": reason,
                "stage": self.stage.name,
                "run": env.run,
                "instance": self.instance,
                "entries": [{"stream": d.stream, "id": d.entry_id, "deliveries": d.deliveries,
                             "message": d.envelope.id} for d in entries],
                "envelope": loads_json(env.to_wire()),
            },
            sender=self.stage.name,
            id=f"dead:{env.id}@{self.stage.name}",
        )

    async def _fail(
        self, env: Envelope, message: str, g: _Group | None, d: Delivery | None = None,
        *, code: str = "stage_error",
    ) -> None:
        """Fail the run visibly: an `error` event naming the stage, the input(s) to the
        dead-letter stream and acknowledged, all in one commit; then cancel the run so
        no other stage keeps working (or holding entries) for it."""
        c = Commit()
        c.events.append(
            (
                env.run,
                {
                    "type": "error",
                    "mid": f"error:{env.id}@{self.stage.name}",
                    "stage": self.stage.name,
                    "message": message,
                    "code": code,
                },
            )
        )
        entries: list[Delivery] = []
        fence: Fence | None = None
        if g is not None:
            entries.extend([*g.got.values(), *g.extra])
            try:
                fence = c.fence = self._fence(g)
            except FencedError:
                self._fenced_out(g, None)
                return
            c.acks.extend((s, self.group, ids) for s, ids in self._group_acks(g))
        if d is not None:
            entries.append(d)
            c.acks.append((d.stream, self.group, [d.entry_id]))
        dead = self._dead_letter(env, message, entries)
        c.messages.append((dead_letter_stream(self.spec.name), dead))
        try:
            await self.transport.commit(c)
        except FencedError:
            if g is not None:
                self._fenced_out(g, fence)
            return
        if g is not None:
            self._drop_group(g)
            self._remember(self._fired, g.key)
        self._remember(self._cancelled_runs, env.run)
        with contextlib.suppress(*self.transport.transient_errors):
            await self.transport.cancel(env.run, self.config.cancel_ttl_s)
        if self.observer is not None:
            self.observer("error", {"pipeline": self.spec.name, "stage": self.stage.name,
                                    "instance": self.instance, "run": env.run})

    async def _is_cancelled(self, run: str) -> bool:
        if run in self._cancelled_runs:
            return True
        if await self.transport.is_cancelled(run):
            self._remember(self._cancelled_runs, run)
            return True
        return False

    @staticmethod
    def _remember(cache: OrderedDict[str, None], key: str, limit: int = 100_000) -> None:
        cache[key] = None
        if len(cache) > limit:
            cache.popitem(last=False)
