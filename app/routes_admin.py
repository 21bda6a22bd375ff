"""Operator endpoints: a pipeline's dead letters, over HTTP.

A failed input (a stage error, a `stage_timeout`, an input that kept killing its worker)
lands in its pipeline's dead-letter queue (`workers.deadletters`). Over Redis, `alto
dead-letters` reads and resolves them from any machine; with the embedded transport they
live in the gateway process, so without these endpoints nothing could list, replay or
drop them, and an alert on `alto_dead_letters > 0` fired until the process restarted.
They work on both transports.

The letters hold the failed runs' inputs, whoever sent them, so with API keys configured
only an admin key (ALTO_ADMIN_API_KEYS) may use them; a gateway without any keys is open
to every caller anyway, and so are these.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from app.errors import ApiError, validation_error
from app.middleware import ADMIN_STATE, OWNER_STATE
from app.responses import errors
from app.routes_native import PipelineName, gateway
from app.streaming import json_response
from workers import deadletters

router = APIRouter(prefix="/v1", tags=["operations"])


def require_admin(request: Request) -> None:
    settings = request.app.state.settings
    if not settings.api_keys and not settings.admin_api_keys:
        return  # an open gateway: every caller may do everything
    if getattr(request.state, ADMIN_STATE, False):
        return
    raise ApiError(403, "the dead-letter endpoints need an admin key (ALTO_ADMIN_API_KEYS): "
                        "dead letters hold other callers' inputs",
                   code="admin_key_required")


class DeadLetterInfo(BaseModel):
    """One unresolved dead letter."""

    id: str = Field(description="its entry id: what replay and drop take")
    stage: str = Field(description="the stage the input failed at")
    run: str = Field(description="the run it failed")
    reason: str
    instance: str = Field(description="the worker instance (consumer) that failed it")
    input: Any = Field(description="the failed run's input (null if the record has none)")


class DeadLetterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeadLetterInfo]
    unresolved: int = Field(description="all unresolved letters (`data` holds up to `limit`)")


class DeadLetterIds(BaseModel):
    """These letters."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=10_000)


class AllDeadLetters(BaseModel):
    """Every unresolved letter: said explicitly, as `alto dead-letters ... --all` is (an
    empty body dropping every letter was too easy a mistake)."""

    model_config = ConfigDict(extra="forbid")

    all: Literal[True]


Selection = DeadLetterIds | AllDeadLetters


def _ids(selection: DeadLetterIds | AllDeadLetters) -> list[str] | None:
    return selection.ids if isinstance(selection, DeadLetterIds) else None


SELECTION_SHAPES = ('expected {"ids": [letter id, ...]} (those letters) or {"all": true} '
                    '(every unresolved letter)')


def selection_error(exc: RequestValidationError) -> ApiError | None:
    """A 400 for a body that is not a Selection, saying both shapes it may have. Why:
    pydantic reports a union's failure branch by branch, and the generic message named
    only the first (`missing required field 'DeadLetterIds.ids'`), hiding `{"all":
    true}`. The problem reported is the one of the shape the body was meant to be (by
    the key it has); None where the body is not the problem (a path parameter, JSON that
    does not parse), which the generic handler words."""
    errors = exc.errors()
    if not errors or any(tuple(e.get("loc", ()))[:1] != ("body",)
                         or e.get("type") == "json_invalid" for e in errors):
        return None
    body = exc.body
    if isinstance(body, bytes):  # not read as JSON (its Content-Type): the generic 400 says so
        return None
    if body is None:
        return ApiError(400, f"missing request body: {SELECTION_SHAPES}",
                        code="missing_required_parameter")
    if not isinstance(body, dict):
        return ApiError(400, f"invalid request body: not a JSON object; {SELECTION_SHAPES}",
                        code="invalid_value")
    if "ids" in body and "all" in body:
        return ApiError(400, f"'ids' and 'all' together: give one; {SELECTION_SHAPES}",
                        code="invalid_value")
    if "ids" not in body and "all" not in body:
        return ApiError(400, f"missing 'ids' or 'all': {SELECTION_SHAPES}",
                        code="missing_required_parameter")
    meant = (DeadLetterIds if "ids" in body else AllDeadLetters).__name__
    # the meant shape's problems, located in the body as if it were the only shape
    mine = [{**e, "loc": ("body", *e["loc"][2:])} for e in errors
            if tuple(e["loc"][1:2]) == (meant,)]
    if not mine:
        return None
    inner = validation_error(RequestValidationError(mine))
    return ApiError(400, f"{inner.message}; {SELECTION_SHAPES}", param=inner.param,
                    code=inner.code)


