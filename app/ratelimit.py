"""Per-caller request rate limit: GCRA (`orchestrator.ratelimit`) kept in the transport.

Why in the transport: the Helm chart runs two gateway replicas by default and scales them.
A limit kept in each process gave a caller up to N times its rate, N changing with the
autoscaler. On Redis the limit is one key per caller, shared by every replica, updated by
one script call (a round trip of well under a millisecond, against requests that run LLM
pipelines for seconds); embedded, it is a dict in the one process.

Callers are told apart by API key (its hash) or, without keys, by client address. The
limit fails open: if the transport cannot answer, the request goes on (and meets the same
outage where it needs the transport, with a 503) instead of a 429 nobody deserved.
"""

from __future__ import annotations

import logging
import math
import time

from orchestrator.transport import Transport

log = logging.getLogger("alto.ratelimit")


class RateLimit:
    """`rate` requests per second per caller, in bursts of up to `burst` (0 = the rate
    rounded up, at least 1)."""

    def __init__(self, rate: float, burst: int = 0) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError("rate must be a positive number")
        self.rate = rate
        self.burst = burst if burst > 0 else max(1, math.ceil(rate))
        self._warned = 0.0

    async def take(self, transport: Transport, who: str) -> float:
        """0.0 when `who` may make a request now, else the seconds until it may."""
        try:
            return await transport.take_token(f"caller:{who}", self.rate, self.burst)
        except transport.transient_errors as exc:
            now = time.monotonic()
            if now - self._warned > 10:  # once per 10 s, not once per request
                self._warned = now
                log.warning("rate limit unavailable (%s: %s); requests are let through",
                            type(exc).__name__, exc)
            return 0.0
