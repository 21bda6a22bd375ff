"""The `openai` engine: any OpenAI-compatible server (vLLM, llama.cpp, SGLang, a hosted API).

Why these choices:
- One `httpx.AsyncClient` per engine instance, with a connection pool sized to the engine's
  capacity: the runner never has more than `capacity` requests in flight, so every request
  gets a pooled keep-alive connection and no request waits on the pool.
- Retries, with exponential backoff, only while nothing has been generated: when the
  connection could not be made at all (connect error or connect timeout: the server has
  received nothing), and when the server answered a retryable error status instead of a
  stream (408, 409, 429 and 5xx, as the `openai` SDK retries them; `Retry-After` and
  `x-should-retry` honoured): a fleet behind a load balancer answers 502/503 during a
  rolling restart, a hosted API 429 under its rate limit, and failing the whole run for
  that would be wrong. Once a byte of a 200 stream has arrived, part of the output may
  already have been routed downstream, so a broken stream raises `EngineStreamError` and
  the runner decides (a silent re-send would duplicate the units it already emitted).
- Usage: the request asks for `stream_options.include_usage`, and the usage chunk the server
  sends last becomes the counts on the final `Delta`.
- Cancellation: closing the generator (or cancelling the task iterating it) closes the
  streaming response, which closes its connection; the server sees the disconnect and stops
  generating.

Options (EngineSpec extras): base_url, api_key (fallback: ALTO_OPENAI_BASE_URL,
ALTO_OPENAI_API_KEY), api (chat | completions), capacity, connect_timeout_s, read_timeout_s,
retries, backoff_s, backoff_max_s, headers, extra_body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from orchestrator.engine import Delta, GenParams
from orchestrator.spec import EngineSpec
from workers.engines.common import (
    EngineConnectError,
    EngineError,
    EngineHTTPError,
    EngineStreamError,
    MissingSetting,
    Options,
    chat_messages,
    plain_prompt,
)
from workers.redact import redact_url

log = logging.getLogger("alto.engine.openai")

BASE_URL_ENV = "ALTO_OPENAI_BASE_URL"
API_KEY_ENV = "ALTO_OPENAI_API_KEY"
DEFAULT_CAPACITY = 16
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
RETRY_AFTER_MAX_S = 30.0  # a longer Retry-After is cut to this (the stage's timeout_s and
# the run's deadline bound the whole call anyway)


def _where(request: httpx.Request) -> str:
    """What an error message says of a request: its method and path, not its host. Error
    messages reach API clients (a run's error, a proxied call's 502); the server's address
    is internal, and goes to the log instead."""
    return f"{request.method} {request.url.path}"


def _retryable(response: httpx.Response) -> bool:
    """Whether an error answer may be sent again: the server's `x-should-retry` when it
    says, else the statuses the `openai` SDK retries (timeout, conflict, rate limit, 5xx)."""
    should = response.headers.get("x-should-retry", "").lower()
    if should in ("true", "false"):
        return should == "true"
    status = response.status_code
    return status in (408, 409, 429) or status >= 500


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asks to wait: `retry-after-ms` (OpenAI's) or `Retry-After` in
    seconds; None when absent, unparsable or negative (an HTTP-date is not worth parsing
    for a retry measured in seconds)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = response.headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if value >= 0 and math.isfinite(value):
            return value
    return None


def split_urls(value: Any) -> list[str]:
    """URLs from one URL, a list of them or a comma-separated string (what fits an
    environment variable); [] for anything else."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(u, str) for u in items):
        return []
    return [u.strip() for u in items if u.strip()]


def servers(spec: EngineSpec) -> list[str]:
    """The servers of an engine's instances: its `base_url` option (one URL, a list, or a
    comma-separated string), else ALTO_OPENAI_BASE_URL's; [] if none (or malformed:
    `from_spec` names that error). Instance i talks to the i-th (modulo their number), so
    each instance's prompts meet one server's prefix cache: a fleet behind one
    load-balanced URL would scatter them."""
    return split_urls(spec.options().get("base_url") or os.environ.get(BASE_URL_ENV, ""))


