"""Stage functions and responders that import but that the runtime cannot use, for `alto
check` (each one fails every call it gets), and some unusual ones that it can."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from orchestrator.template import StageContext


def one_arg(value: Any) -> str:
    """Forgets `ctx`: the runtime calls fn(value, ctx)."""
    return str(value)


def words(value: Any, ctx: StageContext) -> Iterator[str]:
    """A plain generator: the runtime would take the generator object as the output."""
    yield from str(value).split()


def responder_one_arg(prompt: str) -> str:
    return prompt


async def async_responder(prompt: str, params: Any) -> str:
    return prompt


async def async_words(value: Any, ctx: StageContext) -> AsyncIterator[str]:
    """Streams its units: supported."""
    for word in str(value).split():
        yield word


def with_default(value: Any, ctx: StageContext, sep: str = " ") -> list[str]:
    return str(value).split(sep)


def star_args(*args: Any) -> str:
    return str(args[0])


class Splitter:
    """A callable object: what is checked is how its `__call__` is called."""

    def __call__(self, value: Any, ctx: StageContext) -> list[str]:
        return str(value).split()


class GeneratingSplitter:
    def __call__(self, value: Any, ctx: StageContext) -> Iterator[str]:
        yield from str(value).split()


splitter = Splitter()
generating_splitter = GeneratingSplitter()
