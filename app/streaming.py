"""SSE responses whose end (normal, error or client disconnect) always runs a cleanup,
and the disconnect watch for plain JSON responses.

Why a Response subclass: sse-starlette cancels the body generator when the client goes
away, and if that happens before the generator's first step its `finally` never runs; the
response object's own `__call__` is the one place that is always entered and always left,
so the run's slot and its cancellation hang off it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from orchestrator.envelope import strict_json

T = TypeVar("T")
OnClose = Callable[[], Awaitable[None]]
# how long a stream may take to send its farewell once the server is shutting down (under
# the gateway's graceful-shutdown timeout, 5 s, or uvicorn cuts it anyway)
SHUTDOWN_GRACE_S = 1.0


def dumps(obj: Any) -> str:
    """Compact, strict JSON for clients (`strict_json`): a lone surrogate a tool returned is
    escaped, a NaN or an infinity is `null`."""
    return strict_json(obj).decode()


def json_response(body: BaseModel | dict[str, Any], *, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    """A JSON answer written by `dumps`, not FastAPI's serializer (which fails on a lone
    surrogate a tool returned: a 500 instead of the answer)."""
    data = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return Response(dumps(data), status_code=status, headers=headers,
                    media_type="application/json")


def sse(data: Any, *, event: str | None = None, id: str | None = None) -> ServerSentEvent:
    text = data if isinstance(data, str) else dumps(data)
    # "\n" line ends (the SSE default here is "\r\n"): shell tools and curl users get
    # clean lines; every SSE parser accepts both
    return ServerSentEvent(data=text, event=event, id=id or None, sep="\n")


async def _until(content: AsyncIterator[ServerSentEvent], stopping: anyio.Event,
                 farewell: Sequence[ServerSentEvent]) -> AsyncIterator[ServerSentEvent]:
    """`content`, until the server starts shutting down: then `farewell` instead of the
    rest. Without it the stream would just stop, and a client that waits for an end
    marker (OpenAI's `[DONE]`) could not tell a cut answer from a whole one.

    One waiter for the shutdown per stream, no task per event: when the shutdown comes
    while the stream waits for its next event, the waiting task is cancelled (as
    `asyncio.timeout` does it) and takes back only that cancellation."""
    it = aiter(content)
    task = asyncio.current_task()
    assert task is not None
    stop = asyncio.ensure_future(stopping.wait())
    waiting = cut = False

    def shutting_down(_: object) -> None:
        nonlocal cut
        if waiting and not cut:
            cut = True
            task.cancel()

    stop.add_done_callback(shutting_down)
    try:
        while not stop.done():
            waiting = True
            try:
                event = await anext(it)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not cut or task.uncancel() > 0:
                    raise  # not ours, or ours and someone else's: the stream is cancelled
                break
            finally:
                waiting = False
            if cut:  # the event came anyway: our cancellation is still pending, take it back
                task.uncancel()
                break
            yield event
            if event.event in ("result", "error") or event.data == "[DONE]":
                return  # the stream's own end went out: no farewell after it
        for event in farewell:  # the server is shutting down
            yield event
    finally:
        stop.remove_done_callback(shutting_down)
        stop.cancel()
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class ClosingEventSource(EventSourceResponse):
    """`farewell`: events sent instead of the rest of the stream when the server shuts
    down while it is open (none: the stream just stops, which a resumable stream may)."""

    def __init__(
        self,
        content: AsyncIterator[ServerSentEvent],
        *,
        on_close: OnClose,
        ping_s: float,
        headers: dict[str, str] | None = None,
        farewell: Sequence[ServerSentEvent] = (),
    ) -> None:
        stopping = anyio.Event() if farewell else None
        if stopping is not None:
            content = _until(content, stopping, farewell)
        super().__init__(content, ping=ping_s, sep="\n", headers=headers,
                         shutdown_event=stopping,
                         shutdown_grace_period=SHUTDOWN_GRACE_S if farewell else 0)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but give up (cancelling it) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientGone()
    finally:
        watch.cancel()
        with contextlib.suppress(BaseException):
            await watch
        if not task.done():
            task.cancel()


RESUME_RETRY_MS = 1_000


def native_farewell(run: str, *, resumable: bool) -> list[ServerSentEvent]:
    """The end of a native stream cut by the server's shutdown, then a clean end of the
    body (it was cut mid-chunk: clients raised an incomplete-body error, and the server
    logged an ERROR per open stream).

    `resumable` (the runs live on Redis): a comment saying so and a `retry` hint; the run
    goes on and the client resumes it at another gateway with Last-Event-ID, as a browser's
    EventSource does by itself after `retry` ms. Otherwise (embedded: the run ends with
    this process) an `error` event, code `server_shutting_down`, without an id, so a
    client's last event id stays that of the last event the run wrote."""
    if resumable:
        return [ServerSentEvent(comment="the server is shutting down; the run goes on: "
                                        "resume it with Last-Event-ID",
                                retry=RESUME_RETRY_MS, sep="\n")]
    body = {"type": "error", "run": run, "code": "server_shutting_down",
            "message": "the server is shutting down, and the run with it (embedded "
                       "transport: its runners and events live in this process)"}
    return [sse(body, event="error")]


def shutting_down(what: str) -> list[ServerSentEvent]:
    """The end of an OpenAI-format stream cut by the server's shutdown: an error chunk (the
    SDK raises it) and `[DONE]`. `what`: what became of the work behind the answer."""
    from app.errors import error_body

    return [sse(error_body(f"the server is shutting down; this answer is incomplete ({what})",
                           "server_error", None, "server_shutting_down")),
            sse("[DONE]")]
