"""The native API: pipelines, runs with typed SSE events, and resumable event streams.

Event ids are the ones `follow_run` yields: the log's own ids (Redis stream ids, or the
embedded transport's "<n>-0") for events runners wrote, and "<id>.<n>" for what the
tracker derives from them (`stage_done`, `result`). Any of them can be sent back as
`Last-Event-ID` to `GET /v1/runs/{id}/events`; the run is replayed through a fresh
tracker and only later events are sent, so a dropped connection loses nothing and sees
nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from app.admission import check_input, check_prompt, deadline_for
from app.errors import ApiError
from app.gateway import Gateway, RunHandle, valid_event_id
from app.middleware import OWNER_STATE
from app.responses import EVENTS_SSE, RUN_SSE, errors
from app.schemas import (
    EngineInfo,
    Partial,
    PipelineInfo,
    PipelineList,
    RunError,
    RunRequest,
    RunResult,
    StageInfo,
)
from app.streaming import (
    ClientGone,
    ClosingEventSource,
    json_response,
    native_farewell,
    sse,
    unless_disconnected,
)
from orchestrator.spec import PipelineSpec
from orchestrator.template import as_text
from orchestrator.tracker import RunTracker, event_order
from workers.engines import default_instances

router = APIRouter(prefix="/v1", tags=["pipelines"])

PipelineName = Annotated[str, Path(description="pipeline name", examples=["factool"])]
EventId = r"^[0-9]+(-[0-9]+)?(\.[0-9]+)?$"
RunId = Annotated[str, Path(description="a run id (`X-Alto-Run`)")]


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def owner(request: Request) -> str | None:
    """The caller's API key hash (None when the gateway has no keys)."""
    return getattr(request.state, OWNER_STATE, None)


class RunStatus(BaseModel):
    """Where a run stands, from its event log."""

    id: str
    object: Literal["pipeline.run.status"] = "pipeline.run.status"
    pipeline: str
    created: int
    deadline_s: float | None = None
    status: Literal["running", "completed", "failed", "cancelled"]
    error: RunError | None = None


def pipeline_info(spec: PipelineSpec) -> PipelineInfo:
    return PipelineInfo(
        name=spec.name,
        description=spec.description,
        entry=spec.entry_stage,
        output=spec.output_stage,
        streaming=spec.streaming,
        stages=[
            StageInfo(
                name=s.name,
                kind=s.kind,
                framing=s.framing,
                to=list(s.to),
                aggregate_by=s.aggregate_by,
                engine=(s.engine or "default") if s.kind == "lm" else None,
                streaming=spec.streaming_for(s.name),
            )
            for s in spec.stages
        ],
        engines={
            name: EngineInfo(kind=e.kind, model=e.model, instances=default_instances(e))
            for name, e in spec.engines.items()
        },
    )


def event_payload(ev: dict[str, Any]) -> dict[str, Any]:
    """An event as the native API sends it: `partial` gains `text` (its data as text)."""
    if ev.get("type") == "partial":
        return {**ev, "text": as_text(ev.get("data"))}
    return ev


def wants_sse(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "").lower()


@router.get("/pipelines", response_model=PipelineList, responses=errors(401, 429))
async def list_pipelines(request: Request) -> PipelineList:
    """Every pipeline this gateway serves, with its stages and engines."""
    gw = gateway(request)
    return PipelineList(data=[pipeline_info(s) for s in gw.pipelines.values()])


@router.get("/pipelines/{name}", response_model=PipelineInfo,
            responses=errors(401, 404, 429))
async def get_pipeline(name: PipelineName, request: Request) -> PipelineInfo:
    """One pipeline's stages, engines and streaming mode."""
    return pipeline_info(gateway(request).pipeline(name, param="name"))


async def _sse_events(
    events: AsyncIterator[tuple[str, dict[str, Any]]],
) -> AsyncIterator[ServerSentEvent]:
    async for eid, ev in events:
        yield sse(event_payload(ev), event=str(ev.get("type")), id=eid)