def api_root(base_url: str) -> str:
    """Normalise a base URL to the API root ending in /v1 (both forms are common in configs)."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else f"{root}/v1"


class OpenAIEngine:
    """Streams completions from an OpenAI-compatible HTTP server."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        api: str = "chat",
        name: str = "openai",
        capacity: int = DEFAULT_CAPACITY,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        backoff_max_s: float = 4.0,
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        event_hooks: Mapping[str, list[Any]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if api not in ("chat", "completions"):
            raise ValueError(f"openai engine: api must be 'chat' or 'completions', got {api!r}")
        if capacity < 1:
            raise ValueError(f"openai engine: capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.model = model
        self.api = api
        # the server answered a raw completion with 404/405: it serves chat only (hosted chat
        # models have no /completions), so raw prompts go as chat messages from then on
        self._chat_only = False
        self.root = api_root(base_url)
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.extra_body = dict(extra_body or {})
        self._headers = {"Accept": "text/event-stream", **dict(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=read_timeout_s,
            pool=read_timeout_s,
        )
        self._event_hooks = {k: list(v) for k, v in (event_hooks or {}).items()}
        self._sleep = sleep  # the waits between retries (a test records them)
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    @classmethod
    def from_spec(cls, spec: EngineSpec, instance: int = 0) -> OpenAIEngine:
        opts = Options("openai", spec.options())
        urls = servers(spec)
        given = opts.raw("base_url")
        if not urls and given not in (None, "", []):
            raise ValueError(
                f"openai engine option 'base_url' must be a URL or a list of URLs, got {given!r}"
            )
        if not urls:
            raise MissingSetting(
                f"openai engine: no base_url (set the engine option or {BASE_URL_ENV})"
            )
        base_url = urls[instance % len(urls)]
        api_key = opts.text("api_key") or os.environ.get(API_KEY_ENV) or None
        capacity = spec.capacity or opts.integer("capacity", DEFAULT_CAPACITY, minimum=1)
        opts.raw("capacity")  # accepted even when spec.capacity wins
        engine = cls(
            base_url=base_url,
            api_key=api_key,
            model=spec.model or opts.text("model"),
            api=opts.choice("api", ("chat", "completions"), "chat"),
            name=f"openai:{spec.model or 'default'}#{instance}",
            capacity=capacity,
            connect_timeout_s=opts.number("connect_timeout_s", 5.0),
            read_timeout_s=opts.number("read_timeout_s", 120.0),
            retries=opts.integer("retries", 3, minimum=0),
            backoff_s=opts.number("backoff_s", 0.25),
            backoff_max_s=opts.number("backoff_max_s", 4.0),
            headers={str(k): str(v) for k, v in opts.mapping("headers").items()},
            extra_body=opts.mapping("extra_body"),
        )
        opts.check_unknown()
        return engine

    # -- Engine protocol ---------------------------------------------------------------------
    async def start(self) -> None:
        """Open the connection pool (connections themselves are made on first use)."""
        if self._closed:
            raise EngineError(f"{self.name} is closed")
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers,
                timeout=self._timeout,
                limits=httpx.Limits(
                    max_connections=self.capacity, max_keepalive_connections=self.capacity
                ),
                event_hooks=self._event_hooks,
            )

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def request_body(self, prompt: str, params: GenParams,
                     api: str | None = None) -> dict[str, Any]:
        """The JSON body for one streaming request (public so tests and tools can inspect it)."""
        body: dict[str, Any] = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.seed is not None:
            body["seed"] = params.seed
        if (api or self._api(params)) == "chat":
            body["messages"] = chat_messages(prompt, params)
        else:
            body["prompt"] = plain_prompt(prompt, params)
        body.update(self.extra_body)
        return body

    def _api(self, params: GenParams) -> str:
        """The server's completions API for a raw prompt (a client's `/v1/completions`,
        which must not get a chat template), else the one configured (`api`)."""
        return "completions" if params.raw and not self._chat_only else self.api

    async def generate(self, prompt: str, params: GenParams) -> AsyncIterator[Delta]:
        if self._client is None:
            await self.start()
        assert self._client is not None
        api = self._api(params)
        try:
            response = await self._open(self._request(prompt, params, api))
        except EngineHTTPError as exc:
            if not (api != self.api and exc.status in (404, 405)):
                raise
            response = await self._open(self._request(prompt, params, self.api))
            if not self._chat_only:  # chat answered where /completions did not: remember it
                log.warning("%s: the server has no /completions (HTTP %d); raw prompts go to "
                            "/chat/completions as a user message", self.name, exc.status)
                self._chat_only = True
        try:
            async for delta in self._deltas(response):
                yield delta
        finally:
            # on cancel/close mid-stream this drops the connection: the server sees it
            await response.aclose()

    # -- internals ---------------------------------------------------------------------------
    def _request(self, prompt: str, params: GenParams, api: str) -> httpx.Request:
        assert self._client is not None
        path = "/chat/completions" if api == "chat" else "/completions"
        return self._client.build_request("POST", f"{self.root}{path}",
                                          json=self.request_body(prompt, params, api))

    async def _open(self, request: httpx.Request) -> httpx.Response:
        """A 200 streaming response. Nothing has been generated before it, so a failed try
        is sent again, with exponential backoff, up to `retries` times in all (one budget
        for both causes): when no connection could be made, and when the server answered
        a retryable status (after its Retry-After when it names one). Other statuses, and
        a timeout once the request may have reached the server, raise at once."""
        assert self._client is not None
        attempt = 0
        while True:
            backoff = min(self.backoff_s * 2**attempt, self.backoff_max_s)
            try:
                response = await self._client.send(request, stream=True)
            except _CONNECT_ERRORS as exc:
                if attempt >= self.retries:
                    log.warning("%s: cannot connect to %s after %d attempt(s): %r", self.name,
                                redact_url(str(request.url)), attempt + 1, exc)
                    raise EngineConnectError(
                        f"{self.name}: cannot connect to its server ({_where(request)}) "
                        f"after {attempt + 1} attempt(s): {type(exc).__name__}"
                    ) from exc
                await self._sleep(backoff)
                attempt += 1
                continue
            except httpx.TimeoutException as exc:
                # the request may have reached the server: never re-sent
                log.warning("%s: %s timed out: %r", self.name, redact_url(str(request.url)), exc)
                raise EngineError(
                    f"{self.name}: {_where(request)} timed out ({type(exc).__name__})"
                ) from exc
            except httpx.TransportError as exc:
                log.warning("%s: %s failed: %r", self.name, redact_url(str(request.url)), exc)
                raise EngineError(
                    f"{self.name}: {_where(request)} failed ({type(exc).__name__})"
                ) from exc
            if response.status_code == 200:
                return response
            try:
                error = await self._http_error(response, attempt + 1)
            finally:
                await response.aclose()
            if attempt >= self.retries or not _retryable(response):
                raise error
            await self._sleep(min(error.retry_after, RETRY_AFTER_MAX_S)
                              if error.retry_after is not None else backoff)
            attempt += 1

    async def _http_error(self, response: httpx.Response, attempts: int = 1) -> EngineHTTPError:
        try:
            raw = await response.aread()
        except httpx.HTTPError:
            raw = b""
        detail = _error_message(raw) or response.reason_phrase
        status = response.status_code
        where = _where(response.request)
        log.warning("%s: HTTP %d from %s: %s", self.name, status,
                    redact_url(str(response.url)), detail)
        if status in (401, 403):
            message = (
                f"{self.name}: authentication failed (HTTP {status}) at {where}: "
                f"{detail}; check the engine's api_key option or {API_KEY_ENV}"
            )
        else:
            message = f"{self.name}: HTTP {status} from {where}: {detail}"
        if attempts > 1:
            message += f" (after {attempts} attempts)"
        return EngineHTTPError(message, status=status, retry_after=_retry_after(response))

    async def _deltas(self, response: httpx.Response) -> AsyncIterator[Delta]:
        usage: dict[str, Any] = {}
        finish: str | None = None
        done = False
        emitted = 0
        try:
            async for event in EventSource(response).aiter_sse():
                if event.data.strip() == "[DONE]":
                    done = True
                    break
                if not event.data.strip():
                    continue
                try:
                    chunk = json.loads(event.data)
                except ValueError:
                    raise EngineStreamError(
                        f"{self.name}: malformed event from server: {event.data[:200]!r}"
                    ) from None
                if event.event == "error" or (isinstance(chunk, dict) and "error" in chunk):
                    raise EngineStreamError(
                        f"{self.name}: server error mid-stream: {_error_message(event.data)}"
                    )
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = _choice_text(choice)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                    if text:
                        emitted += 1
                        yield Delta(text)
        except SSEError as exc:
            raise EngineError(
                f"{self.name}: server did not answer with an event stream: {exc}"
            ) from exc
        except httpx.TransportError as exc:
            raise EngineStreamError(
                f"{self.name}: stream broke after {emitted} delta(s) ({exc!r}); not retried "
                "because part of the output was already delivered"
            ) from exc
        if not done and finish is None:
            raise EngineStreamError(
                f"{self.name}: stream ended early after {emitted} delta(s) without a finish "
                "reason; not retried because part of the output was already delivered"
            )
        details = usage.get("prompt_tokens_details") or {}
        yield Delta(
            "",
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            cached_tokens=details.get("cached_tokens") if isinstance(details, dict) else None,
            finish_reason=finish or "stop",
        )


def _choice_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _error_message(raw: bytes | str) -> str:
    """Best-effort human message out of an error body (OpenAI, FastAPI or plain text)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return text.strip()[:500]
