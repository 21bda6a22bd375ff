"""OpenAI-compatible endpoints: models, chat completions and legacy completions.

`model` names a pipeline (its input is the last user message, or the prompt) or an
engine model (`<pipeline>/<engine>`, or a model name an engine declares), which is a
plain LM call. Streaming answers `chat.completion.chunk` (or `text_completion`) objects:
the output stage's units as content, in the order they are produced, separated by "\n";
every other event of the run rides along in the extension field `alto` of a chunk with an
empty delta, which OpenAI clients ignore (see docs/API.md). `usage` counts tokens with
alto's tokenizer (workers/engines/tokens.py) over the pipeline's input and the returned
content for pipelines — an estimate, not the sum of the pipeline's engine calls — and
is the engine's own count for engine models.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from sse_starlette import ServerSentEvent

from app.admission import check_input, check_prompt, deadline_for
from app.engines import EngineModel
from app.errors import ApiError, error_body
from app.gateway import Gateway, RunHandle, Slot
from app.middleware import OWNER_STATE
from app.responses import CHAT_SSE, COMPLETION_SSE, errors
from app.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
    ModelInfo,
    ModelList,
)
from app.streaming import (
    ClientGone,
    ClosingEventSource,
    json_response,
    shutting_down,
    sse,
    unless_disconnected,
)
from orchestrator.engine import Engine, GenParams
from orchestrator.spec import PipelineSpec
from orchestrator.template import as_text
from workers.engines.common import EngineHTTPError
from workers.engines.tokens import count_tokens

router = APIRouter(prefix="/v1", tags=["openai"])

DEFAULT_MAX_TOKENS = 512
_STARTED = int(time.time())


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


def _models(gw: Gateway) -> list[ModelInfo]:
    out = [
        ModelInfo(id=name, created=_STARTED, owned_by="alto",
                  alto={"kind": "pipeline", "description": spec.description})
        for name, spec in gw.pipelines.items()
    ]
    for name, m in gw.engines.models.items():
        out.append(
            ModelInfo(
                id=name, created=_STARTED, owned_by="alto",
                alto={"kind": "engine", "pipeline": m.pipeline, "engine": m.engine,
                      "engine_kind": m.spec.kind, "model": m.spec.model},
            )
        )
    return out


@router.get("/models", response_model=ModelList, responses=errors(401, 429))
async def list_models(request: Request) -> ModelList:
    """Every pipeline and every directly served engine model."""
    return ModelList(data=_models(gateway(request)))


@router.get("/models/{model:path}", response_model=ModelInfo,
            responses=errors(401, 404, 429))
async def get_model(model: str, request: Request) -> ModelInfo:
    """One model object (engine model ids contain a '/': send it as is)."""
    for m in _models(gateway(request)):
        if m.id == model:
            return m
    raise ApiError(404, f"the model {model!r} does not exist", code="model_not_found",
                   param="model")


def _resolve(gw: Gateway, model: str) -> PipelineSpec | EngineModel:
    if model in gw.pipelines:
        return gw.pipelines[model]
    m = gw.engines.resolve(model)
    if m is None:
        raise ApiError(
            404,
            f"the model {model!r} does not exist: use a pipeline "
            f"({', '.join(sorted(gw.pipelines)) or 'none'}) or an engine model (GET /v1/models)",
            code="model_not_found",
            param="model",
        )
    return m


# ---------------------------------------------------------------------------------------
# response formats
# ---------------------------------------------------------------------------------------


class _Format:
    """Builds chunk and final objects for one request of one API (chat or completions)."""

    def __init__(self, api: str, id_: str, model: str) -> None:
        self.api = api
        self.id = id_
        self.model = model
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chunk(
        self,
        *,
        content: str | None = None,
        role: bool = False,
        finish: str | None = None,
        alto: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.api == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            c = self._base("chat.completion.chunk")
            c["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]
        else:
            c = self._base("text_completion")
            c["choices"] = [{"index": 0, "text": content or "", "logprobs": None,
                             "finish_reason": finish}]
        if alto is not None:
            c["alto"] = alto
        return c

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        c = self._base("chat.completion.chunk" if self.api == "chat" else "text_completion")
        c["choices"] = []
        c["usage"] = usage
        return c

    def final(self, content: str, finish: str, usage: dict[str, int],
              alto: dict[str, Any] | None) -> dict[str, Any]:
        if self.api == "chat":
            return ChatCompletion(
                id=self.id, created=self.created, model=self.model, usage=usage,  # type: ignore[arg-type]
                choices=[{"index": 0, "message": {"role": "assistant", "content": content},  # type: ignore[list-item]
                          "finish_reason": finish}],
                alto=alto,
            ).model_dump()
        return Completion(
            id=self.id, created=self.created, model=self.model, usage=usage,  # type: ignore[arg-type]
            choices=[{"index": 0, "text": content, "finish_reason": finish}],  # type: ignore[list-item]
            alto=alto,
        ).model_dump()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


TIMEOUT_CODES = frozenset({"deadline_exceeded", "stage_timeout"})  # 504, `timeout_error`


def _run_error(ev: dict[str, Any]) -> dict[str, Any]:
    code = ev.get("code") or "pipeline_error"
    where = f" (stage {ev['stage']})" if ev.get("stage") else ""
    kind = "timeout_error" if code in TIMEOUT_CODES else "server_error"
    return error_body(f"the run failed{where}: {ev.get('message', 'error')}", kind, None, code)


# ---------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------


async def _pipeline_chunks(
    handle: RunHandle, fmt: _Format, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    spec = handle.spec
    yield sse(fmt.chunk(role=True, content="",
                        alto={"event": "run", "run": handle.run, "pipeline": spec.name}))
    parts: list[str] = []
    async for _, ev in handle.events():
        kind = ev.get("type")
        if kind == "partial":
            info = {"event": "partial", "stage": ev.get("stage"), "key": ev.get("key"),
                    "lineage": ev.get("lineage")}
            if ev.get("stage") == spec.output_stage:
                piece = as_text(ev.get("data"))
                piece = "\n" + piece if parts else piece
                parts.append(piece)
                yield sse(fmt.chunk(content=piece, alto=info))
            else:
                yield sse(fmt.chunk(alto={**info, "data": ev.get("data")}))
        elif kind == "stage_done":
            yield sse(fmt.chunk(alto={"event": "stage_done", "stage": ev.get("stage")}))
        elif kind == "result":
            yield sse(fmt.chunk(finish="stop", alto={"event": "result", "run": handle.run}))
            if include_usage:
                yield sse(fmt.usage_chunk(
                    _usage(count_tokens(handle.text), count_tokens("".join(parts)))
                ))
        elif kind == "error":
            yield sse(_run_error(ev))
    yield sse("[DONE]")


async def _pipeline_final(handle: RunHandle, fmt: _Format) -> dict[str, Any]:
    result: dict[str, Any] | None = None
    async for _, ev in handle.events():
        if ev.get("type") == "result":
            result = ev
        elif ev.get("type") == "error":
            body = _run_error(ev)
            status = 504 if ev.get("code") in TIMEOUT_CODES else 500
            raise ApiError(status, body["error"]["message"], code=body["error"]["code"],
                           type=body["error"]["type"])
    assert result is not None  # follow() ends with result or error
    content = "\n".join(as_text(u) for u in result.get("units", []))
    return fmt.final(
        content, "stop", _usage(count_tokens(handle.text), count_tokens(content)),
        {"run": handle.run, "pipeline": handle.spec.name, "output": result.get("output")},
    )


async def _serve_pipeline(
    request: Request, gw: Gateway, spec: PipelineSpec, text: str, fmt: _Format,
    stream: bool, include_usage: bool,
) -> Any:
    handle = await gw.start(spec, text, owner=getattr(request.state, OWNER_STATE, None),
                            deadline_s=deadline_for(gw.settings, request))
    headers = {"X-Alto-Run": handle.run}
    if stream:
        return ClosingEventSource(
            _pipeline_chunks(handle, fmt, include_usage),
            on_close=handle.close,  # no grace: an OpenAI client cannot resume
            ping_s=gw.settings.sse_ping_s,
            headers=headers,
            farewell=shutting_down("its run was cancelled"),
        )
    try:
        body = await unless_disconnected(request, _pipeline_final(handle, fmt))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await handle.close()
    return json_response(body, headers=headers)


# ---------------------------------------------------------------------------------------
# engine models
# ---------------------------------------------------------------------------------------


# upstream statuses that say the client's request was wrong (a context length exceeded,
# an invalid value, too large); any other 4xx (404 for a wrong model, 401...) is the
# gateway's setup, and 429 the upstream's load
_UPSTREAM_CLIENT_ERRORS = frozenset({400, 413, 422})


def _engine_error(exc: Exception) -> ApiError:
    """A failed engine-model call: the engine's server refused what the client asked (400,
    the client's to fix), is overloaded (503 with its Retry-After), or failed or could not
    be reached (502, a bad gateway, as a proxy says)."""
    if isinstance(exc, EngineHTTPError):
        if exc.status in _UPSTREAM_CLIENT_ERRORS:
            return ApiError(400, f"the engine refused the request: {exc}",
                            code="engine_rejected_request")
        if exc.status == 429:
            return ApiError(503, f"the engine is overloaded: {exc}", code="engine_overloaded",
                            retry_after_s=exc.retry_after or 1.0)
    return ApiError(502, f"engine error: {exc}", code="engine_error")


async def _engine_for(gw: Gateway, model: EngineModel) -> Engine:
    try:
        return await gw.engines.engine(model)
    except Exception as exc:  # noqa: BLE001 - any start failure means "not available"
        raise ApiError(503, f"engine {model.id!r} is not available: {exc}",
                       code="engine_unavailable") from exc


async def _engine_chunks(
    engine: Engine, prompt: str, params: GenParams, fmt: _Format, include_usage: bool,
    gw: Gateway, model: str,
) -> AsyncIterator[ServerSentEvent]:
    yield sse(fmt.chunk(role=True, content=""))
    text: list[str] = []
    finish = "stop"
    usage: dict[str, int] | None = None
    gen = engine.generate(prompt, params)
    try:
        async for d in gen:
            if d.text:
                text.append(d.text)
                yield sse(fmt.chunk(content=d.text))
            if d.finish_reason is not None:
                finish = d.finish_reason
            if d.prompt_tokens is not None or d.completion_tokens is not None:
                usage = _usage(d.prompt_tokens or 0, d.completion_tokens or 0)
    except Exception as exc:  # noqa: BLE001 - reported in-stream, as OpenAI does
        yield sse(_engine_error(exc).body())
        yield sse("[DONE]")
        return
    finally:
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()
    usage = usage or _usage(count_tokens(prompt), count_tokens("".join(text)))
    gw.metrics.proxy_tokens.labels(model, "prompt").inc(usage["prompt_tokens"])
    gw.metrics.proxy_tokens.labels(model, "completion").inc(usage["completion_tokens"])
    yield sse(fmt.chunk(finish=finish))
    if include_usage:
        yield sse(fmt.usage_chunk(usage))
    yield sse("[DONE]")


async def _engine_final(
    engine: Engine, prompt: str, params: GenParams, fmt: _Format, gw: Gateway, model: str
) -> dict[str, Any]:
    text: list[str] = []
    finish = "stop"
    usage: dict[str, int] | None = None
    gen = engine.generate(prompt, params)
    try:
        async for d in gen:
            text.append(d.text)
            if d.finish_reason is not None:
                finish = d.finish_reason
            if d.prompt_tokens is not None or d.completion_tokens is not None:
                usage = _usage(d.prompt_tokens or 0, d.completion_tokens or 0)
    except Exception as exc:  # noqa: BLE001
        raise _engine_error(exc) from exc
    finally:
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()
    content = "".join(text)
    usage = usage or _usage(count_tokens(prompt), count_tokens(content))
    gw.metrics.proxy_tokens.labels(model, "prompt").inc(usage["prompt_tokens"])
    gw.metrics.proxy_tokens.labels(model, "completion").inc(usage["completion_tokens"])
    return fmt.final(content, finish, usage, None)


async def _serve_engine(
    request: Request, gw: Gateway, model: EngineModel, prompt: str, system: str | None,
    body: ChatCompletionRequest | CompletionRequest, fmt: _Format,
    messages: list[dict[str, str]] | None = None,
) -> Any:
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    params = GenParams(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=1.0 if body.temperature is None else body.temperature,
        stop=body.stop_list(),
        system=system,
        top_p=body.top_p,
        seed=body.seed,
        messages=messages,
        raw=fmt.api == "completions",  # the prompt as written, no chat template
        tags={"run": fmt.id, "stage": "proxy", "pipeline": model.pipeline},
    )
    slot: Slot = gw.admit()
    try:
        engine = await _engine_for(gw, model)
    except BaseException:
        slot.release()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:

        async def on_close() -> None:
            slot.release()

        return ClosingEventSource(
            _engine_chunks(engine, prompt, params, fmt, include_usage, gw, body.model),
            on_close=on_close,
            ping_s=gw.settings.sse_ping_s,
            farewell=shutting_down("the engine call was stopped"),
        )
    try:
        out = await unless_disconnected(
            request, _engine_final(engine, prompt, params, fmt, gw, body.model)
        )
    except ClientGone:
        return Response(status_code=499)
    finally:
        slot.release()
    return json_response(out)


def _chat_turns(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The conversation as an engine that takes chat messages gets it: every turn, in
    order, in the roles every chat template knows: `developer` as `system`, and a `tool`
    or `function` result as a user turn saying what it is (alto does no tool calling, and
    servers refuse a tool turn without the `tool_call_id` of a call they made)."""
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role in ("tool", "function"):
            label = f"{m.role} {m.name}" if m.name else m.role
            role, text = "user", f"[{label} result]\n{m.text()}"
        else:
            role, text = ("system" if m.role == "developer" else m.role), m.text()
        if role == "user" and turns and turns[-1]["role"] == "user":
            # one user turn: templates that need roles to alternate refuse two in a row
            turns[-1]["content"] += f"\n\n{text}"
        else:
            turns.append({"role": role, "content": text})
    return turns


