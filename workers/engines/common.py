"""Pieces the real engines (openai, local, vllm) share: errors, option parsing, stop strings.

Why a module of its own: each engine reads its settings from the free-form options of an
`EngineSpec`, and a typo in a YAML file must fail at load with the engine and the option
named, the same way for every kind. Stop-string handling is shared because both the local
engine (which decodes token by token) and any future token-level engine must cut the text at
the first stop string *without* ever emitting a prefix of it that later turns out to be one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from orchestrator.engine import GenParams


class MissingSetting(ValueError):
    """An engine lacks a setting the environment may supply where it runs (a server URL
    from ALTO_OPENAI_BASE_URL): `alto check` warns instead of failing, since a CI machine
    need not have it."""


class EngineError(RuntimeError):
    """An engine could not produce (the rest of) a generation; the message says why."""


class EngineConnectError(EngineError):
    """The upstream could not be reached, after every allowed retry; nothing was sent."""


class EngineHTTPError(EngineError):
    """The upstream answered with an HTTP error status before streaming anything."""

    def __init__(self, message: str, *, status: int, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class EngineStreamError(EngineError):
    """A stream broke after it had started; it is never re-sent (its output was partly seen)."""


class Options:
    """Typed access to an engine's options that remembers which keys were read.

    `check_unknown` then rejects every key no accessor asked for, so a misspelt option is an
    error rather than a silently ignored setting.
    """

    def __init__(self, engine: str, options: dict[str, Any]) -> None:
        self.engine = engine
        self._opts = dict(options)
        self._known: set[str] = set()

    def has(self, key: str) -> bool:
        self._known.add(key)
        return self._opts.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        self._known.add(key)
        value = self._opts.get(key)
        return default if value is None else value

    def _bad(self, key: str, what: str, value: Any) -> ValueError:
        return ValueError(f"{self.engine} engine option {key!r} must be {what}, got {value!r}")

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key, default)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def choice(self, key: str, choices: Iterable[str], default: str) -> str:
        allowed = tuple(choices)
        value = self.raw(key, default)
        if value not in allowed:
            raise self._bad(key, f"one of {list(allowed)}", value)
        return str(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise self._bad(key, "true or false", value)

    def integer(self, key: str, default: int, *, minimum: int | None = None) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool):
            raise self._bad(key, "an integer", value)
        try:
            out = int(value)
        except (TypeError, ValueError):
            raise self._bad(key, "an integer", value) from None
        if isinstance(value, float) and value != out:
            raise self._bad(key, "an integer", value)
        if minimum is not None and out < minimum:
            raise self._bad(key, f"an integer >= {minimum}", value)
        return out

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool):
            raise self._bad(key, "a number", value)
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise self._bad(key, "a number", value) from None
        if not math.isfinite(out) or out < minimum:
            raise self._bad(key, f"a finite number >= {minimum}", value)
        return out

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.raw(key, {})
        if not isinstance(value, dict):
            raise self._bad(key, "a mapping", value)
        return dict(value)

    def unread(self) -> dict[str, Any]:
        """Options no accessor has asked for (for engines that pass the rest through)."""
        return {k: v for k, v in self._opts.items() if k not in self._known}

    def check_unknown(self) -> None:
        unknown = sorted(self.unread())
        if unknown:
            raise ValueError(
                f"{self.engine} engine: unknown option(s) {unknown}; "
                f"known options: {sorted(self._known)}"
            )


def chat_messages(prompt: str, params: GenParams) -> list[dict[str, str]]:
    """The chat form of a prompt: the client's conversation where it sent one, else an
    optional system message, then the user's turn."""
    if params.messages:
        return [dict(m) for m in params.messages]
    messages = [{"role": "system", "content": params.system}] if params.system else []
    messages.append({"role": "user", "content": prompt})
    return messages


def plain_prompt(prompt: str, params: GenParams) -> str:
    """The completion form of a prompt; matches the sim engine's convention for `system`."""
    return f"{params.system}\n\n{prompt}" if params.system else prompt


class StopMatcher:
    """Cuts a streamed text at the earliest occurrence of any stop string.

    Text is fed in arbitrary pieces (tokens). `feed` returns the part that is certainly
    before any stop string; a tail that could still grow into one is held back until later
    pieces decide it. The result equals cutting the whole text at its earliest stop string,
    however the text was split (a short stop completing first does not win over a longer one
    that started earlier). `stopped` turns true once the cut is known; `flush` ends the
    stream and returns what was held back (cut, if it holds a stop).
    """

    def __init__(self, stops: Iterable[str] | None) -> None:
        self._stops = [s for s in (stops or []) if s]
        self._hold = max((len(s) for s in self._stops), default=0)
        self._buf = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        self._buf += piece
        match = self._earliest_match()
        partial = self._earliest_partial()
        if match is not None and (partial is None or partial >= match):
            self.stopped = True
            out, self._buf = self._buf[:match], ""
            return out
        keep_from = len(self._buf) if partial is None else partial
        out, self._buf = self._buf[:keep_from], self._buf[keep_from:]
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        match = self._earliest_match()
        out = self._buf if match is None else self._buf[:match]
        self.stopped = match is not None
        self._buf = ""
        return out

    def _earliest_match(self) -> int | None:
        hits = [i for i in (self._buf.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _earliest_partial(self) -> int | None:
        """Start of the longest tail of the buffer that is a proper prefix of a stop."""
        buf = self._buf
        for n in range(min(self._hold - 1, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(len(s) > n and s.startswith(tail) for s in self._stops):
                return len(buf) - n
        return None
