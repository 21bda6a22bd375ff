"""The gateway's supervisor of runs no client follows (app/supervisor.py), on a real
embedded transport with no workers (the runs never progress on their own), through a
transport that fails some reads as a restarting Redis does: one failed read used to end
the per-run task that held the run's slot and enforced its deadline."""

from __future__ import annotations

from typing import Any

from app.supervisor import RunSupervisor, Watched
from orchestrator.embedded import EmbeddedTransport
from orchestrator.spec import PipelineSpec, parse_pipeline
from orchestrator.transport import Commit
from tests.waiting import eventually
from workers.client import fail_run, start_run


def _spec() -> PipelineSpec:
    return parse_pipeline({"name": "idle", "stages": [
        {"name": "s", "kind": "tool", "function": "tests.toy.stages:upper"}]})


class FlakyTransport(EmbeddedTransport):
    """Fails the first `n` reads of run logs and of memberships (ConnectionError)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n
        self.failed = 0
        self.reads = 0

    def _maybe_fail(self) -> None:
        if self.left > 0:
            self.left -= 1
            self.failed += 1
            raise ConnectionError("the bus is restarting")

    async def read_events(self, *args: Any, **kw: Any) -> Any:
        self.reads += 1
        self._maybe_fail()
        return await super().read_events(*args, **kw)

    async def members(self, group: str) -> Any:
        self._maybe_fail()
        return await super().members(group)


class Slot:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def _supervisor(t: EmbeddedTransport, ended: list[Watched]) -> RunSupervisor:
    async def fail(run: str, code: str, message: str) -> None:
        await fail_run(t, run, code, message, 60)

    async def expire(run: str) -> None:
        await t.expire_run(run, 60)

    return RunSupervisor(t, fail, expire, ended.append, tick_s=0.01)


async def _codes(t: EmbeddedTransport, run: str) -> list[str]:
    return [ev.get("code") for _, ev in await EmbeddedTransport.read_events(t, run, None, 100, 0)
            if ev.get("type") == "error"]


async def test_failed_reads_do_not_end_supervision_of_the_deadline() -> None:
    t = FlakyTransport(0)
    ended: list[Watched] = []
    sup = _supervisor(t, ended)
    run = await start_run(t, _spec(), "x")
    slot = Slot()
    t.left = 5  # every read fails for a while, from the first check on
    sup.watch(_spec(), run, deadline_s=0.2, total_s=0.2, slot=slot, account=True)  # type: ignore[arg-type]
    await eventually(lambda: slot.released == 1, timeout=30)
    assert t.failed == 5 and await _codes(t, run) == ["deadline_exceeded"]
    assert [(w.run, w.outcome) for w in ended] == [(run, "timeout")]
    assert sup.runs == {}


async def test_an_unfollowed_run_is_cancelled_after_the_grace_period_despite_errors() -> None:
    t = FlakyTransport(0)
    ended: list[Watched] = []
    sup = _supervisor(t, ended)
    run = await start_run(t, _spec(), "x")
    slot = Slot()
    t.left = 3
    sup.watch(_spec(), run, deadline_s=300, total_s=300, grace_s=0.05, slot=slot)  # type: ignore[arg-type]
    await eventually(lambda: slot.released == 1, timeout=30)
    assert await _codes(t, run) == ["cancelled"]
    assert ended == []  # not a replayed run: its outcome was counted when it detached


async def test_a_followed_run_keeps_its_slot_until_it_ends() -> None:
    t = FlakyTransport(0)
    sup = _supervisor(t, [])
    run = await start_run(t, _spec(), "x")
    await t.heartbeat("watch:" + run, "client", {}, 60_000)  # a client resumed it
    slot, again = Slot(), Slot()
    sup.watch(_spec(), run, deadline_s=300, total_s=300, grace_s=0.0, slot=slot)  # type: ignore[arg-type]
    sup.watch(_spec(), run, deadline_s=300, total_s=300, grace_s=0.0, slot=again)  # type: ignore[arg-type]
    assert again.released == 1  # one slot per run: the second one goes back at once
    reads = t.reads
    await eventually(lambda: t.reads >= reads + 5)  # past its grace, checked 5 times more
    assert slot.released == 0 and run in sup.runs
    await fail_run(t, run, "cancelled", "the client cancelled it", 60)
    await eventually(lambda: slot.released == 1, timeout=30)
    assert await _codes(t, run) == ["cancelled"]


async def test_close_gives_the_slots_back_and_counts_nothing() -> None:
    t = EmbeddedTransport()
    ended: list[Watched] = []
    sup = _supervisor(t, ended)
    run = await start_run(t, _spec(), "x")
    slot = Slot()
    sup.watch(_spec(), run, deadline_s=300, total_s=300, slot=slot, account=True)  # type: ignore[arg-type]
    await sup.close()
    assert slot.released == 1 and ended == [] and sup.runs == {}


class UnreadableLog(EmbeddedTransport):
    """A run log whose entries cannot be read (not the bus being down: a bad entry)."""

    async def read_events(self, *args: Any, **kw: Any) -> Any:
        raise ValueError("an entry that cannot be decoded")


async def test_a_log_that_cannot_be_read_is_still_failed_at_its_deadline_then_let_go() -> None:
    t = UnreadableLog()
    ended: list[Watched] = []

    async def fail(run: str, code: str, message: str) -> None:
        await fail_run(t, run, code, message, 60)

    async def expire(run: str) -> None:
        await t.expire_run(run, 60)

    sup = RunSupervisor(t, fail, expire, ended.append, tick_s=0.01, give_up_s=0.2)
    run = await start_run(t, _spec(), "x")
    slot = Slot()
    sup.watch(_spec(), run, deadline_s=0.05, total_s=0.05, slot=slot, account=True)  # type: ignore[arg-type]
    await eventually(lambda: slot.released == 1, timeout=30)
    assert await _codes(t, run) == ["deadline_exceeded"]  # written though never read back
    assert [(w.run, w.outcome) for w in ended] == [(run, "timeout")]  # counted as a timeout


async def test_a_replayed_run_is_watched_by_the_supervisor_and_gets_no_grace_period() -> None:
    """A client opening a replayed run's stream and dropping it asks for a grace period:
    the replay must not be cancelled for it, here or by another gateway's reaper (which
    looks for watchers)."""
    t = EmbeddedTransport()
    sup = _supervisor(t, [])
    run = await start_run(t, _spec(), "x")
    sup.watch(_spec(), run, deadline_s=300, total_s=300, slot=Slot(), account=True)  # type: ignore[arg-type]
    sup.watch(_spec(), run, deadline_s=300, total_s=300, grace_s=0.0)  # a viewer dropped
    await eventually(lambda: t.members("watch:" + run))  # the supervisor is its watcher
    assert sup.runs[run].grace_at is None and await _codes(t, run) == []
    await sup.close()
    assert await t.members("watch:" + run) == {}  # and leaves with the gateway


async def test_watching_again_keeps_the_earlier_deadline() -> None:
    t = EmbeddedTransport()
    sup = _supervisor(t, [])
    run = await start_run(t, _spec(), "x")
    sup.watch(_spec(), run, deadline_s=300, total_s=300, slot=Slot())  # type: ignore[arg-type]
    first = sup.runs[run].deadline_at
    sup.watch(_spec(), run, deadline_s=600, total_s=600)
    assert sup.runs[run].deadline_at == first
    sup.watch(_spec(), run, deadline_s=1, total_s=1)
    assert sup.runs[run].deadline_at < first
    await sup.close()


async def test_the_supervisor_stops_watching_a_replayed_run_when_it_ends() -> None:
    t = EmbeddedTransport()
    sup = _supervisor(t, [])
    run = await start_run(t, _spec(), "x")
    slot = Slot()
    sup.watch(_spec(), run, deadline_s=300, total_s=300, slot=slot, account=True)  # type: ignore[arg-type]
    await eventually(lambda: t.members("watch:" + run))
    await fail_run(t, run, "cancelled", "an operator cancelled it", 60)
    await eventually(lambda: slot.released == 1)
    assert await t.members("watch:" + run) == {}


class CountingReads(EmbeddedTransport):
    """Records the runs each bulk read asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.bulk: list[set[str]] = []
        self.counts: list[int] = []

    async def read_events_many(self, after: Any, count: int) -> Any:
        self.bulk.append(set(after))
        self.counts.append(count)
        return await super().read_events_many(after, count)


