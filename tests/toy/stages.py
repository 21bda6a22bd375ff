"""Deterministic tool/reduce functions for runtime tests (real stages, not mocks)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from orchestrator.template import StageContext


async def hang(value: Any, ctx: StageContext) -> str:
    """A call that never returns (an engine or service that stopped answering)."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


def split_words(value: Any, ctx: StageContext) -> list[str]:
    return str(value).split()


def upper(value: Any, ctx: StageContext) -> str:
    return str(value).upper()


def fanout(value: Any, ctx: StageContext) -> list[str]:
    """'word:3' -> three units 'word#0'..'word#2' (the count drives random fan-out)."""
    word, _, n = str(value).partition(":")
    return [f"{word}#{i}" for i in range(int(n or 1))]


def join(items: list[Any], ctx: StageContext) -> str:
    return " ".join(str(i) for i in items)


def count(items: list[Any], ctx: StageContext) -> dict[str, Any]:
    return {"n": len(items), "items": [str(i) for i in items]}


def hash_fanout(value: Any, ctx: StageContext) -> list[str]:
    """0..max units, a deterministic function of the input; max is encoded in the stage
    name (`...x<max>`), so random test pipelines get random but reproducible fan-out."""
    import zlib

    top = int(ctx.stage.rpartition("x")[2])
    k = zlib.crc32(f"{ctx.stage}|{value}".encode()) % (top + 1)
    return [f"{value}.{ctx.stage}{i}" for i in range(k)]


def collect(items: list[Any], ctx: StageContext) -> str:
    return f"{ctx.stage}[{','.join(str(i) for i in items)}]"


GATES: dict[str, Any] = {}


async def gated(value: Any, ctx: StageContext) -> str:
    """Pass the first word at once; hold the others until the test opens the run's gate.
    Lets a test crash an aggregator while it provably holds part of a group."""
    if value != ctx.values["input"].split()[0]:
        await GATES[ctx.run].wait()
    return str(value)


def repeat(value: Any, ctx: StageContext) -> list[str]:
    """The word `times` times (`times` from the stage's params, default 1)."""
    return [str(value)] * int(ctx.params.get("times", 1))


def meddle(value: Any, ctx: StageContext) -> list[Any]:
    """Appends to a list in its params (which it should not do) and returns it."""
    seen = ctx.params["seen"]
    seen.append(str(value))
    return list(seen)


def overwrite(value: Any, ctx: StageContext) -> Any:
    """Sets a key of its params and returns them whole (as docs/PIPELINES.md allows)."""
    ctx.params["last"] = str(value)
    return ctx.params


BLOCKED = threading.Event()  # `block` returns once a test sets it


def block(value: Any, ctx: StageContext) -> str:
    """A plain function that hangs (a blocking client without a timeout) until released."""
    BLOCKED.wait()
    return str(value)


def score(value: Any, ctx: StageContext) -> dict[str, Any]:
    """A unit JSON cannot spell strictly: NaN and infinities (a model's score can be)."""
    return {"word": str(value), "score": float("nan"), "high": float("inf"), "low": -float("inf")}


def not_json(value: Any, ctx: StageContext) -> Any:
    """A unit JSON cannot hold at all."""
    return {"words": {str(value)}}


def repetitive(prompt: str, params: Any) -> str:
    """A sim responder that writes a JSON list repeating itself, as a small model caught in
    a loop does: one real item, then the same one again and again, then two more."""
    items = ["a is 1.", *["b is 2."] * 30, "c is 3.", "d is 4."]
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


def many(value: Any, ctx: StageContext) -> list[str]:
    """Forty items, two of each (a tool's list with duplicates)."""
    return [f"item {i // 2}" for i in range(40)]


NOT_JSON_CALLS: list[str] = []  # one entry per call of `streams_not_json`


async def streams_not_json(value: Any, ctx: StageContext) -> Any:
    """Streams one unit JSON cannot hold (a deterministic bug: retrying cannot help)."""
    NOT_JSON_CALLS.append(str(value))
    yield {"words": {str(value)}}


def reordered(value: Any, ctx: StageContext) -> list[Any]:
    """Equal dicts with their keys in another order, and repeated strings."""
    return [{"a": 1, "b": 2}, {"b": 2, "a": 1}, "x", "x", "y"]
