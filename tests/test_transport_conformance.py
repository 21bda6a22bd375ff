"""One conformance suite for every Transport (see the contract in orchestrator/transport.py).

Each test runs against the embedded transport and against a real Redis server (the
`transport` fixture in conftest.py is parametrized). Where Redis is allowed to be less
exact (approximate trimming), the assertion says so explicitly.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.embedded import EmbeddedTransport, NoGroupError
from orchestrator.envelope import Envelope
from orchestrator.transport import Commit, Progress, Transport
from tests.waiting import eventually as _eventually
from tests.waiting import loop_turn

WAIT_S = 10.0  # generous upper bound for anything that should happen "soon"
BIG_IDLE_MS = 3_600_000  # an hour: nothing delivered during a test is that idle
# blocked reads wait longer than WAIT_S, so a missed wake-up fails the test instead of
# being rescued by the read's own timeout
LONG_BLOCK_MS = int(WAIT_S * 1000) * 6


# ---- helpers ------------------------------------------------------------------------------


def env(i: int, run: str = "r1", stage: str = "verify", payload: Any = None) -> Envelope:
    return Envelope(
        run=run,
        pipeline="factcheck",
        stage=stage,
        lineage=(("claims", i), ("queries", i % 3)),
        kind="unit",
        credit=Fraction(1, 2 ** (i % 7 + 1)),
        payload={"i": i} if payload is None else payload,
        sender="queries#0",
        scope={"claims": Fraction(1, 3), "queries": Fraction(5, 96)},
        context={"input": "Is the sky blue?", "claims": "The sky is blue."},
    )


def id_key(entry_id: str) -> tuple[int, int]:
    """Stream ids ("<ms>-<seq>" on Redis, "<n>-0" embedded) ordered as numbers, not text."""
    head, _, tail = entry_id.partition("-")
    return int(head), int(tail or 0)


def is_redis(t: Transport) -> bool:
    return not isinstance(t, EmbeddedTransport)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` until true, failing after WAIT_S (for TTL expiry, which has no event)."""
    try:
        await _eventually(check, WAIT_S, every=0.005)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def blocked_readers(t: Transport) -> int:
    """How many reads are parked waiting for data (test-only peek into each backend)."""
    if isinstance(t, EmbeddedTransport):
        n = sum(len(w) for w in t._event_waiters.values())
        return n + sum(len(s.waiters) for s in t._streams.values())
    clients = await t._r.client_list()  # type: ignore[attr-defined]
    return sum(1 for c in clients if "b" in c.get("flags", "") and c.get("cmd") != "client")


async def until_blocked(t: Transport, n: int = 1) -> None:
    async def check() -> bool:
        return await blocked_readers(t) >= n

    await eventually(check, f"{n} blocked reader(s)")


async def publish_n(t: Transport, stream: str, n: int, start: int = 0) -> list[Envelope]:
    envs = [env(i) for i in range(start, start + n)]
    for e in envs:
        await t.publish(stream, e)
    return envs


# ---- work streams -------------------------------------------------------------------------


