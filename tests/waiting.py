"""One way for tests to wait: poll a condition until it holds, with a deadline.

Used only where nothing can be awaited directly (another process's state, a runner's
internal progress); the poll interval never decides an outcome, the deadline only fails it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0, every: float = 0.01
) -> None:
    async def poll() -> None:
        while True:
            ok = condition()
            if inspect.isawaitable(ok):
                ok = await ok
            if ok:
                return
            await asyncio.sleep(every)

    await asyncio.wait_for(poll(), timeout)


def eventually_sync(condition: Callable[[], bool], timeout: float = 30.0, every: float = 0.01) -> bool:
    """The same for code that cannot await (fixtures polling a server process or thread).
    Returns whether the condition held before the deadline."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


async def loop_turn() -> None:
    """Let every task that is ready run once before going on: the turn a real producer's
    I/O gives the loop. It waits on the loop's own scheduling (a future resolved by the
    next iteration), never on time."""
    loop = asyncio.get_running_loop()
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn
