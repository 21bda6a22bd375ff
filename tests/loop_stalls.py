"""Opt-in flake hunt: make every event loop in the test process stall now and then, as a
loaded CI machine does, to find tests whose outcome depends on the loop never pausing.

`ALTO_TEST_LOOP_STALL_MS=300 ./scripts/test.sh` blocks each loop (`time.sleep`) for 50-100%
of that many milliseconds, every 0.3-1.5 s. A test that fails under it either reads state
kept alive by heartbeats only once (poll it with `tests.waiting.eventually`), or runs
several runners on one loop with bounds below the stall (a stalled process is a dead one to
its peers: see CONFIG_LIVE in tests/test_recovery.py). Off unless the variable is set.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import weakref

ENV = "ALTO_TEST_LOOP_STALL_MS"


def install() -> None:
    stall_ms = int(os.environ.get(ENV, "0") or 0)
    if stall_ms <= 0:
        return
    run_forever = asyncio.BaseEventLoop.run_forever
    chained: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()  # not ids: reused

    def stalling_run_forever(self: asyncio.BaseEventLoop) -> None:
        # one chain of stalls per loop: pytest-asyncio enters run_forever many times
        if self not in chained:
            chained.add(self)

            def stall() -> None:
                time.sleep(stall_ms / 1000 * random.uniform(0.5, 1.0))
                self.call_later(random.uniform(0.3, 1.5), stall)

            self.call_later(random.uniform(0.05, 0.5), stall)
        run_forever(self)

    asyncio.BaseEventLoop.run_forever = stalling_run_forever  # type: ignore[method-assign]
