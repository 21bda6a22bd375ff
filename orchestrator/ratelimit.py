"""The rate limit's arithmetic: GCRA (the generic cell rate algorithm), the token bucket
written as one number per caller.

Why GCRA: a bucket needs two numbers (tokens, last refill) read and written together;
GCRA keeps only the *theoretical arrival time* (TAT) of the caller's next request, so a
shared limiter is one key in Redis, updated by one script call, and an idle caller's key
can simply expire. With `rate` r and `burst` b it admits exactly what a bucket of b tokens
refilled at r per second admits: b requests at once, then one every 1/r seconds.

Both transports use this: the embedded one calls `gcra` directly, the Redis one runs the
same lines in Lua (`workers.redis_transport._RATE`) so that every gateway replica shares
one limit per caller.
"""

from __future__ import annotations


def gcra(tat: float | None, now: float, rate: float, burst: int) -> tuple[float | None, float]:
    """One request at `now` by a caller whose TAT is `tat` (None: never seen, or expired).
    Returns (the new TAT, 0.0) when it is allowed, else (None, seconds until it would be):
    a refused request changes nothing."""
    if rate <= 0 or burst < 1:
        raise ValueError("rate must be positive and burst at least 1")
    interval = 1.0 / rate
    new_tat = max(tat if tat is not None else now, now) + interval
    over = new_tat - now - burst * interval
    if over > (burst + 2) * 1e-9:  # each step's float rounding adds up over a burst
        return None, over
    return new_tat, 0.0
