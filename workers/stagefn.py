"""Turns a stage spec into something that produces units: an engine call for `lm`
stages (its token stream framed as it arrives), a Python callable for `tool`/`reduce`.

Both kinds look the same to the runner: an async iterator of units, so streaming and
barrier mode, retries and credit accounting are written once.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import inspect
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orchestrator.engine import Delta, Engine, GenParams
from orchestrator.envelope import dumps_json, loads_json
from orchestrator.framing import frame_value, make_framer
from orchestrator.lint import call_errors
from orchestrator.spec import PipelineSpec, SpecError, StageSpec
from orchestrator.template import StageContext, as_text, render

StopCheck = Callable[[], Awaitable[bool]]
CANCEL_POLL_S = 0.05  # how often a running LM call looks at its run's cancel flag
TOOL_CANCEL_POLL_S = 0.2  # how often a tool/reduce call still running looks at it
DEFAULT_SLOTS = 8  # calls at once of a stage without an engine and without `concurrency`


_running_lock = threading.Lock()
_running: Counter[str] = Counter()  # stage -> its plain-function calls running in threads


def running_plain_calls() -> dict[str, int]:
    """Per stage, the calls of plain functions still running in their threads (those of
    this process's stage pools). Python joins pool threads at exit, so a call that hangs
    keeps its process alive: the CLI asks this once its runtime has stopped, and exits
    without waiting for them (`app.cli`)."""
    with _running_lock:
        return {k: v for k, v in _running.items() if v > 0}


def _counted(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    with _running_lock:
        _running[stage] += 1
    try:
        return fn(*args)
    finally:
        with _running_lock:
            _running[stage] -= 1


def resolve(path: str, *, stage: str, field_name: str) -> Callable[..., Any]:
    """Import 'package.module:attr'; a failure names the stage and field, like a spec error."""
    module, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"cannot import {path!r}: {exc}", stage=stage, field=field_name) from None
    if not callable(obj):
        raise SpecError(f"{path!r} is not callable", stage=stage, field=field_name)
    return obj


class StageTimeout(Exception):
    """A call ran past its stage's `timeout_s`. The run fails with this `code`: a call
    that hangs on a live worker is otherwise never re-run (its entry is kept fresh) and,
    with the `local` and `sim` engines or a tool, never ends on its own."""

    code = "stage_timeout"


@dataclass
class CallStats:
    """What one call cost; the runner turns it into metrics and scheduling statistics."""

    prompt: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_unit_s: float | None = None
    # the run's cancel cut this call short (its cancel watch cancelled it): whatever the
    # call raises then is no failure of the run (`workers.runner.CallCut`)
    cut: bool = False
    # whether the unit being yielded now came while the call still runs (publish it at once)
    # or once it is over (it can share the call's final commit: one commit instead of two)
    incremental: bool = False


class StageFunction:
    """The callable behind one stage."""

    def __init__(self, spec: PipelineSpec, stage: StageSpec, engine: Engine | None = None):
        self.spec = spec
        self.stage = stage
        self.engine = engine
        self.fn: Callable[..., Any] | None = None
        self.responder: Callable[..., Any] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.slots: int | None = None  # calls its runner runs at once (set by the runner)
        if stage.kind == "lm":
            if engine is None:
                raise SpecError("no engine available", stage=stage.name, field="engine")
            if stage.responder:
                self.responder = resolve(stage.responder, stage=stage.name, field_name="responder")
        else:
            assert stage.function is not None
            self.fn = resolve(stage.function, stage=stage.name, field_name="function")
        self._is_async = inspect.iscoroutinefunction(self.fn)
        self._watcher = _Watcher(TOOL_CANCEL_POLL_S)
        # a function every call of which would fail (wrong arguments, a plain generator)
        # stops the stage at start, as `alto check` reports it, not at its first input
        problems = call_errors(stage, self.fn, self.responder)
        if problems:
            error = SpecError("; ".join(problems))
            error.stage = stage.name
            raise error

    def _threads(self) -> ThreadPoolExecutor:
        """This stage's own threads for a plain function. Not the loop's default pool
        (min(32, CPUs + 4) threads, shared with DNS lookups for engine connections and
        every other stage): a call past `timeout_s` cannot be stopped and keeps its thread
        until it returns, so a stage whose function hangs would starve all of them. Twice
        the stage's concurrency leaves room for some hung calls before its own queue."""
        if self._pool is None:
            size = 2 * (self.slots or DEFAULT_SLOTS)
            self._pool = ThreadPoolExecutor(max_workers=size,
                                            thread_name_prefix=f"alto-{self.stage.name}")
        return self._pool

    def close(self) -> None:
        """Let the stage's threads go once they are idle. A hung call's thread ends only
        when its call returns, and Python joins pool threads at exit: the CLI does not wait
        for such a call (`running_plain_calls`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def params(self, run: str) -> GenParams:
        s = self.stage
        tags: dict[str, Any] = {"stage": s.name, "run": run, "pipeline": self.spec.name,
                                "framing": s.framing}
        if self.responder is not None:
            tags["responder"] = self.responder
        return GenParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            stop=s.stop,
            system=s.system,
            tags=tags,
        )

    def produce(
        self,
        ctx: StageContext,
        value: Any,
        items: list[Any] | None,
        stats: CallStats,
        stop: StopCheck,
    ) -> AsyncIterator[Any]:
        """Units for one input (`value`) or one aggregation group (`items`), within the
        stage's `timeout_s` when it has one."""
        units = self._units(ctx, value, items, stats, stop)
        if self.stage.unique or self.stage.max_units is not None:
            units = _limited(units, self.stage.max_units, self.stage.unique)
        if self.stage.timeout_s is None:
            return units
        return _bounded(units, self.stage.timeout_s, self.stage.name)

    async def _units(
        self,
        ctx: StageContext,
        value: Any,
        items: list[Any] | None,
        stats: CallStats,
        stop: StopCheck,
    ) -> AsyncIterator[Any]:
        if self.stage.kind == "lm":
            async for unit in self._lm(ctx, value, items, stats, stop):
                yield unit
            return
        assert self.fn is not None
        arg = items if self.stage.aggregates else value
        watch = _CancelWatch(self._watcher, stop, stats)
        if self._is_async:
            call = self.fn(arg, ctx)
        else:
            call = asyncio.get_running_loop().run_in_executor(self._threads(), functools.partial(
                _counted, self.stage.name, contextvars.copy_context().run, self.fn, arg, ctx))
        with watch:
            result = await call
        if watch.hit:
            return
        if inspect.isasyncgen(result):
            last_check = time.monotonic()
            try:
                while True:
                    with watch:
                        unit = await anext(result, _END)
                    if watch.hit or unit is _END:
                        return
                    stats.incremental = True
                    for u in frame_value(self.stage.framing, unit):
                        yield u
                    # a generator whose units come faster than the watcher's ticks is
                    # rarely caught waiting: look between units too, as an LM call does
                    if time.monotonic() - last_check > TOOL_CANCEL_POLL_S:
                        last_check = time.monotonic()
                        if await _cancelled(stop):
                            return
            finally:
                await result.aclose()
        stats.incremental = False
        for u in frame_value(self.stage.framing, result):
            yield u

    async def _lm(
        self,
        ctx: StageContext,
        value: Any,
        items: list[Any] | None,
        stats: CallStats,
        stop: StopCheck,
    ) -> AsyncIterator[Any]:
        assert self.engine is not None and self.stage.prompt is not None
        values = dict(ctx.values)
        if value is not None:
            values["text"] = value
        if items is not None:
            values["items"] = "\n".join(as_text(i) for i in items)
        prompt = render(self.stage.prompt, values)
        stats.prompt = prompt
        framer = make_framer(self.stage.framing)
        gen = self.engine.generate(prompt, self.params(ctx.run))

        def absorb(delta: Delta) -> Iterable[Any]:
            if delta.prompt_tokens is not None:
                stats.prompt_tokens = delta.prompt_tokens
            if delta.completion_tokens is not None:
                stats.completion_tokens = delta.completion_tokens
            if delta.cached_tokens is not None:
                stats.cached_tokens = delta.cached_tokens
            stats.incremental = True
            return framer.feed(delta.text)

        try:
            first = await _first_delta(gen, stop)
            if first is _CANCELLED:
                return
            if first is not None:
                for unit in absorb(first):
                    yield unit
                last_check = time.monotonic()
                async for delta in gen:
                    for unit in absorb(delta):
                        yield unit
                    now = time.monotonic()
                    if now - last_check > CANCEL_POLL_S:
                        last_check = now
                        if await _cancelled(stop):
                            return
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()
        stats.incremental = False
        for unit in framer.close():
            yield unit


_CANCELLED = object()
_END = object()


class _CancelWatch:
    """Ends a tool or reduce call whose run is cancelled while it runs, as an LM call ends
    (`_first_delta`): otherwise a hung call of a cancelled run keeps its slot until its
    `timeout_s`, or for ever. Used as `with watch: await call`; afterwards `hit` says the
    call was cut short (there is nothing to publish; the runner acknowledges its input).

    Most calls are instant, so entering and leaving only registers the call with its
    stage's `_Watcher`, whose one timer looks at the flag of calls that have run for a poll
    period; a cancelled one has its awaiting task cancelled the way `asyncio.timeout` does
    it, taking back only its own cancellation. A synchronous function's thread cannot be
    stopped: it runs on, unobserved and counted (`running_plain_calls`), until it returns."""

    __slots__ = ("_watcher", "_stop", "_stats", "_task", "_inside", "_looking", "_cancelling",
                 "_cancels_before", "started", "hit")

    def __init__(self, watcher: _Watcher, stop: StopCheck, stats: CallStats) -> None:
        self._watcher = watcher
        self._stop = stop
        self._stats = stats
        self._task: asyncio.Task[Any] | None = None
        self._inside = self._looking = self._cancelling = False
        self._cancels_before = 0
        self.started: float | None = None  # the call's start (loop time): once per call
        self.hit = False

    def __enter__(self) -> None:
        self._task = asyncio.current_task()
        self._inside, self._cancelling = True, False
        # cancellations requested before ours (as asyncio.timeout counts them on 3.12)
        self._cancels_before = self._task.cancelling() if self._task is not None else 0
        self._watcher.add(self)

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> bool:
        self._inside = False
        self._watcher.calls.pop(self, None)
        if self._cancelling and self._task is not None \
                and self._task.uncancel() <= self._cancels_before \
                and exc_type is asyncio.CancelledError:
            self.hit = True
            return True  # our own cancellation: the call is over, the task goes on
        return False

    def look(self) -> None:
        self._looking = True
        looking = asyncio.ensure_future(self._poll())
        _looks.add(looking)
        looking.add_done_callback(_looks.discard)

    async def _poll(self) -> None:
        try:
            cancelled = await self._stop()
        except Exception:  # noqa: BLE001 - a failed look is tried again at the next tick
            cancelled = False
        finally:
            self._looking = False
        if cancelled and self._inside and self._task is not None:
            self._cancelling = self._stats.cut = True
            self._task.cancel()


class _Watcher:
    """The running calls of one stage function, and the one timer that looks at the cancel
    flag of those older than `poll_s` (a timer per call cost ~10% of an instant tool's
    CPU). It ticks only while calls run."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self.calls: dict[_CancelWatch, float] = {}  # -> when it started (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, watch: _CancelWatch) -> None:
        loop = asyncio.get_running_loop()
        if watch.started is None:  # a generator's watch enters once per unit: age is per call
            watch.started = loop.time()
        self.calls[watch] = watch.started
        if self._timer is None or self._loop is not loop:
            self._loop = loop
            self._timer = loop.call_later(self.poll_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self.calls or self._loop is None:
            return
        due = self._loop.time() - self.poll_s
        for watch, since in list(self.calls.items()):
            if since <= due and not watch._looking:
                watch.look()
        self._timer = self._loop.call_later(self.poll_s, self._tick)


_looks: set[asyncio.Future[Any]] = set()  # running looks, referenced until they end


def _unit_key(unit: Any) -> bytes:
    """What `unique` compares: the unit as the next stage reads it (JSON read back, on both
    transports), written with sorted keys, so equal dicts are equal whatever their key
    order, and two dicts whose keys JSON writes alike ({1: "a", "1": "b"} reads back as
    {"1": "b"}) are compared as they will arrive. A unit JSON cannot hold (the unit check
    fails the call when it is emitted) is compared by its repr."""
    try:
        return json.dumps(loads_json(dumps_json(unit)), sort_keys=True,
                          separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError):
        return repr(unit).encode()


async def _limited(units: AsyncIterator[Any], most: int | None,
                   unique: bool) -> AsyncIterator[Any]:
    """A stage's `max_units` and `unique`: at most `most` units, each (with `unique`) unlike
    every earlier one of the call, compared as JSON. Stopping closes `units`, which ends
    the call (an engine request is aborted)."""
    seen: set[bytes] = set()
    n = 0
    try:
        async for unit in units:
            if unique:
                key = _unit_key(unit)
                if key in seen:
                    continue
                seen.add(key)
            yield unit
            n += 1
            if most is not None and n >= most:
                return
    finally:
        aclose = getattr(units, "aclose", None)
        if aclose is not None:
            await aclose()


async def _bounded(units: AsyncIterator[Any], limit_s: float, stage: str) -> AsyncIterator[Any]:
    """`units`, each awaited against one deadline for the whole call. The deadline is
    wall-clock from the call's start, so time the runner spends committing streamed units
    counts too; but only the call's own awaits are bounded, not the `yield`: the consumer
    (the runner, committing a unit) is never interrupted, so a timeout cannot cut a commit
    in half. The call is cancelled at the deadline: an engine stream is closed (the engine
    aborts the request). A synchronous tool's thread cannot be stopped: it runs on
    unobserved and keeps its place in its stage's pool (`StageFunction._threads`) until it
    returns, so tools that can hang are better written async."""
    deadline = asyncio.get_running_loop().time() + limit_s
    try:
        while True:
            bound = asyncio.timeout_at(deadline)
            try:
                async with bound:
                    unit = await anext(units)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if bound.expired():
                    raise StageTimeout(
                        f"stage {stage!r}: the call took longer than timeout_s={limit_s:g} s"
                    ) from None
                raise  # the call's own TimeoutError, not the stage's bound
            yield unit
    finally:
        aclose = getattr(units, "aclose", None)
        if aclose is not None:
            await aclose()


async def _first_delta(gen: AsyncIterator[Delta], stop: StopCheck) -> Any:
    """The engine's first delta; None if it generates nothing; `_CANCELLED` if the run is
    cancelled before the first delta comes.

    Between deltas the call checks the cancel flag itself (every >= 50 ms); before the
    first one there is nothing to check between: a request queued in the engine (its batch
    full) or prefilling a long prompt kept its slot for a cancelled run until its first
    token. So the first delta is awaited beside a poll of the flag, and a cancel closes the
    request (engines abort a request whose stream is cancelled). One extra task per call,
    none per delta."""
    waiting: asyncio.Future[Any] = asyncio.ensure_future(_next_or_none(gen))
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=CANCEL_POLL_S)
            if done:
                return waiting.result()
            if await _cancelled(stop):
                return _CANCELLED
    finally:
        if not waiting.done():
            waiting.cancel()  # the engine aborts the request
            try:
                await waiting
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this call itself is being cancelled: not ours to swallow


async def _cancelled(stop: StopCheck) -> bool:
    """`stop()`, False when the bus cannot say: a transport blip while a call runs must not
    end the call (its work would be lost; the next look asks again)."""
    try:
        return await stop()
    except Exception:  # noqa: BLE001
        return False


async def _next_or_none(gen: AsyncIterator[Delta]) -> Delta | None:
    try:
        return await anext(gen)
    except StopAsyncIteration:
        return None