async def _collect(handle: RunHandle) -> RunResult:
    partials: list[Partial] = []
    done: list[str] = []
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    async for eid, ev in handle.events():
        kind = ev.get("type")
        if kind == "partial":
            partials.append(
                Partial(
                    event_id=eid,
                    stage=ev["stage"],
                    key=ev.get("key", "-"),
                    lineage=ev.get("lineage", "-"),
                    data=ev.get("data"),
                    text=as_text(ev.get("data")),
                    final=bool(ev.get("final")),
                )
            )
        elif kind == "stage_done":
            done.append(ev["stage"])
        elif kind == "result":
            result = ev
        elif kind == "error":
            error = ev
    return RunResult(
        id=handle.run,
        pipeline=handle.spec.name,
        created=handle.created,
        status="completed" if result is not None and error is None else "failed",
        output=result.get("output") if result else None,
        units=list(result.get("units", [])) if result else [],
        partials=partials,
        stages_done=done,
        error=RunError(message=str(error.get("message", "error")), code=error.get("code"),
                       stage=error.get("stage")) if error else None,
    )


@router.post(
    "/pipelines/{name}/runs",
    response_model=RunResult,
    responses={**RUN_SSE, **errors(400, 401, 404, 413, 429, 503)},
)
async def create_run(name: PipelineName, body: RunRequest, request: Request) -> Any:
    """Run a pipeline on one input.

    With `Accept: text/event-stream` the answer is a stream of typed SSE events, each
    with an `id`: `run`, `partial` (stage, key, lineage, data, text), `stage_done`,
    `result` (output, units) and `error` (message, code, stage). Otherwise the answer is
    one JSON object with the result and every partial output, sent when the run ends.
    The run id is also in the `X-Alto-Run` header, before any event. The header
    `X-Alto-Deadline: <seconds>` sets this run's deadline (default and maximum are
    configured; see docs/API.md).
    """
    gw = gateway(request)
    spec = gw.pipeline(name, param="name")
    check_prompt(gw.settings, body.input, "input")
    check_input(spec, body.input, "input")
    handle = await gw.start(spec, body.input, owner=owner(request),
                            deadline_s=deadline_for(gw.settings, request))
    headers = {"X-Alto-Run": handle.run}
    if wants_sse(request):
        grace = gw.settings.resume_grace_s

        async def on_close() -> None:
            await handle.close(grace_s=grace)

        return ClosingEventSource(
            _sse_events(handle.events()),
            on_close=on_close,
            ping_s=gw.settings.sse_ping_s,
            headers=headers,
            farewell=native_farewell(handle.run, resumable=not gw.transport.in_process),
        )
    try:
        result = await unless_disconnected(request, _collect(handle))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await handle.close()
    return json_response(result, headers=headers)


@router.get(
    "/runs/{run_id}/events",
    responses={**EVENTS_SSE, **errors(400, 401, 404, 429)},
    response_class=Response,
)
async def run_events(
    request: Request,
    run_id: RunId,
    # typed `str` with an empty default, not `str | None`: a header is never JSON null
    last_event_id: Annotated[
        str,
        Header(alias="Last-Event-ID", description="resume after this event id",
               max_length=64, pattern=EventId),
    ] = "",
    after: Annotated[
        str,
        Query(description="same as Last-Event-ID, for clients that cannot set headers",
              max_length=64, pattern=EventId),
    ] = "",
) -> Any:
    """Replay a run's events from the start (or after `Last-Event-ID`) and follow it to
    its end, as typed SSE events with the same ids as the stream that started it.
    Events are kept `run_ttl_s` seconds after the run ends (in Redis, or in memory when
    embedded)."""
    gw = gateway(request)
    resume = last_event_id or after or None
    if resume is not None and not valid_event_id(resume):
        raise ApiError(400, f"not an event id of this API: {resume!r}",
                       code="invalid_event_id",
                       param="Last-Event-ID" if last_event_id else "after")
    spec, first = await gw.lookup_run(run_id, owner(request))
    if resume is not None:
        # an id past the log's end was never sent (ids are given out as events are
        # appended): following from it would show nothing, not even the run's end
        last = await gw.transport.last_event_id(run_id)
        if last is not None and event_order(resume)[:2] > event_order(last)[:2]:
            raise ApiError(404, f"no event {resume!r} in run {run_id!r}: past the end of its "
                                f"log (its last event is {last!r})", code="event_not_found",
                           param="Last-Event-ID" if last_event_id else "after")
    created = float(first.get("created") or time.time())
    total = float(first.get("deadline_s") or gw.settings.run_deadline_s)
    deadline = max(0.001, created + total - time.time())
    state = {"ended": False}
    release_viewer = gw.admit_viewer()

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for eid, ev in gw.follow(spec, run_id, after=resume, deadline_s=deadline,
                                       total_s=total):
            if ev.get("type") in ("result", "error"):
                state["ended"] = True
            yield sse(event_payload(ev), event=str(ev.get("type")), id=eid)
        state["ended"] = True  # the log was complete (possibly before `after`)

    async def on_close() -> None:
        release_viewer()
        if state["ended"]:
            await gw.expire(run_id)  # a resumed run's log gets its TTL like any other
        elif request.method != "HEAD":  # a HEAD never followed the run: it cannot drop it
            gw.reap_later(spec, run_id, gw.settings.resume_grace_s,
                          deadline_s=max(0.001, created + total - time.time()), total_s=total)

    return ClosingEventSource(
        events(), on_close=on_close, ping_s=gw.settings.sse_ping_s,
        headers={"X-Alto-Run": run_id},
        farewell=native_farewell(run_id, resumable=not gw.transport.in_process),
    )


