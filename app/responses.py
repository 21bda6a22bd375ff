"""OpenAPI `responses` declarations shared by the routes, so the published document lists
every status a route can answer with, each with the OpenAI error body, and describes each
SSE event (OpenAPI < 3.2: the `schema` of `text/event-stream` is one event, its `data` a
JSON document given by `contentSchema`, or the literal `[DONE]` that ends OpenAI streams).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.schemas import (
    ChatCompletionChunk,
    CompletionChunk,
    ErrorEvent,
    ErrorResponse,
    PartialEvent,
    ResultEvent,
    RunStartedEvent,
    StageDoneEvent,
)

_DESCRIPTIONS = {
    400: "Malformed body or invalid field (`param` names it)",
    401: "API keys are configured and the bearer token is missing or wrong",
    403: "An operator endpoint, called without an admin key (ALTO_ADMIN_API_KEYS)",
    404: "Unknown model, pipeline or run",
    413: "Body larger than the configured limit",
    429: "Per-key rate limit, too many runs in flight, or a stage's queue at its bound "
         "(see Retry-After)",
    500: "The pipeline failed",
    502: "An engine model's server failed or could not be reached",
    503: "No worker serves a stage of the pipeline, or an engine is unavailable",
    504: "The run did not finish within its deadline",
}

# models only SSE events refer to: app.main adds them to the document's components
SSE_MODELS: list[type[BaseModel]] = [
    ChatCompletionChunk, CompletionChunk, ErrorResponse,
    RunStartedEvent, PartialEvent, StageDoneEvent, ResultEvent, ErrorEvent,
]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _DESCRIPTIONS[c]} for c in codes}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def sse_200(
    description: str, *models: type[BaseModel], done: bool = False, named: bool = False
) -> dict[int | str, dict[str, Any]]:
    refs = [_ref(m) for m in models]
    data: dict[str, Any] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": refs[0] if len(refs) == 1 else {"anyOf": refs},
    }
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    event: dict[str, Any] = {
        "type": "object",
        "properties": {
            "data": data,
            "id": {"type": "string"},
            "event": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data", "id", "event"] if named else ["data"],
    }
    if named:
        event["properties"]["event"] = {
            "enum": ["run", "partial", "stage_done", "result", "error"]
        }
    return {200: {"description": description,
                  "content": {"text/event-stream": {"schema": event}}}}


CHAT_SSE = sse_200(
    "`chat.completion`, or with `stream: true` SSE `chat.completion.chunk`s, then `[DONE]`",
    ChatCompletionChunk, ErrorResponse, done=True,
)
COMPLETION_SSE = sse_200(
    "`text_completion`, or with `stream: true` SSE chunks, then `[DONE]`",
    CompletionChunk, ErrorResponse, done=True,
)
RUN_SSE = sse_200(
    "The run's result as JSON, or with `Accept: text/event-stream` its typed events",
    RunStartedEvent, PartialEvent, StageDoneEvent, ResultEvent, ErrorEvent, named=True,
)
EVENTS_SSE = sse_200(
    "The run's typed events, replayed then followed to the end",
    RunStartedEvent, PartialEvent, StageDoneEvent, ResultEvent, ErrorEvent, named=True,
)
