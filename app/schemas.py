"""Request and response bodies: the contract the OpenAPI document publishes.

Requests accept unknown fields (`extra="allow"`) the way OpenAI's API does, so a client
that sends parameters alto ignores (tools, logit_bias, seed, ...) still works; fields alto
does use are validated and a bad one is named in the 400 error. Response models describe
what the gateway sends; chunk and completion objects follow OpenAI's, plus one documented
extension field, `alto`, that plain clients ignore.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)

# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


class ModelInfo(BaseModel):
    """An OpenAI model object. `alto.kind` says whether it is a pipeline or an engine."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    alto: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


# ---------------------------------------------------------------------------------------
# chat completions
# ---------------------------------------------------------------------------------------


# Requests are validated as JSON Schema reads the published document: no `0` for `false`
# and no `"1"` for `1` (a silent coercion would hide a client bug; OpenAI refuses them
# too), but `5.0` is an integer, as it is in JSON.
_REQUEST = ConfigDict(extra="allow")


def _number_only(value: Any) -> Any:
    if isinstance(value, str | bool):
        raise ValueError("must be a JSON number")
    return value


def _false_only(value: Any) -> Any:
    if value is not False:  # a Literal[False] alone would take 0 too
        raise ValueError("only false is supported")
    return value


# constraints inside the Annotated type, so the document puts them on the number itself
# (on a `X | None` union pydantic would emit them as unknown keywords)
TokenCount = Annotated[int, Field(ge=1, le=65536), BeforeValidator(_number_only)]
Temperature = Annotated[float, Field(ge=0, le=2), BeforeValidator(_number_only)]
Probability = Annotated[float, Field(ge=0, le=1), BeforeValidator(_number_only)]
OnlyOne = Annotated[int, Field(ge=1, le=1), BeforeValidator(_number_only)]


def _unicode_only(value: str) -> str:
    """JSON may spell a lone UTF-16 surrogate (`"\\ud83d"`), which is no Unicode text: no
    engine can read it and no response holding it can be encoded. Refused here, before a
    run starts, instead of failing its response after the whole pipeline ran."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone surrogate ({value[exc.start]!r} at character "
                         f"{exc.start}), which is not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_only)]


class ContentPart(BaseModel):
    model_config = _REQUEST

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _REQUEST

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _unicode_content(self) -> ChatMessage:
        # checked on the message, not inside the union: a union's error would report its
        # first branch ("should be a valid string") instead of the surrogate
        _unicode_only(self.text())
        return self

    def text(self) -> str:
        """The message's text; text parts joined by a newline, as vLLM joins them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content if p.type in ("text", "input_text"))


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: StrictBool | None = False  # null: false (OpenAI's schema allows it)


class _Sampling(BaseModel):
    """Parameters shared by both completion APIs; pipelines ignore them, engines use them."""

    model_config = _REQUEST

    model: str = Field(min_length=1, max_length=256, examples=["factool"])
    stream: StrictBool | None = False  # null: false, as OpenAI and vLLM take it
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: OnlyOne | None = Field(default=None, description="only 1 is supported")
    stop: Text | list[Text] | None = None
    user: str | None = None
    seed: Annotated[int, BeforeValidator(_number_only)] | None = None

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(
        min_length=1,
        examples=[[{"role": "user", "content": "Paris is the capital of France."}]],
    )
    max_completion_tokens: TokenCount | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion; `alto` holds the run id and the structured output."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    alto: dict[str, Any] | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One streamed chunk. `alto` (extension) carries the run's other events: `run`
    (the run id), `partial` (stage, key, lineage, data) of non-output stages, `stage_done`,
    and, on output-stage chunks, their stage/key/lineage; its delta is then empty."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None
    alto: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------
# legacy completions
# ---------------------------------------------------------------------------------------


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] = Field(
        description="the input; a list must hold exactly one prompt",
        examples=["Paris is the capital of France."],
    )
    # refused rather than ignored: an answer without the echoed prompt (or the suffix
    # honoured) would look right and be wrong
    echo: Annotated[Literal[False], BeforeValidator(_false_only)] | None = Field(
        default=False, description="only false is supported")
    suffix: None = Field(default=None, description="not supported")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionChunk(BaseModel):
    """One streamed legacy completion; `alto` as in ChatCompletionChunk."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None
    alto: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    alto: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------
# native API
# ---------------------------------------------------------------------------------------


class StageInfo(BaseModel):
    name: str
    kind: str
    framing: str
    to: list[str]
    aggregate_by: list[str] | None = None
    engine: str | None = None
    streaming: bool


class EngineInfo(BaseModel):
    kind: str
    model: str | None = None
    instances: int


class PipelineInfo(BaseModel):
    object: Literal["pipeline"] = "pipeline"
    name: str
    description: str
    entry: str
    output: str
    streaming: bool
    stages: list[StageInfo]
    engines: dict[str, EngineInfo]


class PipelineList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PipelineInfo]


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: Text = Field(
        description="the run's input text (bounded by the body size limit)",
        examples=["Paris is the capital of France."],
    )


class Partial(BaseModel):
    """One unit a stage emitted: `key` is its aggregation key (the lineage it was made
    for), `lineage` names it uniquely (`stage.index/...`), `text` is `data` as text."""

    event_id: str
    stage: str
    key: str
    lineage: str
    data: Any = None
    text: str
    final: bool


class RunError(BaseModel):
    message: str
    code: str | None = None
    stage: str | None = None


class RunResult(BaseModel):
    id: str
    object: Literal["pipeline.run"] = "pipeline.run"
    pipeline: str
    created: int
    status: Literal["completed", "failed"]
    output: Any = None
    units: list[Any]
    partials: list[Partial]
    stages_done: list[str]
    error: RunError | None = None


class RunStartedEvent(BaseModel):
    """SSE `run`: the run exists; always the first event (its id starts the log)."""

    type: Literal["run"]
    run: str
    pipeline: str
    created: int


class PartialEvent(BaseModel):
    """SSE `partial`: one unit a stage emitted, the moment it was emitted."""

    type: Literal["partial"]
    stage: str
    key: str
    lineage: str
    data: Any = None
    text: str
    final: bool


class StageDoneEvent(BaseModel):
    """SSE `stage_done`: the stage has processed everything this run will send it."""

    type: Literal["stage_done"]
    run: str
    stage: str


class ResultEvent(BaseModel):
    """SSE `result`: the output stage's units in lineage order; the last event."""

    type: Literal["result"]
    run: str
    pipeline: str
    stage: str
    output: Any = None
    units: list[Any]


class ErrorEvent(BaseModel):
    """SSE `error`: the run failed (code `stage_error`, `stage_timeout`, `max_deliveries`,
    `deadline_exceeded`, `cancelled`, ...); the last event."""

    type: Literal["error"]
    message: str
    code: str | None = None
    stage: str | None = None
    run: str | None = None


# ---------------------------------------------------------------------------------------
# health
# ---------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, Any]


class NotReady(BaseModel):
    error: ErrorDetail
    checks: dict[str, Any]