async def test_one_sweep_reads_every_watched_run_in_one_bulk_read() -> None:
    """A tick used to cost a round trip per watched run (256 idle runs: ~17% of a gateway
    core on Redis); now all of them are read together."""
    t = CountingReads()
    sup = RunSupervisor(t, _noop_fail, _noop_expire, lambda w: None, tick_s=3600)
    runs = [await start_run(t, _spec(), f"x{i}") for i in range(3)]
    for run in runs:
        sup.watch(_spec(), run, deadline_s=300, total_s=300, slot=Slot())  # type: ignore[arg-type]
    await sup.sweep()
    assert t.bulk == [set(runs)]
    await fail_run(t, runs[1], "cancelled", "an operator cancelled it", 60)
    await sup.sweep()  # sees runs[1] end
    await sup.sweep()  # reads only the runs still watched
    assert t.bulk[-1] == {runs[0], runs[2]} and set(sup.runs) == {runs[0], runs[2]}
    await sup.close()


async def test_a_long_log_is_read_over_several_sweeps(monkeypatch: Any) -> None:
    """A run's reads per tick are capped (a huge log must not hold up every other run's
    check); what is left is read at the next ticks, and its end is still seen."""
    import app.supervisor as supervisor

    monkeypatch.setattr(supervisor, "EVENTS_PER_READ", 2)
    monkeypatch.setattr(supervisor, "READS_PER_TICK", 2)
    t = EmbeddedTransport()
    sup = RunSupervisor(t, _noop_fail, _noop_expire, lambda w: None, tick_s=3600)
    run = await start_run(t, _spec(), "x")
    for i in range(8):  # events a client would see, none of them an end
        await t.commit(Commit(events=[(run, {"type": "note", "i": i})]))
    await fail_run(t, run, "cancelled", "an operator cancelled it", 60)
    total = len(await EmbeddedTransport.read_events(t, run, None, 100, 0))
    slot = Slot()
    sup.watch(_spec(), run, deadline_s=300, total_s=300, slot=slot)  # type: ignore[arg-type]
    sweeps = 0
    for _ in range(10):
        if run not in sup.runs:
            break
        await sup.sweep()
        sweeps += 1
    await sup.close()
    assert total == 10 and sweeps == 3  # four events a tick: 4, 4, then 2 with the end
    assert slot.released == 1


