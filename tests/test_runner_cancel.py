"""A runner told to stop (its task cancelled) stops, even when a slot frees up in the same
loop turn. On Python 3.11, `asyncio.wait_for` returns normally in that case and the
cancellation is lost: a takeover test hung in CI that way. The runner waits with
`asyncio.timeout` instead (`workers.runner._wait_event`)."""

from __future__ import annotations

import asyncio

import pytest

from workers.runner import _wait_event


async def test_cancel_in_the_turn_the_event_is_set_is_not_swallowed() -> None:
    event = asyncio.Event()
    waiting = asyncio.Event()

    async def loop() -> None:  # the shape of StageRunner.run around _wait_slot
        while True:
            waiting.set()
            await _wait_event(event, 0.5)
            event.clear()

    task = asyncio.create_task(loop())
    await waiting.wait()  # it has reached its wait
    event.set()
    task.cancel()  # same turn as the event
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.cancelled()


async def test_wait_event_returns_on_set_and_on_timeout() -> None:
    event = asyncio.Event()
    event.set()
    await asyncio.wait_for(_wait_event(event, 60), 5)  # set: returns at once
    await asyncio.wait_for(_wait_event(asyncio.Event(), 0.01), 5)  # unset: times out quietly
