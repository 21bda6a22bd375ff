"""Instant stage functions for the overhead benchmark: they return at once, so whatever time
a message spends between stages is the runtime's (transport, bookkeeping), not the stage's.

`stamp` appends (stage, t_in_ns, t_out_ns) to the payload: t_in is taken on entry, t_out as
the function's last act, so for consecutive stages k and k+1 of one unit,
``t_in[k+1] - t_out[k]`` is exactly "from the moment stage k has its output until stage
k+1 starts on it": framing, the publishing commit, Redis, the consumer's read, its
de-duplication and cancellation checks. All processes run on one machine and read the
same CLOCK_REALTIME, so differences across processes are meaningful.
"""

from __future__ import annotations

import json
import time
from typing import Any

from orchestrator.template import StageContext


def _history(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            return {"x": value, "h": []}
        return dict(v) if isinstance(v, dict) else {"x": v, "h": []}
    return {"x": value, "h": []}


async def stamp(value: Any, ctx: StageContext) -> dict[str, Any]:
    """Identity on the payload plus one timestamp record; async so no thread hop is paid."""
    t_in = time.time_ns()
    v = _history(value)
    v["h"] = [*v.get("h", []), [ctx.stage, t_in, time.time_ns()]]
    return v


def stamp_sync(value: Any, ctx: StageContext) -> dict[str, Any]:
    """The same as a plain function: the runtime runs those in a worker thread."""
    t_in = time.time_ns()
    v = _history(value)
    v["h"] = [*v.get("h", []), [ctx.stage, t_in, time.time_ns()]]
    return v
