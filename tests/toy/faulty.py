"""Stage functions that fail on purpose (real stages, not mocks) for the fault tests."""

from __future__ import annotations

import os
import signal
import threading
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


def crash_on_poison_group(items: list[Any], ctx: StageContext) -> str:
    """A poison group: an aggregating stage whose firing kills its worker process every
    time, whichever instance owns the group's partition."""
    if "poison" in items:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"{ctx.stage}[{','.join(str(i) for i in items)}]"


def crash_once_on_poison_group(items: list[Any], ctx: StageContext) -> str:
    """Like `crash_on_poison_group`, but only the first firing dies: the file named by
    ALTO_TEST_CRASH_MARKER records that it did (a crash the group survives)."""
    marker = os.environ["ALTO_TEST_CRASH_MARKER"]
    if "poison" in items and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(ctx.run)
        os.kill(os.getpid(), signal.SIGKILL)
    return f"{ctx.stage}[{','.join(str(i) for i in items)}]"


BROKEN: set[str] = set()  # the words `fail_while_broken` fails on; a test "fixes" it


def fail_while_broken(value: Any, ctx: StageContext) -> str:
    """A stage with a bug a test can fix: words in BROKEN raise (then dead letters can be
    replayed after the fix)."""
    if value in BROKEN:
        raise ValueError(f"cannot process {value!r} (yet)")
    return str(value)


FLAKY: dict[str, int] = {}  # word -> how many more calls on it fail (`flaky`)
CALLS: dict[str, int] = {}  # word -> calls made on it (`flaky`, `fail_after_one_unit`)


def flaky(value: Any, ctx: StageContext) -> str:
    """Fails the first FLAKY[word] calls on a word, then works (a service that hiccups)."""
    word = str(value)
    CALLS[word] = CALLS.get(word, 0) + 1
    if FLAKY.get(word, 0) > 0:
        FLAKY[word] -= 1
        raise ConnectionError(f"service unavailable for {word!r}")
    return word


async def fail_after_one_unit(value: Any, ctx: StageContext) -> Any:
    """Publishes one unit, then fails: a retry could continue it differently."""
    word = str(value)
    CALLS[word] = CALLS.get(word, 0) + 1

    async def units() -> Any:
        yield f"{word}#0"
        raise ConnectionError("lost the service mid-answer")

    return units()


def hang_in_thread(value: Any, ctx: StageContext) -> str:
    """A plain function that never returns (a blocking client without a timeout): it runs
    in a thread nothing can stop. It first writes its input to the file named by
    ALTO_TEST_HANG_MARKER, so a test knows the call has started."""
    marker = os.environ["ALTO_TEST_HANG_MARKER"]
    with open(marker + ".tmp", "w") as f:
        f.write(str(value))
    os.replace(marker + ".tmp", marker)
    threading.Event().wait()
    raise AssertionError("unreachable")


def lone_surrogate(value: Any, ctx: StageContext) -> str:
    """Returns text no UTF-8 can hold (a high surrogate alone), as a tool decoding bytes
    with errors="surrogateescape" might."""
    return f"{value} \ud83d"


HANGING: set[str] = set()  # the words `fail_or_hang` never returns on


async def fail_or_hang(value: Any, ctx: StageContext) -> str:
    """Fails on words in BROKEN, never returns on words in HANGING (a fix that made things
    worse): a replayed run that only its deadline can end."""
    import asyncio

    if value in BROKEN:
        raise ValueError(f"cannot process {value!r} (yet)")
    if value in HANGING:
        await asyncio.get_running_loop().create_future()
    return str(value)
