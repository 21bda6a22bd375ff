"""Per-key request rate limit: one token bucket per API key (by its hash).

Why in-process: a Redis round trip per request would cost more than most requests it
guards, and a bucket is only an abuse brake, not an accounting system. The price: with N
gateway replicas a key gets up to N times the rate (documented in docs/API.md); set the
rate per replica accordingly.

Memory stays bounded: at most `max_buckets` buckets are kept (least recently used
dropped first). With API keys configured there is one bucket per configured key, so the
bound is never reached; without keys callers are told apart by client address, and a
dropped bucket only means that address starts again with a full burst.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets of `burst` tokens refilled at `rate` tokens per second."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_buckets: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = float(burst if burst > 0 else max(1, math.ceil(rate)))
        self.max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, who: str) -> float:
        """Take one token for `who`: 0.0 when allowed, else the seconds until one is due."""
        now = self._clock()
        bucket = self._buckets.get(who)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            self._buckets[who] = bucket
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(who)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)
