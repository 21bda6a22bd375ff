"""The transport interface: everything the runtime needs from a message bus.

Two implementations pass one conformance suite (tests/test_transport_conformance.py):
`orchestrator.embedded.EmbeddedTransport` (in-process asyncio) and
`workers.redis_transport.RedisTransport` (Redis Streams). Nothing else may differ
between them, so every semantic rule lives in this docstring:

* Work streams hold envelopes. Each stream is read through consumer groups: an entry
  is delivered to one consumer of a group, stays *pending* (owned by that consumer)
  until acknowledged, and can be claimed by another consumer once it has been idle
  for `min_idle_ms`. A claimed entry's delivery count goes up by one.
* `commit` is atomic: its messages, run events, progress records and acks all take
  effect, or none do. Runners acknowledge an input only in the same commit that
  publishes its last output, so a crash never loses an input and never half-acks.
* Trimming never removes an entry that some group has not yet acknowledged.
* Run events form an append-only log per run, read by position (`after` an event id),
  so a client can resume exactly where it stopped. Ids are strings that increase.
* Progress records say, for an input (or an aggregation key), how many units have
  been published for it and whether it is done; they make re-execution after a
  crash publish nothing twice and count credit exactly once.
* Leases are fenced: each acquisition by a new owner gets a fencing token larger than
  every earlier token of that lease (renewal by the holder keeps its token). A commit
  carrying a `Fence(lease, token)` applies only if the lease is still held with that
  token, checked atomically with the commit; otherwise nothing applies and `commit`
  raises `FencedError`. So an owner that stalled past its lease cannot write once
  another owner may have taken over.
* A commit may carry a `Guard(run, key)`: if the run is cancelled, or progress record
  `key` of the run is done, only the commit's acks apply (its messages, events and
  progress are dropped) and `commit` returns False. The check is atomic with the commit,
  so a runner can skip its pre-call read (progress and cancel flag) for an entry it sees
  for the first time: a duplicate of finished work, or work of a cancelled run, then
  writes nothing but its ack.
* Run keys (events, progress) never live forever: a write gives a key that has no
  expiry the `run_key_ttl_s` safety expiry; `expire_run` then shortens it. A late
  write after `expire_run` therefore cannot leak a key.
* `transient_errors` lists the exceptions that mean "the bus is unreachable right now"
  (Redis restarting, a dropped connection): a caller retries the step later; nothing
  about the step is known to have applied or not, so every step must be idempotent
  (ids and progress records make re-application harmless).
* Cancellation latency bound: `is_cancelled` always sees a cancel made more than
  `cancel_staleness_ms` before the call (it may answer from a read of the flag made
  that recently). Embedded: 0 (always exact). Redis: 10 ms by default (the flag is read
  along with progress, so the runner's checks cost no extra round trip). After the
  run's flags expire, `is_cancelled` may keep answering True for up to 1 s.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.envelope import Envelope


@dataclass(slots=True)
class Delivery:
    """An envelope as read from a stream; `entry_id` is what `ack` takes."""

    stream: str
    entry_id: str
    envelope: Envelope
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """An entry delivered to a group and not yet acknowledged: who holds it, for how long,
    and how often it has been delivered (a claim raises that by one). What a runner needs
    to take over a dead consumer's work without charging innocent entries for a crash."""

    entry_id: str
    consumer: str
    idle_ms: int
    deliveries: int


@dataclass(slots=True)
class Progress:
    units: int = 0
    done: bool = False


class FencedError(RuntimeError):
    """A fenced commit was refused: its lease has expired or moved to another owner."""


@dataclass(frozen=True, slots=True)
class Fence:
    """Apply a commit only while lease `lease` is held with fencing token `token`."""

    lease: str
    token: int


@dataclass(frozen=True, slots=True)
class Guard:
    """Apply a commit's writes only while run `run` is not cancelled and its progress
    record `key` (if any) is not done; the acks apply either way."""

    run: str
    key: str | None = None