async def _status(gw: Gateway, spec: PipelineSpec, run: str, first: dict[str, Any]) -> RunStatus:
    """Replay the log through a tracker: completion is exact, never guessed. A run past
    its deadline that nobody follows any more (its gateway died) is failed here, so an
    abandoned run is cancelled by whoever looks at it next."""
    tracker = RunTracker(spec, run)
    error: dict[str, Any] | None = None
    cursor = None
    while not tracker.finished and error is None:
        batch = await gw.transport.read_events(run, cursor, 512, 0)
        if not batch:
            break
        for eid, ev in batch:
            cursor = eid
            if ev.get("type") == "error":
                error = ev
                break
            tracker.feed(eid, ev)
            if tracker.finished:
                break
    created = int(first.get("created") or 0)
    deadline = float(first.get("deadline_s") or gw.settings.run_deadline_s)
    if error is None and not tracker.finished and time.time() > created + deadline + 1:
        await gw.fail(run, "deadline_exceeded",
                      f"the run did not finish within its deadline ({deadline:g} s)")
        error = {"code": "deadline_exceeded",
                 "message": f"the run did not finish within its deadline ({deadline:g} s)"}
    if error is not None:
        status = "cancelled" if error.get("code") == "cancelled" else "failed"
    else:
        status = "completed" if tracker.finished else "running"
    return RunStatus(
        id=run, pipeline=spec.name, created=created, deadline_s=deadline,
        status=status,  # type: ignore[arg-type]
        error=RunError(message=str(error.get("message", "error")), code=error.get("code"),
                       stage=error.get("stage")) if error else None,
    )


@router.get("/runs/{run_id}", response_model=RunStatus, responses=errors(401, 404, 429))
async def run_status(run_id: RunId, request: Request) -> Response:
    """Whether a run is running, completed, failed or cancelled (from its event log; 404
    once the log has expired, and for a run created with another API key)."""
    gw = gateway(request)
    spec, first = await gw.lookup_run(run_id, owner(request))
    return json_response(await _status(gw, spec, run_id, first))


@router.post("/runs/{run_id}/cancel", response_model=RunStatus,
             responses=errors(401, 404, 429))
async def cancel_run(run_id: RunId, request: Request) -> Response:
    """Cancel a run: its remaining work is dropped everywhere, its followers get an
    `error` event with code `cancelled`, and its log expires after `run_ttl_s`. A run
    that already ended is left as it is (the answer says how it ended)."""
    gw = gateway(request)
    spec, first = await gw.lookup_run(run_id, owner(request))
    status = await _status(gw, spec, run_id, first)
    if status.status != "running":
        return json_response(status)
    await gw.fail(run_id, "cancelled", "cancelled by the client (POST /v1/runs/{id}/cancel)")
    return json_response(await _status(gw, spec, run_id, first))

