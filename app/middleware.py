"""Pure ASGI middleware: request metrics, API-key auth, rate limit and the body size limit.

Why pure ASGI (not BaseHTTPMiddleware): streamed responses (SSE) must pass through
untouched and a client disconnect must reach the endpoint as `http.disconnect`, which is
how a run gets cancelled; BaseHTTPMiddleware wraps both in ways that hide them.

Order, outermost first: metrics (sees every answer, 401/413/429 included) -> auth (a wrong
key gets 401 before the body is even read) -> rate limit (429 per key, before the body)
-> body limit (413 before FastAPI parses it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError
from app.metrics import Metrics
from app.ratelimit import RateLimit


async def _send_error(send: Send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _route_template(scope: Scope) -> str | None:
    """The template of the route a request was (or would have been) served by. A request
    that a middleware answered before routing (401, 413, 429) has no route in its scope:
    it is matched here, so it is counted under its route and not as unmatched."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", None)
    return _match(getattr(scope.get("app"), "routes", ()), scope)


def _match(routes: Sequence[Any], scope: Scope) -> str | None:
    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match != Match.FULL:
            continue
        path = getattr(candidate, "path", None)
        if path is not None:
            return str(path)
        # an included APIRouter (FastAPI keeps it whole): its own routes carry the prefix
        inner = getattr(getattr(candidate, "original_router", None), "routes", None)
        found = _match(inner, scope) if inner else None
        if found is not None:
            return found
    return None


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
            # the route template, never the raw path: unknown paths would explode cardinality
            label = _route_template(scope) or "unmatched"
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)
            if status >= 400:
                self.metrics.errors.labels(f"http_{status}").inc()


HASH_PREFIX = "sha256:"
OWNER_STATE = "alto_owner"  # scope["state"] key: the caller's key hash (request.state)
ADMIN_STATE = "alto_admin"  # scope["state"] key: True when the caller used an admin key


def key_hash(key: str | bytes) -> str:
    """The hex SHA-256 of an API key: what ALTO_API_KEYS may hold instead of the key (so
    keys are hashed at rest) and what a run records as its owner (never the key)."""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def key_digests(keys: Sequence[str], setting: str = "ALTO_API_KEYS") -> list[bytes]:
    """ALTO_API_KEYS entries -> SHA-256 digests: `sha256:<64 hex>` is taken as the hash of
    a key, anything else as the key itself. A malformed hash entry is refused at start-up
    (naming its position, not its value)."""
    out = []
    for i, key in enumerate(k.strip() for k in keys):
        if not key:
            continue
        if key.lower().startswith(HASH_PREFIX):
            digest = key[len(HASH_PREFIX):]
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise ValueError(f"{setting} entry {i} starts with {HASH_PREFIX!r} but is "
                                 "not followed by 64 hex digits")
            out.append(bytes.fromhex(digest))
        else:
            out.append(hashlib.sha256(key.encode()).digest())
    return out


class AuthMiddleware:
    """Bearer-token check on /v1/* when API keys are configured (health/metrics stay open,
    so probes and scrapers need no secret).

    The token is hashed and its digest compared with `hmac.compare_digest` against every
    configured digest, without stopping at a match: the time taken says nothing about
    which key (or which prefix) matched. The caller's key hash is put in the request
    state (`request.state.alto_owner`), which is how runs know their owner; whether it is
    one of the admin keys (ALTO_ADMIN_API_KEYS, valid API keys too) goes beside it, for
    the operator endpoints (`app.routes_admin`).
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str], admin_keys: Sequence[str] = ()) -> None:
        self.app = app
        self.admin = key_digests(admin_keys, "ALTO_ADMIN_API_KEYS")
        self.digests = [*key_digests(keys), *self.admin]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.digests or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        token = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = rest.strip()
                break
        digest = hashlib.sha256(token).digest()
        ok = admin = False
        for known in self.digests:
            ok |= hmac.compare_digest(digest, known)
        for known in self.admin:
            admin |= hmac.compare_digest(digest, known)
        if not token or not ok:
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
        state = scope.setdefault("state", {})
        state[OWNER_STATE] = digest.hex()
        state[ADMIN_STATE] = admin
        await self.app(scope, receive, send)


class RateLimitMiddleware:
    """Per-key rate limit on /v1/* (placed inside AuthMiddleware, so only authenticated
    requests spend tokens, and a flood of wrong keys cannot drain a real key's bucket).
    Without API keys, callers are told apart by client address. The limit is kept in the
    gateway's transport: shared by every replica on one Redis."""

    def __init__(self, app: ASGIApp, limit: RateLimit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        gateway = getattr(scope["app"].state, "gateway", None)
        if gateway is None:  # not started (no lifespan): nothing to keep a limit in
            await self.app(scope, receive, send)
            return
        who = (scope.get("state") or {}).get(OWNER_STATE)
        if who is None:
            client = scope.get("client")
            who = f"addr:{client[0] if client else '-'}"
        wait = await self.limit.take(gateway.transport, who)
        if wait > 0:
            await _send_error(
                send,
                ApiError(429, f"rate limit exceeded: {self.limit.rate:g} requests/s with "
                              f"bursts of {self.limit.burst:g} per API key; retry later",
                         code="rate_limit_exceeded",
                         retry_after_s=wait),
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
