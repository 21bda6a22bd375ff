"""In-process transport with Redis Streams semantics, for single-process runs.

It mirrors `workers.redis_transport.RedisTransport` rule for rule (see the contract in
`orchestrator.transport`) so that a pipeline tested here behaves the same on Redis:

* Entry ids look like Redis ids ("<n>-0", n = 1, 2, ... per stream). Since trimming only
  drops a prefix of a stream (like XTRIM MINID), live entries are exactly the sequence
  numbers [first, next), so every lookup is O(1) arithmetic instead of a search.
* A group keeps its last-delivered sequence number and a pending-entries list kept in
  id order (consume only appends ids above every pending one; claims update in place),
  so "oldest pending" is the first key, as in Redis' PEL.
* Keys that Redis would expire (run events, progress, cancel flags, leases) carry a
  deadline on `time.monotonic()`; expiry is applied lazily on access and by a cheap
  heap sweep on writes, and, as in Redis, EXPIRE only applies to keys that exist.
* Envelopes are stored as objects (the runtime never mutates them); everything else
  that Redis would serialise (events, member info) is JSON-encoded at write time, so a
  value Redis would reject is rejected here too and readers never share mutable state.

Everything runs on one event loop and no method awaits in the middle of a mutation,
which is what makes `commit` atomic without locks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.envelope import Envelope
from orchestrator.ratelimit import gcra
from orchestrator.transport import (
    Commit,
    Delivery,
    FencedError,
    Guard,
    PendingEntry,
    Progress,
    StreamStats,
    Transport,
)

__all__ = ["EmbeddedTransport", "NoGroupError"]

RATE_KEYS = 10_000  # rate-limited callers remembered (without API keys: client addresses)


class NoGroupError(LookupError):
    """Reading through a group that was never created (Redis answers NOGROUP)."""


def _seq(entry_id: str) -> int:
    """Sequence number of an id of the form "<n>-0" (a bare "<n>" is accepted too)."""
    head, _, tail = entry_id.partition("-")
    if tail not in ("", "0"):
        raise ValueError(f"not an embedded entry id: {entry_id!r}")
    return int(head)


def _eid(seq: int) -> str:
    return f"{seq}-0"


@dataclass(slots=True)
class _Pending:
    consumer: str
    delivered_at: float  # time.monotonic() of the last delivery
    deliveries: int


@dataclass(slots=True)
class _Group:
    last_delivered: int
    # seq -> pending entry; insertion order == id order (see module docstring)
    pending: dict[int, _Pending] = field(default_factory=dict)


@dataclass(slots=True)
class _Stream:
    entries: dict[int, Envelope] = field(default_factory=dict)
    first: int = 1  # oldest kept sequence number (== next when empty)
    next: int = 1  # sequence number the next entry gets
    groups: dict[str, _Group] = field(default_factory=dict)
    waiters: set[asyncio.Future[None]] = field(default_factory=set)


@dataclass(slots=True)
class _EventLog:
    events: list[str] = field(default_factory=list)  # JSON text; event id = index + 1


def _wake(waiters: Iterable[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


class EmbeddedTransport(Transport):
    """See the module docstring; one instance is one "Redis server"."""

    in_process = True

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._events: dict[str, _EventLog] = {}
        self._event_waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._progress: dict[str, dict[str, Progress]] = {}
        self._cancelled: set[str] = set()
        self._leases: dict[str, tuple[str, int]] = {}  # name -> (owner, fencing token)
        self._fences: dict[str, int] = {}  # name -> last token handed out (never expires)
        self._members: dict[str, dict[str, tuple[float, str]]] = {}  # deadline, info JSON
        self._hashes: dict[str, dict[str, float]] = {}
        # (kind, name) -> monotonic deadline, plus a heap for the write-time sweep
        self._expiry: dict[tuple[str, str], float] = {}
        self._expiry_heap: list[tuple[float, str, str]] = []
        self._rr = itertools.count()  # rotates multi-stream reads for fairness
        self._tats: OrderedDict[str, float] = OrderedDict()  # rate limit: caller -> TAT

    # ---- expiry -------------------------------------------------------------------------
    def _delete(self, kind: str, name: str) -> None:
        self._expiry.pop((kind, name), None)
        if kind == "events":
            self._events.pop(name, None)
        elif kind == "progress":
            self._progress.pop(name, None)
        elif kind == "cancel":
            self._cancelled.discard(name)
        elif kind == "lease":
            self._leases.pop(name, None)

    def _set_expiry(self, kind: str, name: str, ttl_s: float) -> None:
        if ttl_s <= 0:  # like Redis: a non-positive TTL deletes the key now
            self._delete(kind, name)
            return
        deadline = time.monotonic() + ttl_s
        self._expiry[(kind, name)] = deadline
        heapq.heappush(self._expiry_heap, (deadline, kind, name))

    def _alive(self, kind: str, name: str) -> None:
        """Apply a due expiry of one key before it is read or written."""
        deadline = self._expiry.get((kind, name))
        if deadline is not None and deadline <= time.monotonic():
            self._delete(kind, name)

    def _sweep(self) -> None:
        """Forget expired keys nobody reads again (bounded memory for finished runs)."""
        heap = self._expiry_heap
        if not heap or heap[0][0] > time.monotonic():
            return
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            deadline, kind, name = heapq.heappop(heap)
            if self._expiry.get((kind, name)) == deadline:
                self._delete(kind, name)

    # ---- work streams -------------------------------------------------------------------
    def _group(self, stream: str, group: str) -> tuple[_Stream, _Group]:
        st = self._streams.get(stream)
        g = st.groups.get(group) if st is not None else None
        if st is None or g is None:
            raise NoGroupError(f"no group {group!r} on stream {stream!r}")
        return st, g

    async def ensure_group(self, stream: str, group: str) -> None:
        st = self._streams.get(stream)
        if st is None:
            st = self._streams[stream] = _Stream()
        if group not in st.groups:
            # "read from the start" = from the oldest entry still kept
            st.groups[group] = _Group(last_delivered=st.first - 1)

    async def commit(self, commit: Commit) -> bool:
        # Everything that can fail runs before the first mutation: all or nothing.
        events = [(run, json.dumps(ev, separators=(",", ":"), ensure_ascii=False))
                  for run, ev in commit.events]
        acks = [(stream, group, [_seq(e) for e in ids]) for stream, group, ids in commit.acks]
        for _, envelope in commit.messages:
            if not isinstance(envelope, Envelope):
                raise TypeError(f"not an Envelope: {envelope!r}")
        if commit.fence is not None:
            self._alive("lease", commit.fence.lease)
            held = self._leases.get(commit.fence.lease)
            if held is None or held[1] != commit.fence.token:
                raise FencedError(
                    f"lease {commit.fence.lease!r} no longer holds token {commit.fence.token}"
                )
        self._sweep()
        if commit.guard is not None and self._guarded_out(commit.guard):
            commit, events = Commit(acks=commit.acks), []
            applied = False
        else:
            applied = True

        woken: list[set[asyncio.Future[None]]] = []
        for stream, envelope in commit.messages:
            st = self._streams.get(stream)
            if st is None:
                st = self._streams[stream] = _Stream()
            st.entries[st.next] = envelope
            st.next += 1
            if st.waiters:
                woken.append(st.waiters)
                st.waiters = set()
        for run, text in events:
            self._alive("events", run)
            log = self._events.get(run)
            if log is None:
                log = self._events[run] = _EventLog()
            if ("events", run) not in self._expiry:  # safety expiry (see transport.py)
                self._set_expiry("events", run, self.run_key_ttl_s)
            log.events.append(text)
            waiters = self._event_waiters.pop(run, None)
            if waiters:
                woken.append(waiters)
        for run, key, progress in commit.progress:
            self._alive("progress", run)
            self._progress.setdefault(run, {})[key] = Progress(progress.units, progress.done)
            if ("progress", run) not in self._expiry:
                self._set_expiry("progress", run, self.run_key_ttl_s)
        for stream, group, seqs in acks:
            st = self._streams.get(stream)
            g = st.groups.get(group) if st is not None else None
            if g is not None:  # XACK on a missing group acknowledges nothing, silently
                for seq in seqs:
                    g.pending.pop(seq, None)
        for waiters in woken:
            _wake(waiters)
        return applied

    def _guarded_out(self, guard: Guard) -> bool:
        self._alive("cancel", guard.run)
        if guard.run in self._cancelled:
            return True
        if guard.key is None:
            return False
        self._alive("progress", guard.run)
        prog = self._progress.get(guard.run, {}).get(guard.key)
        return prog is not None and prog.done

    async def consume(
        self, streams: Sequence[str], group: str, consumer: str, count: int, block_ms: int
    ) -> list[Delivery]:
        if count < 1:
            raise ValueError("count must be at least 1")
        if len(streams) > 1:
            k = next(self._rr) % len(streams)
            streams = [*streams[k:], *streams[:k]]
        targets = [(name, *self._group(name, group)) for name in streams]
        out = self._take(targets, consumer, count)
        if out or block_ms <= 0:
            return out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            fut: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(remaining, _wake, (fut,))
            for _, st, _ in targets:
                st.waiters.add(fut)
            try:
                await fut
            finally:
                timer.cancel()
                for _, st, _ in targets:
                    st.waiters.discard(fut)
            out = self._take(targets, consumer, count)
            if out:
                return out

    @staticmethod
    def _take(
        targets: list[tuple[str, _Stream, _Group]], consumer: str, count: int
    ) -> list[Delivery]:
        out: list[Delivery] = []
        now = time.monotonic()
        for name, st, g in targets:
            start = g.last_delivered + 1
            stop = min(st.next, start + count - len(out))
            if stop <= start:
                continue
            entries, pending = st.entries, g.pending
            for seq in range(start, stop):
                pending[seq] = _Pending(consumer, now, 1)
                out.append(Delivery(name, _eid(seq), entries[seq], 1))
            g.last_delivered = stop - 1
            if len(out) >= count:
                break
        return out

    async def ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        await self.commit(Commit(acks=[(stream, group, list(entry_ids))]))

    async def claim_abandoned(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[Delivery]:
        if count < 1:
            raise ValueError("count must be at least 1")
        st, g = self._group(stream, group)
        now = time.monotonic()
        oldest = now - min_idle_ms / 1000
        out: list[Delivery] = []
        for seq, p in g.pending.items():
            if p.delivered_at <= oldest:
                p.consumer = consumer
                p.delivered_at = now
                p.deliveries += 1
                out.append(Delivery(stream, _eid(seq), st.entries[seq], p.deliveries))
                if len(out) >= count:
                    break
        return out

    async def pending_consumers(
        self, streams: Sequence[str], group: str
    ) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for stream in streams:
            _, g = self._group(stream, group)
            for p in g.pending.values():
                held = out.setdefault(stream, {})
                held[p.consumer] = held.get(p.consumer, 0) + 1
        return out

    async def pending(
        self, stream: str, group: str, count: int, *, min_idle_ms: int = 0,
        consumer: str | None = None,
    ) -> list[PendingEntry]:
        if count < 1:
            raise ValueError("count must be at least 1")
        _, g = self._group(stream, group)
        now = time.monotonic()
        out: list[PendingEntry] = []
        for seq, p in g.pending.items():
            idle_ms = int((now - p.delivered_at) * 1000)
            if idle_ms < min_idle_ms or (consumer is not None and p.consumer != consumer):
                continue
            out.append(PendingEntry(_eid(seq), p.consumer, idle_ms, p.deliveries))
            if len(out) >= count:
                break
        return out

    async def claim(
        self, stream: str, group: str, consumer: str, entry_ids: Sequence[str],
        min_idle_ms: int,
    ) -> list[Delivery]:
        st, g = self._group(stream, group)
        now = time.monotonic()
        oldest = now - min_idle_ms / 1000
        out: list[Delivery] = []
        for seq in sorted({_seq(e) for e in entry_ids}):
            p = g.pending.get(seq)
            if p is None or p.delivered_at > oldest:
                continue
            p.consumer = consumer
            p.delivered_at = now
            p.deliveries += 1
            out.append(Delivery(stream, _eid(seq), st.entries[seq], p.deliveries))
        return out

    async def touch(
        self, stream: str, group: str, consumer: str, entry_ids: Sequence[str]
    ) -> int:
        _, g = self._group(stream, group)
        now = time.monotonic()
        n = 0
        for seq in {_seq(e) for e in entry_ids}:
            p = g.pending.get(seq)
            if p is not None and p.consumer == consumer:
                p.delivered_at = now
                n += 1
        return n

    async def stats(self, stream: str, group: str) -> StreamStats:
        st, g = self._group(stream, group)
        return StreamStats(
            length=st.next - st.first,
            pending=len(g.pending),
            lag=st.next - 1 - g.last_delivered,
            entries_read=g.last_delivered,  # sequence numbers count every entry ever added
        )

    async def length(self, stream: str) -> int:
        st = self._streams.get(stream)
        return 0 if st is None else st.next - st.first

    async def trim(self, stream: str) -> int:
        st = self._streams.get(stream)
        if st is None or not st.groups:
            return 0  # no group has read anything: dropping could lose work
        safe = min(
            next(iter(g.pending)) if g.pending else g.last_delivered + 1
            for g in st.groups.values()
        )
        dropped = max(0, safe - st.first)
        for seq in range(st.first, st.first + dropped):
            del st.entries[seq]
        st.first += dropped
        return dropped

    # ---- progress -----------------------------------------------------------------------
    async def get_progress(self, run: str, keys: Sequence[str]) -> list[Progress | None]:
        self._alive("progress", run)
        table = self._progress.get(run, {})
        out: list[Progress | None] = []
        for key in keys:
            p = table.get(key)
            out.append(None if p is None else Progress(p.units, p.done))
        return out

    # ---- run events ---------------------------------------------------------------------
    def _read_events(self, run: str, start: int, count: int) -> list[tuple[str, dict[str, Any]]]:
        self._alive("events", run)
        log = self._events.get(run)
        if log is None:
            return []
        chunk = log.events[start : start + count]
        return [(_eid(start + i + 1), json.loads(text)) for i, text in enumerate(chunk)]

    async def last_event_id(self, run: str) -> str | None:
        self._alive("events", run)
        log = self._events.get(run)
        return _eid(len(log.events)) if log is not None and log.events else None

    async def read_events(
        self, run: str, after: str | None, count: int, block_ms: int
    ) -> list[tuple[str, dict[str, Any]]]:
        if count < 1:
            raise ValueError("count must be at least 1")
        start = 0 if after is None else _seq(after)
        out = self._read_events(run, start, count)
        if out or block_ms <= 0:
            return out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            fut: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(remaining, _wake, (fut,))
            self._event_waiters.setdefault(run, set()).add(fut)
            try:
                await fut
            finally:
                timer.cancel()
                waiters = self._event_waiters.get(run)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        del self._event_waiters[run]
            out = self._read_events(run, start, count)
            if out:
                return out

    async def expire_run(self, run: str, ttl_s: int) -> None:
        self._sweep()
        for kind in ("events", "progress", "cancel"):
            self._alive(kind, run)
            if self._key_exists(kind, run):  # like EXPIRE: a missing key stays missing
                self._set_expiry(kind, run, ttl_s)

    def _key_exists(self, kind: str, name: str) -> bool:
        if kind == "events":
            return name in self._events
        if kind == "progress":
            return name in self._progress
        return name in self._cancelled

    # ---- control ------------------------------------------------------------------------
    async def cancel(self, run: str, ttl_s: int = 3600) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._sweep()
        self._cancelled.add(run)
        self._set_expiry("cancel", run, ttl_s)

    async def is_cancelled(self, run: str) -> bool:
        self._alive("cancel", run)
        return run in self._cancelled

    # ---- leases and registry ------------------------------------------------------------
    async def acquire_fenced(self, name: str, owner: str, ttl_ms: int) -> int | None:
        return self._take_lease(name, owner, ttl_ms, fenced=True)

    async def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Without a fencing token (no counter kept per name, as on Redis)."""
        return self._take_lease(name, owner, ttl_ms, fenced=False) is not None

    def _take_lease(self, name: str, owner: str, ttl_ms: int, *, fenced: bool) -> int | None:
        """Take or renew; the holder's token (0 when not `fenced`), None if another owner
        holds the lease."""
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        self._sweep()
        self._alive("lease", name)
        holder = self._leases.get(name)
        if holder is not None and holder[0] != owner:
            return None
        if holder is None:
            token = 0
            if fenced:
                token = self._fences[name] = self._fences.get(name, 0) + 1
            holder = self._leases[name] = (owner, token)
        self._set_expiry("lease", name, ttl_ms / 1000)
        return holder[1]

    async def release_lease(self, name: str, owner: str) -> None:
        self._alive("lease", name)
        held = self._leases.get(name)
        if held is not None and held[0] == owner:
            self._delete("lease", name)

    async def heartbeat(self, group: str, member: str, info: dict[str, Any], ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        text = json.dumps(info, separators=(",", ":"), ensure_ascii=False)
        self._members.setdefault(group, {})[member] = (time.monotonic() + ttl_ms / 1000, text)

    async def members(self, group: str) -> dict[str, dict[str, Any]]:
        table = self._members.get(group)
        if not table:
            return {}
        now = time.monotonic()
        for member in [m for m, (deadline, _) in table.items() if deadline <= now]:
            del table[member]
        if not table:
            del self._members[group]
        return {m: json.loads(text) for m, (_, text) in table.items()}

    async def leave(self, group: str, member: str) -> None:
        table = self._members.get(group)
        if table is not None:
            table.pop(member, None)
            if not table:
                del self._members[group]

    # ---- rate limit ---------------------------------------------------------------------
    async def take_token(self, key: str, rate: float, burst: int) -> float:
        now = time.monotonic()
        tat, wait = gcra(self._tats.get(key), now, rate, burst)
        if tat is not None:
            self._tats[key] = tat
            self._tats.move_to_end(key)
            if len(self._tats) > RATE_KEYS:  # bounded: the least recently allowed goes
                self._tats.popitem(last=False)  # (it starts again with a full burst)
        return wait

    # ---- small shared state -------------------------------------------------------------
    async def hincr(self, key: str, fields: dict[str, float]) -> None:
        # Validate everything before writing; Redis refuses non-finite floats too.
        table = self._hashes.get(key, {})
        values = {name: table.get(name, 0.0) + float(v) for name, v in fields.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError(f"hincr on {key!r} would make a non-finite value")
        self._hashes.setdefault(key, {}).update(values)

    async def hgetall(self, key: str) -> dict[str, float]:
        return dict(self._hashes.get(key, {}))

    async def ping(self) -> bool:
        return True
