"""Stage functions that fail on purpose (real stages, not mocks) for the fault tests."""

from __future__ import annotations

import os
import signal
from typing import Any

from orchestrator.template import StageContext


def fail_on_bad(value: Any, ctx: StageContext) -> str:
    """An engine error on one input: the word "bad" raises."""
    if value == "bad":
        raise ValueError(f"cannot process {value!r}")
    return str(value)


def crash_on_poison(value: Any, ctx: StageContext) -> str:
    """A poison input: the word "poison" kills the whole worker process (like an OOM kill
    or a segfault in an engine), every time it is delivered."""
    if value == "poison":
        os.kill(os.getpid(), signal.SIGKILL)
    return str(value)