def _chat_prompt(messages: list[ChatMessage]) -> tuple[str, str | None]:
    """Messages -> (prompt, system) for an engine that takes one prompt."""
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer"))
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if len(turns) == 1 and turns[0].role == "user":
        return turns[0].text(), system or None
    convo = "\n".join(f"{m.role}: {m.text()}" for m in turns)
    return f"{convo}\nassistant:", system or None


# ---------------------------------------------------------------------------------------
# endpoints
# ---------------------------------------------------------------------------------------


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**CHAT_SSE, **errors(400, 401, 404, 413, 429, 500, 502, 503, 504)},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """OpenAI chat completions over a pipeline (input: the last user message) or an
    engine model. `stream: true` answers SSE `chat.completion.chunk`s ending with
    `data: [DONE]`; `stream_options.include_usage` adds the usage chunk. The header
    `X-Alto-Deadline: <seconds>` sets a pipeline run's deadline."""
    gw = gateway(request)
    target = _resolve(gw, body.model)
    fmt = _Format("chat", f"chatcmpl-{uuid.uuid4().hex[:24]}", body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if isinstance(target, PipelineSpec):
        # the input: the last user message (without one, the last message, as OpenAI's API
        # also answers conversations that hold no user turn)
        users = [m for m in body.messages if m.role == "user"] or body.messages
        text = users[-1].text()
        check_prompt(gw.settings, text, "messages")
        check_input(target, text, "messages")
        return await _serve_pipeline(request, gw, target, text, fmt, bool(body.stream),
                                     include_usage)
    prompt, system = _chat_prompt(body.messages)
    check_prompt(gw.settings, prompt + (system or ""), "messages")
    return await _serve_engine(request, gw, target, prompt, system, body, fmt,
                               _chat_turns(body.messages))


@router.post(
    "/completions",
    response_model=Completion,
    responses={**COMPLETION_SSE, **errors(400, 401, 404, 413, 429, 500, 502, 503, 504)},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    """Legacy completions over a pipeline (input: the prompt) or an engine model."""
    gw = gateway(request)
    target = _resolve(gw, body.model)
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, "exactly one prompt is supported", param="prompt",
                           code="invalid_value")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    check_prompt(gw.settings, prompt, "prompt")
    fmt = _Format("completions", f"cmpl-{uuid.uuid4().hex[:24]}", body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if isinstance(target, PipelineSpec):
        check_input(target, prompt, "prompt")
        return await _serve_pipeline(request, gw, target, prompt, fmt, bool(body.stream),
                                     include_usage)
    return await _serve_engine(request, gw, target, prompt, None, body, fmt)