@dataclass(slots=True)
class Commit:
    """One atomic step of a runner."""

    messages: list[tuple[str, Envelope]] = field(default_factory=list)  # (stream, envelope)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (run, event)
    progress: list[tuple[str, str, Progress]] = field(default_factory=list)  # (run, key, progress)
    acks: list[tuple[str, str, list[str]]] = field(
        default_factory=list
    )  # (stream, group, entry ids)
    fence: Fence | None = None
    guard: Guard | None = None

    def __bool__(self) -> bool:
        return bool(self.messages or self.events or self.progress or self.acks)


@dataclass(slots=True)
class StreamStats:
    length: int  # entries kept in the stream
    pending: int  # delivered to the group, not yet acknowledged
    lag: int  # entries not yet delivered to the group
    # Entries the stream had received up to and including the group's last-delivered one
    # (Redis' logical read counter, XINFO GROUPS `entries-read`). It only grows and
    # trimming never lowers it, so "entries_read >= n and pending == 0" is a trim-proof
    # "n entries consumed and acknowledged". Exactly the number of entries delivered to
    # the group when the group was created before the stream's first entry was trimmed
    # (ensure_group on a new stream); otherwise it also counts entries trimmed before the
    # group's first read. None where Redis cannot tell: after XDEL of entries the group had
    # not read (the runtime never XDELs), until the group catches up with the last entry.
    entries_read: int | None = None