class SelectionRoute(APIRoute):
    """A route whose body is a Selection: its validation errors say both shapes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                error = selection_error(exc)
                if error is None:
                    raise
                raise error from None

        return route


# the routes that take a Selection (included into `router` below, after their definitions)
selecting = APIRouter(route_class=SelectionRoute)


class Replayed(BaseModel):
    object: Literal["dead_letters.replayed"] = "dead_letters.replayed"
    runs: dict[str, str] = Field(description="letter id -> the new run that re-submits its input")
    unresolved: int = Field(description=(
        "the pipeline's letters still unresolved: selected ones are left when their runs "
        "would exceed the free admission slots (ALTO_MAX_INFLIGHT_RUNS); replay them later"))


class Dropped(BaseModel):
    object: Literal["dead_letters.dropped"] = "dead_letters.dropped"
    dropped: int


ADMIN_ERRORS = errors(400, 401, 403, 404)
REPLAY_ERRORS = errors(400, 401, 403, 404, 429)


@router.get("/pipelines/{name}/dead-letters", response_model=DeadLetterList,
            dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS)
async def list_dead_letters(
    request: Request, name: PipelineName,
    limit: Annotated[int, Query(ge=1, le=10_000, description="at most this many")] = 100,
) -> Response:
    """A pipeline's unresolved dead letters, oldest first. Listing resolves nothing."""
    spec = gateway(request).pipeline(name, param="name")
    transport = gateway(request).transport
    letters = await deadletters.unresolved(transport, spec.name, limit)
    body = DeadLetterList(
        data=[DeadLetterInfo(id=d.entry_id, stage=d.stage, run=d.run, reason=d.reason,
                             instance=d.instance, input=d.input) for d in letters],
        unresolved=await deadletters.count(transport, spec.name),
    )
    return json_response(body.model_dump())


@selecting.post("/pipelines/{name}/dead-letters/replay", response_model=Replayed,
             dependencies=[Depends(require_admin)], responses=REPLAY_ERRORS)
async def replay_dead_letters(
    request: Request, name: PipelineName, selection: Annotated[Selection, Body()],
) -> Response:
    """Submit the input of each selected letter's run again, as a new run (once per failed
    run), and resolve its letters. For after the cause is fixed. Each new run takes an
    admission slot and has the gateway's run deadline, enforced although no client follows
    it; runs beyond the free slots are not started (their letters stay unresolved), and
    with no free slot the answer is 429."""
    spec = gateway(request).pipeline(name, param="name")
    try:
        runs = await gateway(request).replay(spec, _ids(selection),
                                             owner=getattr(request.state, OWNER_STATE, None))
    except LookupError as exc:
        raise ApiError(404, str(exc), param="ids", code="dead_letter_not_found") from None
    except ValueError as exc:  # a letter without a run input
        raise ApiError(400, str(exc), param="ids", code="not_replayable") from None
    left = await deadletters.count(gateway(request).transport, spec.name)
    return json_response(Replayed(runs=runs, unresolved=left).model_dump())


@selecting.post("/pipelines/{name}/dead-letters/drop", response_model=Dropped,
             dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS)
async def drop_dead_letters(
    request: Request, name: PipelineName, selection: Annotated[Selection, Body()],
) -> Response:
    """Resolve the selected letters without replaying them."""
    spec = gateway(request).pipeline(name, param="name")
    try:
        n = await deadletters.drop(gateway(request).transport, spec.name, _ids(selection))
    except LookupError as exc:
        raise ApiError(404, str(exc), param="ids", code="dead_letter_not_found") from None
    return json_response(Dropped(dropped=n).model_dump())


router.include_router(selecting)