async def test_round_trip_preserves_envelope(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    original = env(
        5,
        payload={"text": "naïve café — 東京 🌍", "nested": {"a": [1, 2.5, None, True, {"b": "x"}]},
                 "quote": "he said \"hi\"\n\ttab", "big": 2**60},
    )
    original.credit = Fraction(3, 2**40)
    await transport.publish("s", original)
    got = await transport.consume(["s"], "g", "c1", 10, 0)
    assert len(got) == 1
    d = got[0]
    assert d.stream == "s"
    assert d.deliveries == 1
    assert d.envelope == original
    assert d.envelope.credit == Fraction(3, 2**40)
    assert d.envelope.lineage == (("claims", 5), ("queries", 2))
    assert (await transport.stats("s", "g")).pending == 1
    await transport.ack("s", "g", [d.entry_id])
    stats = await transport.stats("s", "g")
    assert (stats.pending, stats.lag, stats.length) == (0, 0, 1)


async def test_end_marker_round_trip(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    end = Envelope(run="r", pipeline="p", stage="agg", lineage=(("claims", 0),), kind="end",
                   credit=Fraction(7, 8), id="r:end.abc>agg")
    await transport.publish("s", end)
    [d] = await transport.consume(["s"], "g", "c", 5, 0)
    assert d.envelope == end


async def test_entry_ids_increase(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    await publish_n(transport, "s", 12)
    got = await transport.consume(["s"], "g", "c", 100, 0)
    keys = [id_key(d.entry_id) for d in got]
    assert keys == sorted(keys) and len(set(keys)) == 12
    assert [d.envelope.payload["i"] for d in got] == list(range(12))


async def test_each_entry_goes_to_one_consumer_of_a_group(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    await transport.ensure_group("s", "other")
    envs = await publish_n(transport, "s", 10)
    a = await transport.consume(["s"], "g", "a", 4, 0)
    b = await transport.consume(["s"], "g", "b", 100, 0)
    assert len(a) == 4 and len(b) == 6
    assert {d.entry_id for d in a}.isdisjoint({d.entry_id for d in b})
    assert [d.envelope for d in a + b] == envs
    assert await transport.consume(["s"], "g", "a", 100, 0) == []
    # another group sees everything again, as distinct Delivery objects
    o = await transport.consume(["s"], "other", "a", 100, 0)
    assert [d.envelope for d in o] == envs
    assert all(x is not y for x, y in zip(a + b, o, strict=True))


async def test_ensure_group_is_idempotent_and_reads_from_start(transport: Transport) -> None:
    envs = await publish_n(transport, "s", 3)  # published before any group exists
    await transport.ensure_group("s", "g")
    await transport.ensure_group("s", "g")
    got = await transport.consume(["s"], "g", "c", 10, 0)
    assert [d.envelope for d in got] == envs
    await transport.ensure_group("s", "g")  # must not rewind the group
    assert await transport.consume(["s"], "g", "c", 10, 0) == []


async def test_missing_group_raises(transport: Transport) -> None:
    with pytest.raises(NoGroupError):
        await transport.consume(["nope"], "g", "c", 1, 0)
    await transport.ensure_group("s", "g")
    with pytest.raises(NoGroupError):
        await transport.consume(["s"], "missing", "c", 1, 0)
    with pytest.raises(NoGroupError):
        await transport.claim_abandoned("s", "missing", "c", 0, 1)
    with pytest.raises(NoGroupError):
        await transport.stats("s", "missing")


async def test_consume_respects_count_across_streams(transport: Transport) -> None:
    streams = ["s0", "s1", "s2"]
    for s in streams:
        await transport.ensure_group(s, "g")
        await publish_n(transport, s, 4)
    seen: list[tuple[str, int]] = []
    while True:
        got = await transport.consume(streams, "g", "c", 5, 0)
        if not got:
            break
        assert len(got) <= 5
        seen += [(d.stream, d.envelope.payload["i"]) for d in got]
        await asyncio.gather(*(transport.ack(d.stream, "g", [d.entry_id]) for d in got))
    assert sorted(seen) == sorted((s, i) for s in streams for i in range(4))
    for s in streams:
        per_stream = [i for name, i in seen if name == s]
        assert per_stream == sorted(per_stream)  # each stream is read in order


async def test_consume_times_out_empty(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    assert await transport.consume(["s"], "g", "c", 1, 20) == []
    assert await transport.consume(["s"], "g", "c", 1, 0) == []


async def test_blocked_consume_wakes_on_publish(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    task = asyncio.create_task(transport.consume(["s"], "g", "c", 10, LONG_BLOCK_MS))
    await until_blocked(transport)
    e = env(1)
    await transport.publish("s", e)
    got = await asyncio.wait_for(task, WAIT_S)
    assert [d.envelope for d in got] == [e]


async def test_blocked_multi_stream_consume_wakes_on_publish(transport: Transport) -> None:
    for s in ("a", "b"):
        await transport.ensure_group(s, "g")
    # an entry already consumed by this group must not satisfy the blocked read
    await transport.publish("a", env(0))
    assert len(await transport.consume(["a", "b"], "g", "c", 10, 0)) == 1
    task = asyncio.create_task(transport.consume(["a", "b"], "g", "c", 10, LONG_BLOCK_MS))
    await until_blocked(transport)
    await transport.publish("b", env(7))
    got = await asyncio.wait_for(task, WAIT_S)
    assert [(d.stream, d.envelope.payload["i"]) for d in got] == [("b", 7)]


async def test_pending_entries_reclaimed_only_when_idle(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    envs = await publish_n(transport, "s", 3)
    first = await transport.consume(["s"], "g", "a", 3, 0)
    assert len(first) == 3
    # pending entries are never handed out again by consume
    assert await transport.consume(["s"], "g", "b", 10, 0) == []
    # not idle long enough
    assert await transport.claim_abandoned("s", "g", "b", BIG_IDLE_MS, 10) == []
    claimed = await transport.claim_abandoned("s", "g", "b", 0, 2)
    assert [d.envelope for d in claimed] == envs[:2]  # oldest first, at most `count`
    assert [d.entry_id for d in claimed] == [d.entry_id for d in first[:2]]
    assert all(d.deliveries == 2 for d in claimed)
    again = await transport.claim_abandoned("s", "g", "a", 0, 10)
    assert [d.deliveries for d in again] == [3, 3, 2]
    assert [d.envelope for d in again] == envs
    assert (await transport.stats("s", "g")).pending == 3


async def test_pending_lists_holders_without_changing_hands(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    await transport.ensure_group("t", "g")
    assert await transport.pending_consumers(["s", "t"], "g") == {}
    assert await transport.pending("s", "g", 10) == []
    await publish_n(transport, "s", 5)
    a = await transport.consume(["s"], "g", "a", 2, 0)
    b = await transport.consume(["s"], "g", "b", 3, 0)
    await transport.ack("s", "g", [b[1].entry_id])
    await transport.publish("t", env(9))
    assert len(await transport.consume(["t"], "g", "c", 1, 0)) == 1
    assert await transport.pending_consumers(["s", "t"], "g") == {
        "s": {"a": 2, "b": 2}, "t": {"c": 1}}
    assert await transport.pending_consumers(["t"], "g") == {"t": {"c": 1}}
    listed = await transport.pending("s", "g", 10)
    assert [p.entry_id for p in listed] == [a[0].entry_id, a[1].entry_id, b[0].entry_id,
                                             b[2].entry_id]  # oldest first, acked gone
    assert [p.consumer for p in listed] == ["a", "a", "b", "b"]
    assert all(p.deliveries == 1 and p.idle_ms >= 0 for p in listed)
    assert [p.entry_id for p in await transport.pending("s", "g", 1, consumer="b")] == [
        b[0].entry_id]
    assert await transport.pending("s", "g", 10, min_idle_ms=BIG_IDLE_MS) == []
    # listing is a read: the entries are still held by the same consumers, counts unchanged
    again = await transport.pending("s", "g", 10)
    assert [(p.consumer, p.deliveries) for p in again] == [(p.consumer, 1) for p in listed]


async def test_claim_by_id_takes_only_idle_pending_entries(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    envs = await publish_n(transport, "s", 4)
    got = await transport.consume(["s"], "g", "a", 4, 0)
    await transport.ack("s", "g", [got[2].entry_id])
    ids = [d.entry_id for d in got]
    # not idle enough: nothing changes hands
    assert await transport.claim("s", "g", "b", ids, BIG_IDLE_MS) == []
    # exactly the ids asked for (in stream order), minus the acknowledged one
    taken = await transport.claim("s", "g", "b", [ids[3], ids[2], ids[0]], 0)
    assert [d.entry_id for d in taken] == [ids[0], ids[3]]
    assert [d.envelope for d in taken] == [envs[0], envs[3]]
    assert [d.deliveries for d in taken] == [2, 2]
    assert await transport.pending_consumers(["s"], "g") == {"s": {"a": 1, "b": 2}}
    # a claim resets idle time: a second claimer racing for the same entries gets none
    assert await transport.claim("s", "g", "c", ids, 60_000) == []
    held = {p.entry_id: (p.consumer, p.deliveries) for p in await transport.pending("s", "g", 9)}
    assert held == {ids[0]: ("b", 2), ids[1]: ("a", 1), ids[3]: ("b", 2)}


async def test_touch_keeps_a_held_entry_from_looking_idle(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    await publish_n(transport, "s", 3)
    got = await transport.consume(["s"], "g", "a", 3, 0)
    ids = [d.entry_id for d in got]
    taken = await transport.claim("s", "g", "b", [ids[2]], 0)
    assert len(taken) == 1

    async def idle_a_while() -> bool:  # idle time has a clock: wait until it moved on
        return all(p.idle_ms >= 300 for p in await transport.pending("s", "g", 10))

    await eventually(idle_a_while, "entries idle 300 ms")
    # only what "a" still holds is touched; ids[2] is b's now and stays b's, untouched
    assert await transport.touch("s", "g", "a", ids) == 2
    after = {p.entry_id: p for p in await transport.pending("s", "g", 10)}
    assert [after[i].consumer for i in ids] == ["a", "a", "b"]
    assert [after[i].deliveries for i in ids] == [1, 1, 2]  # a touch is not a delivery
    assert after[ids[0]].idle_ms < 300 and after[ids[1]].idle_ms < 300
    assert after[ids[2]].idle_ms >= 300
    # what was touched is not idle enough for a claim that needs the time it had
    assert await transport.claim("s", "g", "c", ids[:2], 300) == []


async def test_ack_removes_from_pending(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    await publish_n(transport, "s", 4)
    got = await transport.consume(["s"], "g", "a", 4, 0)
    await transport.ack("s", "g", [got[0].entry_id, got[2].entry_id])
    await transport.ack("s", "g", [got[0].entry_id])  # acking twice is harmless
    assert (await transport.stats("s", "g")).pending == 2
    left = await transport.claim_abandoned("s", "g", "b", 0, 10)
    assert [d.entry_id for d in left] == [got[1].entry_id, got[3].entry_id]
    await transport.ack("s", "g", [d.entry_id for d in left])
    assert await transport.claim_abandoned("s", "g", "b", 0, 10) == []
    assert (await transport.stats("s", "g")).pending == 0


async def test_stats_length_pending_lag(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    await transport.ensure_group("s", "h")
    s = await transport.stats("s", "g")
    assert (s.length, s.pending, s.lag) == (0, 0, 0)
    await publish_n(transport, "s", 7)
    got = await transport.consume(["s"], "g", "a", 3, 0)
    await transport.ack("s", "g", [got[0].entry_id])
    s = await transport.stats("s", "g")
    assert (s.length, s.pending, s.lag) == (7, 2, 4)
    h = await transport.stats("s", "h")
    assert (h.length, h.pending, h.lag) == (7, 0, 7)


# ---- commit -------------------------------------------------------------------------------


async def test_commit_applies_every_part(transport: Transport) -> None:
    await transport.ensure_group("in", "g")
    await transport.ensure_group("out", "g")
    await transport.publish("in", env(0))
    [d] = await transport.consume(["in"], "g", "w", 1, 0)
    outs = [env(10, stage="next"), env(11, stage="next")]
    await transport.commit(Commit(
        messages=[("out", outs[0]), ("out", outs[1])],
        events=[("r1", {"type": "unit", "text": "ünï"}), ("r1", {"type": "end"})],
        progress=[("r1", d.envelope.id, Progress(2, True)), ("r1", "k2", Progress(1))],
        acks=[("in", "g", [d.entry_id])],
    ))
    assert (await transport.stats("in", "g")).pending == 0
    assert [x.envelope for x in await transport.consume(["out"], "g", "w", 10, 0)] == outs
    events = await transport.read_events("r1", None, 10, 0)
    assert [e for _, e in events] == [{"type": "unit", "text": "ünï"}, {"type": "end"}]
    assert await transport.get_progress("r1", [d.envelope.id, "k2", "k3"]) == [
        Progress(2, True), Progress(1, False), None]


async def test_last_event_id_is_the_latest_read(transport: Transport) -> None:
    """What the gateway checks a resume id against, without reading the whole log."""
    assert await transport.last_event_id("r9") is None
    for i in range(3):
        await transport.commit(Commit(events=[("r9", {"i": i})]))
        events = await transport.read_events("r9", None, 10, 0)
        assert await transport.last_event_id("r9") == events[-1][0]
    assert len(events) == 3


async def test_failed_commit_applies_nothing(transport: Transport) -> None:
    await transport.ensure_group("in", "g")
    await transport.publish("in", env(0))
    [d] = await transport.consume(["in"], "g", "w", 1, 0)
    bad = Commit(
        messages=[("out", env(1))],
        events=[("r1", {"ok": 1}), ("r1", {"not json": object()})],
        progress=[("r1", "k", Progress(1, True))],
        acks=[("in", "g", [d.entry_id])],
    )
    with pytest.raises(TypeError):
        await transport.commit(bad)
    assert (await transport.stats("in", "g")).pending == 1
    assert await transport.read_events("r1", None, 10, 0) == []
    assert await transport.get_progress("r1", ["k"]) == [None]
    await transport.ensure_group("out", "g")
    assert await transport.consume(["out"], "g", "w", 10, 0) == []


async def test_concurrent_reader_never_sees_half_a_commit(transport: Transport) -> None:
    """A reader polling while commits land sees, for every commit, all parts or none."""
    await transport.ensure_group("out", "g")
    n = 20
    stop = asyncio.Event()
    observations: list[tuple[int, int, int]] = []

    async def observe() -> None:
        while not stop.is_set():
            events = await transport.read_events("r", None, 1000, 0)
            progress = await transport.get_progress("r", [f"k{i}" for i in range(n)])
            length = (await transport.stats("out", "g")).length
            # read in the order opposite to the commit's: later parts first would show
            # a torn commit as more progress than messages
            observations.append((len(events), sum(p is not None for p in progress), length))
            await loop_turn()

    watcher = asyncio.create_task(observe())
    for i in range(n):
        await transport.commit(Commit(
            messages=[("out", env(i))],
            events=[("r", {"i": i})],
            progress=[("r", f"k{i}", Progress(1, True))],
        ))
    stop.set()
    await watcher
    for n_events, n_progress, length in observations:
        assert n_events <= n_progress <= length  # reads were sequential: monotone counts
    final = (len(await transport.read_events("r", None, 1000, 0)),
             sum(p is not None for p in await transport.get_progress(
                 "r", [f"k{i}" for i in range(n)])),
             (await transport.stats("out", "g")).length)
    assert final == (n, n, n)


async def test_concurrent_commits_are_independent(transport: Transport) -> None:
    """Commits made at the same moment (the Redis transport sends them as one group
    commit) each apply whole, and one that cannot be encoded fails alone."""
    await transport.ensure_group("in", "g")
    await transport.ensure_group("out", "g")
    await publish_n(transport, "in", 20)
    got = await transport.consume(["in"], "g", "w", 20, 0)
    good = [
        Commit(messages=[("out", env(100 + i))], events=[("r", {"i": i})],
               progress=[("r", f"k{i}", Progress(i, True))], acks=[("in", "g", [d.entry_id])])
        for i, d in enumerate(got[:-1])
    ]
    bad = Commit(messages=[("out", env(999))], events=[("r", {"bad": object()})],
                 progress=[("r", "bad", Progress(1, True))], acks=[("in", "g", [got[-1].entry_id])])
    results = await asyncio.gather(*(transport.commit(c) for c in [*good[:10], bad, *good[10:]]),
                                   return_exceptions=True)
    assert [r if r is True else type(r) for r in results] == [True] * 10 + [TypeError] + [True] * 9
    out = await transport.consume(["out"], "g", "w", 100, 0)  # concurrent: in any order
    assert sorted((d.envelope for d in out), key=lambda e: e.payload["i"]) == [
        env(100 + i) for i in range(19)]
    assert sorted(e["i"] for _, e in await transport.read_events("r", None, 100, 0)) == list(
        range(19))
    assert await transport.get_progress("r", ["k3", "bad"]) == [Progress(3, True), None]
    claimed = await transport.claim_abandoned("in", "g", "w2", 0, 100)
    assert [d.entry_id for d in claimed] == [got[-1].entry_id]  # only the bad one's input


async def test_concurrent_reads_answer_each_caller(transport: Transport) -> None:
    """Reads made at the same moment (batched into one pipeline on Redis) each get the
    answer to their own question."""
    for run in ("a", "b"):
        await transport.commit(Commit(progress=[(run, f"{run}{i}", Progress(i, i % 2 == 0))
                                                for i in range(5)]))
    await transport.cancel("b")
    calls: list[Awaitable[Any]] = []
    expected: list[Any] = []
    for i in range(5):
        for run in ("a", "b", "c"):
            keys = [f"{run}{i}", f"{run}{4 - i}", "nope"]
            calls.append(transport.get_progress(run, keys))
            expected.append([None if run == "c" else Progress(j, j % 2 == 0)
                             for j in (i, 4 - i)] + [None])
            calls.append(transport.is_cancelled(run))
            expected.append(run == "b")
    assert await asyncio.gather(*calls) == expected


# ---- trimming -----------------------------------------------------------------------------


async def test_trim_never_drops_unacknowledged(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    await transport.ensure_group("s", "h")
    envs = await publish_n(transport, "s", 10)
    got = await transport.consume(["s"], "g", "a", 6, 0)
    await transport.ack("s", "g", [got[i].entry_id for i in (0, 1, 3)])
    h = await transport.consume(["s"], "h", "a", 10, 0)
    await transport.ack("s", "h", [d.entry_id for d in h])
    dropped = await transport.trim("s")
    length = (await transport.stats("s", "g")).length
    assert length == 10 - dropped
    if is_redis(transport):
        assert 0 <= dropped <= 2  # approximate: whole nodes only, never past the first unacked
    else:
        assert dropped == 2  # exactly the acknowledged prefix
    # everything unacknowledged is still there, with its content
    claimed = await transport.claim_abandoned("s", "g", "b", 0, 100)
    assert [d.envelope for d in claimed] == [envs[i] for i in (2, 4, 5)]
    rest = await transport.consume(["s"], "g", "b", 100, 0)
    assert [d.envelope for d in rest] == envs[6:]


async def test_trim_drops_acknowledged_entries(transport: Transport) -> None:
    await transport.ensure_group("s", "g")
    await publish_n(transport, "s", 250)  # spans several Redis stream nodes (100 each)
    got = await transport.consume(["s"], "g", "a", 250, 0)
    await transport.ack("s", "g", [d.entry_id for d in got[:230]])
    dropped = await transport.trim("s")
    length = (await transport.stats("s", "g")).length
    assert length == 250 - dropped
    if is_redis(transport):
        assert 100 <= dropped <= 230  # at least the fully acknowledged first node goes
    else:
        assert dropped == 230
    await transport.ack("s", "g", [d.entry_id for d in got[230:]])
    await transport.trim("s")
    if not is_redis(transport):
        assert (await transport.stats("s", "g")).length == 0
    # new entries still flow after trimming
    e = env(999)
    await transport.publish("s", e)
    assert [d.envelope for d in await transport.consume(["s"], "g", "a", 10, 0)] == [e]


async def test_publishing_after_trim_keeps_unacknowledged(transport: Transport) -> None:
    """Redis trims on XADD too (MINID from the last trim): that must stay safe."""
    await transport.ensure_group("s", "g")
    envs = await publish_n(transport, "s", 10)
    got = await transport.consume(["s"], "g", "a", 10, 0)
    await transport.ack("s", "g", [d.entry_id for d in got[:5]])
    await transport.trim("s")
    await transport.ack("s", "g", [d.entry_id for d in got[5:8]])  # acked after the trim
    more = await publish_n(transport, "s", 300, start=10)
    length = (await transport.stats("s", "g")).length
    if is_redis(transport):
        assert 305 <= length <= 310  # approximate: whole nodes of the acked prefix at most
    else:
        assert length == 305
    claimed = await transport.claim_abandoned("s", "g", "b", 0, 100)
    assert [d.envelope for d in claimed] == envs[8:]
    rest = await transport.consume(["s"], "g", "b", 1000, 0)
    assert [d.envelope for d in rest] == more


async def test_trim_without_groups_keeps_everything(transport: Transport) -> None:
    await publish_n(transport, "s", 3)
    assert await transport.trim("s") == 0
    assert await transport.trim("missing") == 0
    await transport.ensure_group("s", "g")
    assert len(await transport.consume(["s"], "g", "c", 10, 0)) == 3


# ---- progress and run events ---------------------------------------------------------------


async def test_progress_missing_and_updated(transport: Transport) -> None:
    assert await transport.get_progress("nope", ["a", "b"]) == [None, None]
    await transport.commit(Commit(progress=[("r", "a", Progress(3, False))]))
    await transport.commit(Commit(progress=[("r", "a", Progress(4, True))]))
    assert await transport.get_progress("r", ["a", "b"]) == [Progress(4, True), None]
    assert await transport.get_progress("other", ["a"]) == [None]


async def test_events_resume_after_id(transport: Transport) -> None:
    for i in range(5):
        await transport.commit(Commit(events=[("r", {"i": i, "t": "😀"})]))
    await transport.commit(Commit(events=[("other", {"x": 1})]))
    first = await transport.read_events("r", None, 2, 0)
    assert [e["i"] for _, e in first] == [0, 1]
    rest = await transport.read_events("r", first[-1][0], 100, 0)
    assert [e["i"] for _, e in rest] == [2, 3, 4]
    ids = [i for i, _ in first + rest]
    assert [id_key(i) for i in ids] == sorted(id_key(i) for i in ids)
    assert len(set(ids)) == 5
    assert await transport.read_events("r", ids[-1], 100, 0) == []
    assert await transport.read_events("missing", None, 10, 0) == []


async def test_read_events_many_reads_each_log_from_its_own_cursor(transport: Transport) -> None:
    """One look at many logs (the supervisor's tick) gives what one read per run gives."""
    for i in range(4):
        await transport.commit(Commit(events=[("a", {"i": i}), ("b", {"j": i})]))
    (a1, _), _ = await transport.read_events("a", None, 2, 0)
    got = await transport.read_events_many({"a": a1, "b": None, "missing": None}, 2)
    assert set(got) == {"a", "b", "missing"}
    for run, cursor in (("a", a1), ("b", None), ("missing", None)):
        assert got[run] == await transport.read_events(run, cursor, 2, 0)
    assert [e for _, e in got["a"]] == [{"i": 1}, {"i": 2}]  # after a1, two at most
    assert [e for _, e in got["b"]] == [{"j": 0}, {"j": 1}]
    assert got["missing"] == []
    assert await transport.read_events_many({}, 10) == {}
    with pytest.raises(ValueError):
        await transport.read_events_many({"a": None}, 0)


async def test_blocking_read_events_wakes_on_append(transport: Transport) -> None:
    await transport.commit(Commit(events=[("r", {"i": 0})]))
    [(last, _)] = await transport.read_events("r", None, 10, 0)
    task = asyncio.create_task(transport.read_events("r", last, 10, LONG_BLOCK_MS))
    await until_blocked(transport)
    await transport.commit(Commit(events=[("other", {"i": -1})]))  # not this run
    await transport.commit(Commit(events=[("r", {"i": 1})]))
    got = await asyncio.wait_for(task, WAIT_S)
    assert [e for _, e in got] == [{"i": 1}]


async def test_read_events_block_times_out(transport: Transport) -> None:
    assert await transport.read_events("r", None, 10, 20) == []


async def test_expire_run(transport: Transport) -> None:
    for run in ("r", "keep"):
        await transport.commit(Commit(events=[(run, {"a": 1})],
                                      progress=[(run, "k", Progress(1, True))]))
        await transport.cancel(run)
    await transport.expire_run("keep", 3600)
    await transport.expire_run("r", 0)  # like EXPIRE 0: gone at once
    assert await transport.read_events("r", None, 10, 0) == []
    assert await transport.get_progress("r", ["k"]) == [None]
    assert not await transport.is_cancelled("r")
    assert len(await transport.read_events("keep", None, 10, 0)) == 1
    assert await transport.get_progress("keep", ["k"]) == [Progress(1, True)]
    assert await transport.is_cancelled("keep")


# ---- control, leases, registry, shared state ---------------------------------------------


async def test_cancel_flags(transport: Transport) -> None:
    assert not await transport.is_cancelled("r")
    await transport.cancel("r")
    assert await transport.is_cancelled("r")
    assert not await transport.is_cancelled("r2")


async def test_leases_exclusive_and_renewable_by_owner(transport: Transport) -> None:
    assert await transport.acquire_lease("p0", "a", 60_000)
    assert not await transport.acquire_lease("p0", "b", 60_000)
    assert await transport.acquire_lease("p0", "a", 60_000)  # renew
    await transport.release_lease("p0", "b")  # not the owner: no effect
    assert not await transport.acquire_lease("p0", "b", 60_000)
    assert await transport.acquire_lease("p1", "b", 60_000)  # other leases are independent
    await transport.release_lease("p0", "a")
    assert await transport.acquire_lease("p0", "b", 60_000)
    assert not await transport.acquire_lease("p0", "a", 60_000)


async def test_length_counts_kept_entries_without_a_group(transport: Transport) -> None:
    assert await transport.length("nowhere") == 0
    for i in range(3):
        await transport.publish("s", env(i))
    assert await transport.length("s") == 3
    with pytest.raises(NoGroupError):  # it read nothing through a group, created none
        await transport.stats("s", "g")


async def test_rate_limit_allows_a_burst_then_says_when(transport: Transport) -> None:
    """`take_token`: `burst` requests at once, then refusals naming a wait of at most one
    interval (1/rate s); callers are independent; a bad limit is refused."""
    assert [await transport.take_token("a", 0.01, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    waits = [await transport.take_token("a", 0.01, 3) for _ in range(2)]
    assert all(0 < w <= 100.0 for w in waits)
    assert await transport.take_token("b", 0.01, 3) == 0.0
    for bad in ((0.0, 1), (-1.0, 1), (1.0, 0)):
        with pytest.raises(ValueError):
            await transport.take_token("c", *bad)


@pytest.mark.parametrize(("rate", "burst"),
                         [(7.0, 7), (3.0, 5), (0.3, 4), (7.0, 256), (1000.0, 256)])
async def test_rate_limit_admits_exactly_a_burst_at_any_rate(
    transport: Transport, rate: float, burst: int
) -> None:
    """Intervals that are not whole milliseconds (1000/7) too: the Redis script once kept
    14 digits of the state and refused a burst's last request now and then."""
    for i in range(20 if burst < 100 else 2):  # at once (one ms of the server's clock, mostly)
        waits = await asyncio.gather(*(transport.take_token(f"k{i}", rate, burst)
                                       for _ in range(burst)))
        assert waits == [0.0] * burst


@pytest.mark.redis
@pytest.mark.parametrize(("rate", "burst"), [(7.0, 7), (7.0, 50), (7.0, 256), (1000.0, 256)])
def test_redis_rate_script_admits_a_whole_burst_in_one_millisecond(
    redis_url: str, rate: float, burst: int
) -> None:
    """The rate script with its clock frozen (every request in the same millisecond, the
    worst case the real clock only sometimes hits): its float arithmetic on an epoch-ms
    state must not refuse a burst's last requests, nor admit one more."""
    from workers.redis_transport import _NOW_MS, _RATE

    frozen = _RATE.replace(_NOW_MS, "\nlocal now = 1732700000123\n")
    assert frozen != _RATE
    r = redis.Redis.from_url(redis_url)
    try:
        interval = repr(1000.0 / rate)
        got = [r.eval(frozen, 1, "frozen", interval, burst) for _ in range(burst + 1)]
    finally:
        r.close()
    assert got[:burst] == [b""] * burst
    assert 0 < float(got[burst]) <= 1000.0 / rate + (burst + 2) * 0.0005  # ms, float slack


async def test_rate_limit_refills_at_its_rate(transport: Transport) -> None:
    """After a refusal, waiting for the time it named lets the next request through."""
    assert await transport.take_token("a", 1.0, 1) == 0.0
    wait = await transport.take_token("a", 1.0, 1)
    assert 0 < wait <= 1.0 + 1e-6

    async def allowed() -> bool:
        return await transport.take_token("a", 20.0, 1) == 0.0

    await eventually(allowed, "a token to come back")


async def test_lease_expires_after_ttl(transport: Transport) -> None:
    assert await transport.acquire_lease("p0", "a", 60_000)
    assert await transport.acquire_lease("p0", "a", 50)  # renewal shortens the ttl

    async def taken_by_b() -> bool:
        return await transport.acquire_lease("p0", "b", 60_000)

    await eventually(taken_by_b, "lease to expire")
    assert not await transport.acquire_lease("p0", "a", 60_000)


async def test_fencing_tokens_grow_with_each_new_owner(transport: Transport) -> None:
    t1 = await transport.acquire_fenced("p0", "a", 60_000)
    assert t1 is not None and t1 >= 1
    assert await transport.acquire_fenced("p0", "a", 60_000) == t1  # renewal keeps it
    assert await transport.acquire_fenced("p0", "b", 60_000) is None
    await transport.release_lease("p0", "a")
    t2 = await transport.acquire_fenced("p0", "b", 60_000)
    assert t2 is not None and t2 > t1
    await transport.release_lease("p0", "b")
    t3 = await transport.acquire_fenced("p0", "a", 60_000)  # even the old owner: new token
    assert t3 is not None and t3 > t2
    other = await transport.acquire_fenced("p1", "a", 60_000)  # independent lease
    assert other is not None


async def test_fenced_commit_applies_only_under_its_token(transport: Transport) -> None:
    from orchestrator.transport import Fence, FencedError

    await transport.ensure_group("s", "g")
    await transport.ensure_group("out", "g")
    await publish_n(transport, "s", 2)
    got = await transport.consume(["s"], "g", "a", 2, 0)
    token = await transport.acquire_fenced("p0", "a", 60_000)
    assert token is not None
    await transport.commit(Commit(
        messages=[("out", env(10))], events=[("r", {"mid": "x1"})],
        progress=[("r", "k1", Progress(1, True))], acks=[("s", "g", [got[0].entry_id])],
        fence=Fence("p0", token),
    ))
    # the lease moves on (expiry or release, then another owner): the old token is stale
    await transport.release_lease("p0", "a")
    assert await transport.acquire_fenced("p0", "b", 60_000) is not None
    stale = Commit(
        messages=[("out", env(11))], events=[("r", {"mid": "x2"})],
        progress=[("r", "k2", Progress(1, True))], acks=[("s", "g", [got[1].entry_id])],
        fence=Fence("p0", token),
    )
    with pytest.raises(FencedError):
        await transport.commit(stale)
    with pytest.raises(FencedError):  # a lease nobody holds refuses every token
        await transport.commit(Commit(events=[("r", {"mid": "x3"})], fence=Fence("p9", 1)))
    out = await transport.consume(["out"], "g", "c", 10, 0)
    assert [d.envelope for d in out] == [env(10)]
    assert [ev for _, ev in await transport.read_events("r", None, 10, 0)] == [{"mid": "x1"}]
    assert await transport.get_progress("r", ["k1", "k2"]) == [Progress(1, True), None]
    assert (await transport.stats("s", "g")).pending == 1  # the stale ack did not apply


def _guarded(run: str, key: str | None, i: int, entry: str) -> Commit:
    from orchestrator.transport import Guard

    return Commit(
        messages=[("out", env(i, run=run))], events=[(run, {"mid": f"m{i}"})],
        progress=[(run, f"w{i}", Progress(1, True))], acks=[("s", "g", [entry])],
        guard=Guard(run, key),
    )


async def test_guarded_commit_applies_only_acks_once_done_or_cancelled(
    transport: Transport,
) -> None:
    """A guard stops the writes (not the ack) of a commit whose run is cancelled or whose
    progress record is done, atomically with the commit itself."""
    await transport.ensure_group("s", "g")
    await transport.ensure_group("out", "g")
    await publish_n(transport, "s", 5)
    got = [d.entry_id for d in await transport.consume(["s"], "g", "a", 5, 0)]
    await transport.commit(Commit(progress=[("r", "done-key", Progress(3, True)),
                                            ("r", "open-key", Progress(2, False))]))
    await transport.cancel("gone", 60)
    assert await transport.commit(_guarded("r", "open-key", 0, got[0])) is True
    assert await transport.commit(_guarded("r", None, 1, got[1])) is True
    assert await transport.commit(_guarded("r", "done-key", 2, got[2])) is False
    assert await transport.commit(_guarded("gone", None, 3, got[3])) is False
    assert await transport.commit(_guarded("gone", "open-key", 4, got[4])) is False
    out = await transport.consume(["out"], "g", "c", 10, 0)
    assert sorted(d.envelope.payload["i"] for d in out) == [0, 1]
    assert [ev["mid"] for _, ev in await transport.read_events("r", None, 10, 0)] == ["m0", "m1"]
    assert await transport.read_events("gone", None, 10, 0) == []
    assert await transport.get_progress("r", ["w0", "w1", "w2"]) == [
        Progress(1, True), Progress(1, True), None]
    assert (await transport.stats("s", "g")).pending == 0  # every ack applied


async def test_guard_and_fence_together(transport: Transport) -> None:
    """A fence is checked first: a stale token refuses even a commit its guard would stop."""
    from orchestrator.transport import Fence, FencedError

    await transport.ensure_group("s", "g")
    await transport.ensure_group("out", "g")
    await publish_n(transport, "s", 2)
    got = [d.entry_id for d in await transport.consume(["s"], "g", "a", 2, 0)]
    token = await transport.acquire_fenced("p0", "a", 60_000)
    assert token is not None
    await transport.cancel("gone", 60)
    stale = _guarded("gone", None, 0, got[0])
    stale.fence = Fence("p0", token + 1)
    with pytest.raises(FencedError):
        await transport.commit(stale)
    live = _guarded("gone", None, 1, got[1])
    live.fence = Fence("p0", token)
    assert await transport.commit(live) is False
    assert (await transport.stats("s", "g")).pending == 1  # only the live commit's ack


async def test_run_keys_written_after_expire_run_still_expire(transport: Transport) -> None:
    """A late write (a straggler's progress) after the run's keys were given their TTL must
    not create a key that lives forever: it gets the safety expiry."""
    transport.run_key_ttl_s = 1
    await transport.commit(Commit(events=[("r", {"mid": "a"})]))
    await transport.expire_run("r", 3600)  # no progress key yet: EXPIRE cannot reach it
    await transport.commit(Commit(events=[("late", {"mid": "b"})],
                                  progress=[("r", "k", Progress(1, True))]))
    assert await transport.get_progress("r", ["k"]) == [Progress(1, True)]

    async def gone() -> bool:
        p = await transport.get_progress("r", ["k"])
        e = await transport.read_events("late", None, 10, 0)
        return p == [None] and e == []

    await eventually(gone, "late run keys to expire")
    assert len(await transport.read_events("r", None, 10, 0)) == 1  # expire_run's TTL kept


async def test_members_expire_and_leave(transport: Transport) -> None:
    await transport.heartbeat("stage:llm", "i1", {"capacity": 4, "tags": ["gpu"]}, 60_000)
    await transport.heartbeat("stage:llm", "i2", {"capacity": 2}, 60_000)
    await transport.heartbeat("stage:other", "i9", {}, 60_000)
    assert await transport.members("stage:llm") == {
        "i1": {"capacity": 4, "tags": ["gpu"]}, "i2": {"capacity": 2}}
    await transport.heartbeat("stage:llm", "i1", {"capacity": 5}, 50)

    async def i1_gone() -> bool:
        return "i1" not in await transport.members("stage:llm")

    await eventually(i1_gone, "member i1 to expire")
    assert await transport.members("stage:llm") == {"i2": {"capacity": 2}}
    await transport.leave("stage:llm", "i2")
    assert await transport.members("stage:llm") == {}
    assert await transport.members("stage:other") == {"i9": {}}


async def test_hincr_accumulates(transport: Transport) -> None:
    assert await transport.hgetall("h") == {}
    await transport.hincr("h", {"a": 1.5, "b": 2})
    await transport.hincr("h", {"a": 0.25, "c": -1})
    assert await transport.hgetall("h") == {"a": 1.75, "b": 2.0, "c": -1.0}
    assert await transport.hgetall("other") == {}


async def test_ping(transport: Transport) -> None:
    assert await transport.ping()


async def test_entries_read_counts_consumption_through_trimming(transport: Transport) -> None:
    """`entries_read` is what benchmarks count drains by: trimming must not lower it."""
    await transport.ensure_group("s", "g")
    assert (await transport.stats("s", "g")).entries_read == 0
    await publish_n(transport, "s", 250)  # spans several Redis stream nodes (100 each)
    assert (await transport.stats("s", "g")).entries_read == 0  # published is not read
    got = await transport.consume(["s"], "g", "a", 230, 0)
    await transport.ack("s", "g", [d.entry_id for d in got])
    dropped = await transport.trim("s")
    assert 100 <= dropped <= 230 if is_redis(transport) else dropped == 230
    s = await transport.stats("s", "g")
    assert (s.length, s.pending, s.entries_read) == (250 - dropped, 0, 230)
    # a group created after the trim starts where the trimmed entries end
    await transport.ensure_group("s", "h")
    assert (await transport.stats("s", "h")).entries_read == dropped
    rest = await transport.consume(["s"], "g", "a", 100, 0)
    assert len(rest) == 20
    await transport.ack("s", "g", [d.entry_id for d in rest])
    await transport.trim("s")
    s = await transport.stats("s", "g")
    assert (s.pending, s.lag, s.entries_read) == (0, 0, 250)


# ---- property: random interleavings lose nothing and duplicate nothing --------------------

CONSUMERS = ("c0", "c1")

op = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 3)),
    st.tuples(st.just("consume"), st.sampled_from(CONSUMERS), st.integers(1, 4)),
    st.tuples(st.just("ack"), st.sampled_from(CONSUMERS), st.integers(0, 20)),
    st.tuples(st.just("claim"), st.sampled_from(CONSUMERS), st.integers(1, 4)),
    st.tuples(st.just("claim_young"), st.sampled_from(CONSUMERS)),
    st.tuples(st.just("trim")),
)


async def run_interleaving(t: Transport, ops: list[tuple[Any, ...]]) -> None:
    stream, group = "s", "g"
    await t.ensure_group(stream, group)
    published: list[str] = []  # envelope ids, in publish order
    entry_of: dict[str, str] = {}  # envelope id -> entry id (learned on first delivery)
    holder: dict[str, str] = {}  # entry id -> consumer (the model's pending list)
    deliveries: dict[str, int] = {}
    acked: list[str] = []

    def check(d: Any, expected_deliveries: int) -> None:
        assert entry_of.setdefault(d.envelope.id, d.entry_id) == d.entry_id
        assert d.deliveries == expected_deliveries

    for o in ops:
        kind = o[0]
        if kind == "publish":
            for _ in range(o[1]):
                e = env(len(published), run="prop")
                published.append(e.id)
                await t.publish(stream, e)
        elif kind == "consume":
            got = await t.consume([stream], group, o[1], o[2], 0)
            delivered = len(entry_of)
            expected = published[delivered : delivered + o[2]]
            assert [d.envelope.id for d in got] == expected  # new entries, in order, no dupes
            for d in got:
                assert d.envelope.id not in entry_of
                check(d, 1)
                holder[d.entry_id] = o[1]
                deliveries[d.entry_id] = 1
        elif kind == "ack":
            mine = sorted((e for e, c in holder.items() if c == o[1]), key=id_key)
            if mine:
                entry = mine[o[2] % len(mine)]
                await t.ack(stream, group, [entry])
                del holder[entry]
                acked.append(entry)
        elif kind == "claim":
            got = await t.claim_abandoned(stream, group, o[1], 0, o[2])
            oldest = sorted(holder, key=id_key)[: o[2]]
            assert [d.entry_id for d in got] == oldest
            for d in got:
                deliveries[d.entry_id] += 1
                check(d, deliveries[d.entry_id])
                holder[d.entry_id] = o[1]
        elif kind == "claim_young":
            assert await t.claim_abandoned(stream, group, o[1], BIG_IDLE_MS, 10) == []
        else:
            await t.trim(stream)
        s = await t.stats(stream, group)
        assert (s.pending, s.lag) == (len(holder), len(published) - len(entry_of))

    # drain: deliver the rest, then take over and acknowledge everything still pending
    while got := await t.consume([stream], group, "c0", 100, 0):
        for d in got:
            check(d, 1)
            holder[d.entry_id] = "c0"
    while got := await t.claim_abandoned(stream, group, "c1", 0, 7):
        for d in got:
            assert d.entry_id in holder  # only pending entries come back
            assert d.deliveries >= 2  # it was delivered before, so this is a redelivery
            del holder[d.entry_id]
            acked.append(d.entry_id)
        await t.ack(stream, group, [d.entry_id for d in got])
    assert holder == {}
    assert sorted(acked, key=id_key) == sorted(entry_of.values(), key=id_key)
    assert len(acked) == len(set(acked)) == len(published)  # each acknowledged exactly once
    assert set(entry_of) == set(published)
    s = await t.stats(stream, group)
    assert (s.pending, s.lag) == (0, 0)
    await t.trim(stream)
    if not is_redis(t):
        assert (await t.stats(stream, group)).length == 0


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(op, max_size=40))
def test_interleavings_embedded(ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(run_interleaving(EmbeddedTransport(), ops))


@pytest.mark.redis
@settings(max_examples=15, deadline=None)
@given(ops=st.lists(op, max_size=40))
def test_interleavings_redis(redis_server: str, ops: list[tuple[Any, ...]]) -> None:
    from workers.redis_transport import RedisTransport

    async def main() -> None:
        t = RedisTransport(redis_server, prefix=f"prop-{uuid.uuid4().hex}:")
        try:
            await run_interleaving(t, ops)
        finally:
            await t.close()

    asyncio.run(main())


# ---- Redis only ---------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_exact_trim_drops_exactly_the_acknowledged_prefix(redis_url: str) -> None:
    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url, approximate_trim=False)
    try:
        await t.ensure_group("s", "g")
        await publish_n(t, "s", 250)
        got = await t.consume(["s"], "g", "a", 250, 0)
        await t.ack("s", "g", [d.entry_id for d in got[:100]] + [got[120].entry_id])
        assert await t.trim("s") == 100
        assert (await t.stats("s", "g")).length == 150
        await t.ack("s", "g", [d.entry_id for d in got[100:]])
        assert await t.trim("s") == 150
        assert (await t.stats("s", "g")).length == 0
    finally:
        await t.close()


@pytest.mark.redis
async def test_redis_connection_errors_surface() -> None:
    import redis.exceptions

    from tests.conftest import _free_port
    from workers.redis_transport import RedisTransport

    t = RedisTransport(f"redis://127.0.0.1:{_free_port()}/0", pool_timeout_s=1)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await t.ping()
        with pytest.raises(redis.exceptions.ConnectionError):
            await t.publish("s", env(0))
    finally:
        await t.close()


# ---- Redis only: group commit and read coalescing ------------------------------------------


async def _calls(client: Any, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.redis
async def test_redis_concurrent_commits_share_one_script_call(redis_url: str) -> None:
    """Commits issued together go out as ONE call of the commit script, and every one of
    them applies."""
    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url)
    try:
        await t.ensure_group("out", "g")
        await t.ping()
        await t.commit(Commit(messages=[("out", env(-1))]))  # loads the script
        calls = await _calls(t._r, "evalsha")
        await asyncio.gather(*(t.commit(Commit(messages=[("out", env(i))],
                                               progress=[("r", f"k{i}", Progress(1, True))]))
                               for i in range(50)))
        assert await _calls(t._r, "evalsha") == calls + 1
        await t.consume(["out"], "g", "c", 1, 0)
        got = await t.consume(["out"], "g", "c", 100, 0)
        assert sorted((d.envelope for d in got), key=lambda e: e.payload["i"]) == [
            env(i) for i in range(50)]
        assert await t.get_progress("r", [f"k{i}" for i in range(50)]) == [Progress(1, True)] * 50
    finally:
        await t.close()


@pytest.mark.redis
async def test_redis_error_inside_a_group_commit_fails_only_its_commit(redis_url: str) -> None:
    """A command that fails inside the commit script (here: XADD to a key holding a
    string) fails its own commit; the commits it shared the call with apply and succeed."""
    import redis.exceptions

    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url)
    try:
        await t.ensure_group("out", "g")
        await t._r.set(t._stream_key("bad"), "not a stream")
        await t.commit(Commit(messages=[("out", env(-1))]))  # loads the script
        await t.consume(["out"], "g", "c", 1, 0)
        calls = await _calls(t._r, "evalsha")
        results = await asyncio.gather(
            t.commit(Commit(messages=[("out", env(0))])),
            t.commit(Commit(messages=[("bad", env(1))])),
            t.commit(Commit(messages=[("out", env(2))])),
            return_exceptions=True,
        )
        assert await _calls(t._r, "evalsha") == calls + 1  # they did share one call
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], redis.exceptions.ResponseError)
        assert "WRONGTYPE" in str(results[1])
        got = await t.consume(["out"], "g", "c", 10, 0)
        assert sorted((d.envelope for d in got), key=lambda e: e.payload["i"]) == [env(0), env(2)]
    finally:
        await t.close()


@pytest.mark.redis
async def test_redis_refused_group_commit_fails_every_commit(redis_url: str) -> None:
    """When Redis refuses the writes (here: out of memory), nothing applies and every
    commit in the batch gets the error."""
    import redis.exceptions

    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url)
    await t.ensure_group("out", "g")
    try:
        await t._r.config_set("maxmemory", "1")
        results = await asyncio.gather(
            *(t.commit(Commit(messages=[("out", env(i))], events=[("r", {"i": i})]))
              for i in range(3)),
            return_exceptions=True,
        )
    finally:
        await t._r.config_set("maxmemory", "0")
    try:
        assert all(isinstance(r, redis.exceptions.ResponseError) for r in results), results
        assert await t.consume(["out"], "g", "c", 10, 0) == []
        assert await t.read_events("r", None, 10, 0) == []
        await t.commit(Commit(messages=[("out", env(7))]))  # and the transport goes on
        assert [d.envelope for d in await t.consume(["out"], "g", "c", 10, 0)] == [env(7)]
    finally:
        await t.close()


@pytest.mark.redis
async def test_redis_lost_connection_fails_the_batch_then_reconnects(redis_url: str) -> None:
    import redis.exceptions

    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url)
    try:
        await t.ensure_group("out", "g")
        await t.publish("out", env(0))
        await t._r.client_kill_filter(_type="normal", skipme=True)

        async def publish_once() -> bool:
            try:
                await t.publish("out", env(1))
            except redis.exceptions.ConnectionError:
                return False  # the kill may be noticed only by the next write
            return True

        await eventually(publish_once, "a publish to go through after reconnecting")
        got = await t.consume(["out"], "g", "c", 10, 0)
        assert [d.envelope for d in got] == [env(0), env(1)]  # each applied exactly once
    finally:
        await t.close()


@pytest.mark.redis
async def test_redis_concurrent_reads_share_one_pipeline(redis_url: str) -> None:
    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url)
    try:
        await t.commit(Commit(progress=[("r", f"k{i}", Progress(i)) for i in range(20)]))
        hmget, exists = await _calls(t._r, "hmget"), await _calls(t._r, "exists")
        got = await asyncio.gather(*(t.get_progress("r", [f"k{i}"]) for i in range(20)))
        assert got == [[Progress(i)] for i in range(20)]
        # one HMGET for the run (all keys) and its cancel flag read once along with it
        assert await _calls(t._r, "hmget") == hmget + 1
        assert await _calls(t._r, "exists") == exists + 1
    finally:
        await t.close()


@pytest.mark.redis
async def test_redis_cancel_check_rides_along_with_progress(redis_url: str) -> None:
    """Within the staleness bound, is_cancelled answers from the flag read that came
    with get_progress (no round trip); a cancel flag seen set is believed at once."""
    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url, cancel_staleness_ms=3_600_000)  # never stale in this test
    try:
        await t.get_progress("r", ["k"])
        exists = await _calls(t._r, "exists")
        assert not await t.is_cancelled("r")
        assert await _calls(t._r, "exists") == exists  # answered without asking Redis
        await t.cancel("r")
        assert await t.is_cancelled("r")  # a local cancel is seen at once, cache or not
        await t.expire_run("r", 0)
        assert not await t.is_cancelled("r")
    finally:
        await t.close()


@pytest.mark.redis
async def test_redis_cancel_by_another_process_is_seen(redis_url: str) -> None:
    """With no staleness allowed, a cancel made elsewhere is seen by the very next check;
    with the default bound, it is seen once the bound has passed (never cached forever)."""
    from workers.redis_transport import RedisTransport

    exact = RedisTransport(redis_url, cancel_staleness_ms=0)
    default = RedisTransport(redis_url)
    other = RedisTransport(redis_url)
    try:
        for t in (exact, default):
            assert not await t.is_cancelled("r")
            await t.get_progress("r", ["k"])
        await other.cancel("r")
        assert await exact.is_cancelled("r")

        async def seen() -> bool:
            return await default.is_cancelled("r")

        await eventually(seen, "the cancel to be seen within the staleness bound")
    finally:
        for t in (exact, default, other):
            await t.close()


@pytest.mark.redis
async def test_redis_read_events_many_isolates_a_log_that_cannot_be_read(redis_url: str) -> None:
    """A run whose log holds an entry that is not JSON, or whose key is not a stream, gets
    its error as its value; the runs read in the same pipeline get their events."""
    import redis.exceptions

    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url)
    try:
        await t.commit(Commit(events=[("good", {"i": 0}), ("bad", {"i": 0})]))
        await t._r.xadd(t._run_key("bad", "events"), {"e": "{not json"})
        await t._r.set(t._run_key("wrong", "events"), "not a stream")
        got = await t.read_events_many({"good": None, "bad": None, "wrong": None}, 10)
        assert [e for _, e in got["good"]] == [{"i": 0}]  # type: ignore[union-attr]
        assert isinstance(got["bad"], ValueError)  # JSONDecodeError
        assert isinstance(got["wrong"], redis.exceptions.ResponseError)
        assert "WRONGTYPE" in str(got["wrong"])
    finally:
        await t.close()