class Transport(abc.ABC):
    """See the module docstring for the contract each method must keep."""

    transient_errors: tuple[type[BaseException], ...] = ()
    run_key_ttl_s: int = 86_400  # safety expiry of run keys written without one
    # reads cost no round trip (the state is in this process): runners may ask freely
    in_process: bool = False

    # ---- work streams -------------------------------------------------------------------
    @abc.abstractmethod
    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the stream and the group (reading from the start) if missing."""

    @abc.abstractmethod
    async def commit(self, commit: Commit) -> bool:
        """Apply a Commit atomically; False if its guard let only the acks apply."""

    async def publish(self, stream: str, envelope: Envelope) -> None:
        await self.commit(Commit(messages=[(stream, envelope)]))

    @abc.abstractmethod
    async def consume(
        self, streams: Sequence[str], group: str, consumer: str, count: int, block_ms: int
    ) -> list[Delivery]:
        """Up to `count` new entries (never delivered to this group) across `streams`,
        waiting up to `block_ms` for the first one. Returns [] on timeout."""

    @abc.abstractmethod
    async def ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None: ...

    @abc.abstractmethod
    async def claim_abandoned(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Delivery]:
        """Take over entries pending (unacknowledged) for at least `min_idle_ms` in this
        group, whoever holds them; `min_idle_ms=0` takes all of them."""

    @abc.abstractmethod
    async def pending_consumers(
        self, streams: Sequence[str], group: str
    ) -> dict[str, dict[str, int]]:
        """Per stream with entries pending in `group`, how many each consumer holds (one
        call for all of a stage's streams: a prompt-aware stage reads ~128 lanes, and
        runners ask at every heartbeat whether a dead consumer holds any)."""

    @abc.abstractmethod
    async def pending(
        self, stream: str, group: str, count: int, *, min_idle_ms: int = 0,
        consumer: str | None = None,
    ) -> list[PendingEntry]:
        """Up to `count` pending entries, oldest first, idle for at least `min_idle_ms`
        (and held by `consumer`, if given). Reads only: nothing changes hands."""

    @abc.abstractmethod
    async def claim(
        self, stream: str, group: str, consumer: str, entry_ids: Sequence[str],
        min_idle_ms: int,
    ) -> list[Delivery]:
        """Take over exactly these entries, each only if it is still pending and idle for
        at least `min_idle_ms` (a claim resets idle time, so of two consumers racing for
        one entry only the first gets it). Oldest first; the rest are skipped."""

    @abc.abstractmethod
    async def touch(
        self, stream: str, group: str, consumer: str, entry_ids: Sequence[str]
    ) -> int:
        """Reset the idle time of those of `entry_ids` that `consumer` still holds, without
        counting a delivery (XCLAIM JUSTID); returns how many. A live worker's long call
        (a long generation) must not look abandoned: claimed by others after
        `claim_idle_ms`, it was re-run beside the original and, claimed often enough,
        dead-lettered while it was still running."""

    @abc.abstractmethod
    async def stats(self, stream: str, group: str) -> StreamStats: ...

    @abc.abstractmethod
    async def length(self, stream: str) -> int:
        """Entries kept in `stream` (0 if it does not exist); needs no group, so a reader
        that only looks (status, metrics) creates nothing."""

    @abc.abstractmethod
    async def trim(self, stream: str) -> int:
        """Drop entries every group has acknowledged; returns how many were dropped."""

    # ---- progress -----------------------------------------------------------------------
    @abc.abstractmethod
    async def get_progress(self, run: str, keys: Sequence[str]) -> list[Progress | None]: ...

    # ---- run events ---------------------------------------------------------------------
    @abc.abstractmethod
    async def read_events(
        self, run: str, after: str | None, count: int, block_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events of `run` after event id `after` (from the start if None), waiting up to
        `block_ms` for at least one."""

    async def read_events_many(
        self, after: Mapping[str, str | None], count: int
    ) -> dict[str, list[tuple[str, dict[str, Any]]] | Exception]:
        """For each run in `after`, its events after the given id, without waiting: one
        look at many logs (the gateway's supervisor polls every unfollowed run each tick).

        A run whose log cannot be read gets its exception as its value, so one bad log
        does not hide the others; a bus that cannot be reached raises for the whole call.
        This default reads run after run; a networked bus sends them all in one round trip.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        out: dict[str, list[tuple[str, dict[str, Any]]] | Exception] = {}
        for run, cursor in after.items():
            try:
                out[run] = await self.read_events(run, cursor, count, 0)
            except (ConnectionError, TimeoutError, *self.transient_errors):
                raise
            except Exception as exc:  # noqa: BLE001 - this log's trouble, returned as such
                out[run] = exc
        return out

    @abc.abstractmethod
    async def last_event_id(self, run: str) -> str | None:
        """The id of `run`'s latest event (None: no events), without reading the log."""

    @abc.abstractmethod
    async def expire_run(self, run: str, ttl_s: int) -> None:
        """Forget the run's events, progress and flags `ttl_s` seconds from now."""

    # ---- control ------------------------------------------------------------------------
    @abc.abstractmethod
    async def cancel(self, run: str, ttl_s: int = 3600) -> None: ...

    @abc.abstractmethod
    async def is_cancelled(self, run: str) -> bool: ...

    # ---- leases and registry ------------------------------------------------------------
    async def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew the lease `name` for `owner`; False if another owner holds it.
        Transports may keep no fencing token for it (nothing lingers once it expires); a
        name is used with this or with `acquire_fenced`, never both."""
        return await self.acquire_fenced(name, owner, ttl_ms) is not None

    @abc.abstractmethod
    async def acquire_fenced(self, name: str, owner: str, ttl_ms: int) -> int | None:
        """`acquire_lease` that returns the lease's fencing token (None if another owner
        holds it): the same token while `owner` keeps renewing, a larger one after any
        new acquisition."""

    @abc.abstractmethod
    async def release_lease(self, name: str, owner: str) -> None: ...

    @abc.abstractmethod
    async def heartbeat(self, group: str, member: str, info: dict[str, Any], ttl_ms: int) -> None:
        """Announce `member` of `group` (e.g. an instance of a stage) for `ttl_ms`."""

    @abc.abstractmethod
    async def members(self, group: str) -> dict[str, dict[str, Any]]:
        """Live members of `group` (heartbeat younger than its ttl) and their info."""

    @abc.abstractmethod
    async def leave(self, group: str, member: str) -> None: ...

    # ---- rate limit ---------------------------------------------------------------------
    @abc.abstractmethod
    async def take_token(self, key: str, rate: float, burst: int) -> float:
        """One request of caller `key` against a limit of `rate` per second with bursts
        of `burst` (`orchestrator.ratelimit.gcra`): 0.0 when allowed, else the seconds
        until it would be. Shared by everyone on the transport: every gateway replica on
        one Redis enforces one limit per caller, not one each."""

    # ---- small shared state (statistics for scheduling) --------------------------------
    @abc.abstractmethod
    async def hincr(self, key: str, fields: dict[str, float]) -> None:
        """Add to numeric fields of a shared hash (created on first use)."""

    @abc.abstractmethod
    async def hgetall(self, key: str) -> dict[str, float]: ...

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass
