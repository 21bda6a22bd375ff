"""Pure ASGI middleware: request metrics, API-key auth and the body size limit.

Why pure ASGI (not BaseHTTPMiddleware): streamed responses (SSE) must pass through
untouched and a client disconnect must reach the endpoint as `http.disconnect`, which is
how a run gets cancelled; BaseHTTPMiddleware wraps both in ways that hide them.

Order, outermost first: metrics (sees every answer, 401/413 included) -> auth (a wrong
key gets 401 before the body is even read) -> body limit (413 before FastAPI parses it).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError
from app.metrics import Metrics


async def _send_error(send: Send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # the route template, never the raw path: unknown paths would explode cardinality
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)
            if status >= 400:
                self.metrics.errors.labels(f"http_{status}").inc()


class AuthMiddleware:
    """Bearer-token check on /v1/* when API keys are configured (health/metrics stay open,
    so probes and scrapers need no secret)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        token = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = rest.strip()
                break
        # compare against every key so timing does not tell which prefix matched
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(token, key)
        if not ok:
            message = (
                "missing API key: send 'Authorization: Bearer <key>'"
                if not token
                else "invalid API key"
            )
            await _send_error(
                send,
                ApiError(401, message, code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"}),
            )
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes with 413, whether or not Content-Length is sent.

    The body is read here (bounded by the limit) and replayed to the app; what comes after
    it on `receive` (the client's `http.disconnect`) is passed through unchanged.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self, size: int | None) -> ApiError:
        got = f" ({size} bytes)" if size is not None else ""
        return ApiError(413, f"request body too large{got}: the limit is {self.limit} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, ApiError(400, "invalid Content-Length header",
                                                     code="invalid_header"))
                    return
                if declared > self.limit:
                    await _send_error(send, self._too_large(declared))
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _send_error(send, self._too_large(None))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
