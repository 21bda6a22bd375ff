"""The engine interface every LM backend implements (sim, openai, local, vllm).

An engine turns a prompt into a stream of text deltas. Cancellation is the asyncio
kind: the runner cancels the task iterating `generate` (or closes the iterator), and
the engine must stop work for that request (abort the upstream call / free its slot).
`capacity` is how many sequences it serves at once; runners never pull more work than
that, so queueing happens in the transport where every instance can see it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(slots=True)
class GenParams:
    max_tokens: int = 256
    temperature: float = 0.0
    stop: list[str] | None = None
    system: str | None = None
    # nucleus sampling and a sampling seed, where a client asked for them (the gateway's
    # engine models); None leaves the engine's own defaults
    top_p: float | None = None
    seed: int | None = None
    # a whole conversation ({"role", "content"} dicts, system turns included) for engines
    # that take chat messages; `prompt` is then its flat form, for engines that take text
    messages: list[dict[str, str]] | None = None
    # the prompt exactly as written, without the engine's chat template: a `/v1/completions`
    # request (what OpenAI's and vLLM's completions API do); else engines that chat, chat
    raw: bool = False
    # free-form routing/statistics hints (prompt class, stage name, run id)
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Delta:
    """A piece of generated text. The last delta of a stream carries the usage."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None


@runtime_checkable
class Engine(Protocol):
    name: str
    capacity: int

    async def start(self) -> None:
        """Load weights / open connections; raise with a clear message on failure."""

    def generate(self, prompt: str, params: GenParams) -> AsyncIterator[Delta]: ...

    async def aclose(self) -> None: ...