async def test_many_runs_read_at_once_get_smaller_batches(monkeypatch: Any) -> None:
    """One bulk read returns at most ENTRIES_PER_READ events in all (256 runs x 512
    events took seconds to decode in one loop turn), each run's batch at least 16."""
    import app.supervisor as supervisor

    monkeypatch.setattr(supervisor, "ENTRIES_PER_READ", 64)
    t = CountingReads()
    sup = RunSupervisor(t, _noop_fail, _noop_expire, lambda w: None, tick_s=3600)
    for n, want in ((1, 64), (2, 32), (8, 16)):
        for _ in range(n - len(sup.runs)):
            sup.watch(_spec(), await start_run(t, _spec(), "x"), deadline_s=300, total_s=300)
        await sup.sweep()
        assert t.counts[-1] == want, (n, t.counts)
    await sup.close()


class BrokenBulkRead(EmbeddedTransport):
    """A bulk read that fails as a whole, not as the bus being down (a reply out of
    shape), `n` times."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    async def read_events_many(self, after: Any, count: int) -> Any:
        if self.left > 0:
            self.left -= 1
            raise RuntimeError("a reply out of shape")
        return await super().read_events_many(after, count)


async def test_a_failed_bulk_read_neither_ends_supervision_nor_skips_deadlines() -> None:
    """Such an error used to escape the sweep and end the supervisor's task for good:
    no deadline enforced, no slot given back, until another run was watched."""
    t = BrokenBulkRead(1_000_000)
    ended: list[Watched] = []
    sup = _supervisor(t, ended)
    run = await start_run(t, _spec(), "x")
    slot = Slot()
    sup.watch(_spec(), run, deadline_s=0.05, total_s=0.05, slot=slot, account=True)  # type: ignore[arg-type]
    async def failed() -> bool:
        return "deadline_exceeded" in await _codes(t, run)

    await eventually(failed, timeout=30)
    t.left = 0  # the log is readable again: the error written is seen, the run ends
    await eventually(lambda: slot.released == 1, timeout=30)
    assert [(w.run, w.outcome) for w in ended] == [(run, "timeout")] and sup.runs == {}


async def test_one_unreadable_log_does_not_keep_another_run_from_ending() -> None:
    t = OneUnreadableLog()
    sup = RunSupervisor(t, _noop_fail, _noop_expire, lambda w: None, tick_s=3600)
    bad, good = [await start_run(t, _spec(), "x") for _ in range(2)]
    t.unreadable = bad
    slots = {bad: Slot(), good: Slot()}
    for run in (bad, good):
        sup.watch(_spec(), run, deadline_s=300, total_s=300, slot=slots[run])  # type: ignore[arg-type]
    await fail_run(t, good, "cancelled", "an operator cancelled it", 60)
    await sup.sweep()
    assert set(sup.runs) == {bad} and slots[good].released == 1 and slots[bad].released == 0
    await sup.close()


class OneUnreadableLog(EmbeddedTransport):
    unreadable = ""

    async def read_events(self, run: str, *args: Any, **kw: Any) -> Any:
        if run == self.unreadable:
            raise ValueError("an entry that cannot be decoded")
        return await super().read_events(run, *args, **kw)



async def _noop_fail(run: str, code: str, message: str) -> None:
    raise AssertionError(f"{run} was not meant to be failed ({code})")


async def _noop_expire(run: str) -> None:
    pass
