"""Every error the gateway returns has OpenAI's shape, so the official SDKs raise the
exception class that matches the status (BadRequestError, AuthenticationError,
NotFoundError, RateLimitError, InternalServerError, ...) and print a useful message.

`{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}`

Validation errors name the offending field in `param` (dotted path, list indices in
brackets, e.g. `messages[0].role`), which is what OpenAI does and what a client needs to
fix its request without reading server logs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("alto.gateway")

# OpenAI's `type` values by status (what its API answers for the same situations)
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """Raised anywhere in a handler; rendered as an OpenAI-shaped error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        headers: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        """`retry_after_s`: for 429/503, the Retry-After header (whole seconds, at least 1)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        fallback = "server_error" if status >= 500 else "invalid_request_error"
        self.type = type or _TYPES.get(status, fallback)
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> Response:
        from app.streaming import json_response  # a message may carry a lone surrogate

        return json_response(self.body(), status=self.status, headers=self.headers)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None  # noqa: A002
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def field_path(loc: Sequence[Any]) -> str | None:
    """pydantic's error location -> `messages[0].role` (dropping the leading 'body')."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            # pydantic names union branches after their type ('str', 'list[...]'): not a field
            if "[" in str(p) or str(p) in ("str", "int", "float", "bool", "function-after"):
                continue
            out += f".{p}" if out else str(p)
    return out or None


# where a resume position is given (GET /v1/runs/{id}/events); the document keeps their
# pattern, and a value that does not match it gets the API's own code for that
_EVENT_ID_LOCS = {("header", "Last-Event-ID"), ("query", "after")}
# what Starlette answers when a body cannot be decoded at all (invalid UTF-8, nesting
# deeper than the parser's recursion limit): the same code as any JSON that does not parse
_UNPARSABLE_BODY = "There was an error parsing the body"


def not_json_body(exc: RequestValidationError, content_type: str | None) -> ApiError | None:
    """The 400 for a body FastAPI left unparsed because its Content-Type is not JSON's
    (curl's `-d` sends application/x-www-form-urlencoded): the body reaches validation as
    raw bytes, and pydantic's own words ("Input should be a valid dictionary") never said
    why. Not parsed anyway (vLLM's FastAPI server does not either): a browser may send a
    form or text/plain body cross-site without a preflight, so reading it as JSON would
    let any web page start runs on an unauthenticated local gateway."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    # the body itself, or a union's branch (loc body.<Model>): a field inside a parsed
    # body is never bytes
    if tuple(first.get("loc", ()))[:1] != ("body",) or not isinstance(first.get("input"), bytes):
        return None
    got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return ApiError(400, "the request body must be JSON sent with Content-Type: "
                    f"application/json; this request has {got} (curl -d sends "
                    "application/x-www-form-urlencoded: add -H 'Content-Type: application/json')",
                    code="invalid_json")


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> ApiError:
    """`content_type`: the request's, named when the body was not read as JSON for it."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        why = first.get("ctx", {}).get("error", "parse error")
        return ApiError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
    unread = not_json_body(exc, content_type)
    if unread is not None:
        return unread
    param = field_path(first.get("loc", ()))
    loc = tuple(first.get("loc", ()))
    if loc in _EVENT_ID_LOCS and first.get("type") == "string_pattern_mismatch":
        return ApiError(400, f"not an event id of this API: {first.get('input')!r}",
                        code="invalid_event_id", param=param)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = f"missing required field {param!r}" if param else "missing request body"
    elif param:
        message = f"invalid value for {param!r}: {msg}"
    else:
        message = f"invalid request body: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return ApiError(400, message, param=param, code=code)


def install(app: FastAPI) -> None:
    """Route every error path (ours, FastAPI's, Starlette's, unexpected) to one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc, request.headers.get("content-type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 400 and message == _UNPARSABLE_BODY:
            code, message = "invalid_json", "the request body is not valid JSON (or not UTF-8)"
        err = ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))
        return err.response()

    async def _bus_down(request: Request, exc: Exception) -> JSONResponse:
        # the client learns what is wrong, not where: no host, port or credentials (the
        # log says more; redis-py never puts the password in its messages)
        log.warning("message bus unavailable on %s %s: %s: %s", request.method,
                    request.url.path, type(exc).__name__, exc)
        return ApiError(503, f"the message bus (Redis) is unavailable: {type(exc).__name__}",
                        code="transport_unavailable",
                        retry_after_s=1).response()

    # NoScriptError: Redis restarting again between the transport's script retries (the
    # next request loads it again), see RedisTransport.transient_errors
    for bus_error in (RedisConnectionError, RedisTimeoutError, NoScriptError):
        app.add_exception_handler(bus_error, _bus_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}", code="internal").response()
