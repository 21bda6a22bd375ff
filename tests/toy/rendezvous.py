"""Stages that show what the runtime does with calls in flight (real stages, not mocks):
`meet` waits until `target` calls are in progress together (or `patience_s` passes), so the
peak it records is exactly how much parallelism the runtime gave it; `hold` runs until the
test releases it (a long call), counting how often it was started."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from orchestrator.template import StageContext


class Rendezvous:
    def __init__(self) -> None:
        self.reset(1, 0.0)

    def reset(self, target: int, patience_s: float) -> None:
        self.target = target
        self.patience_s = patience_s
        self.active = 0
        self.peak = 0
        self.calls = 0
        self.together = asyncio.Event()
        self.release = asyncio.Event()  # what `hold` waits for


RENDEZVOUS = Rendezvous()


async def _attend(until: asyncio.Event) -> None:
    """Count this call in, wait for `until` (or `patience_s`), count it out."""
    r = RENDEZVOUS
    r.calls += 1
    r.active += 1
    r.peak = max(r.peak, r.active)
    if r.active >= r.target:
        r.together.set()
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(r.patience_s):
                await until.wait()
    finally:
        r.active -= 1


async def meet(value: Any, ctx: StageContext) -> str:
    """Waits until `target` calls are in progress together."""
    await _attend(RENDEZVOUS.together)
    return f"met:{value}"


async def hold(value: Any, ctx: StageContext) -> str:
    """A long call: runs until the test releases it (or `patience_s` passes)."""
    await _attend(RENDEZVOUS.release)
    return f"held:{value}"


async def hold_all(items: list[Any], ctx: StageContext) -> str:
    """`hold` for an aggregating stage: a group's firing that runs until released."""
    await _attend(RENDEZVOUS.release)
    return f"held:{','.join(str(i) for i in items)}"
