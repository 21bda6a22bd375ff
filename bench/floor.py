"""The hop floor of the machine: one XADD seen by another process's blocked XREADGROUP.

alto's hop (stage k has its output -> stage k+1 starts on it) can never be faster than
this: a message through Redis from one process to another, with both processes (and
redis-server) woken from idle, as they are between the overhead benchmark's sequential
runs. On a shared 2-core VM the wake-ups, not Redis, dominate it. Reporting it next to
alto's hop says how much of the hop is alto's own work.

`measure()` starts a reader process (`python -m bench.floor URL STREAM N`), writes N
timestamped entries `gap_s` apart, and returns the reader's delays in ms.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import redis.asyncio as aioredis


async def _read(url: str, stream: str, n: int) -> list[float]:
    r = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        await r.xgroup_create(stream, "floor", id="$", mkstream=True)
        print("ready", flush=True)
        delays: list[float] = []
        while len(delays) < n:
            res = await r.xreadgroup("floor", "reader", {stream: ">"}, count=16, block=5_000)
            now = time.time()
            if not res:
                break  # the writer stopped: report what arrived
            for _key, entries in res:
                delays.extend((now - float(f["t"])) * 1000 for _id, f in entries)
        return delays
    finally:
        await r.delete(stream)
        await r.aclose()


async def measure(url: str, n: int = 300, gap_s: float = 0.005) -> list[float]:
    """Delays (ms) from XADD to the blocked reader having the entry, one entry at a time."""
    stream = f"alto-floor:{time.time_ns()}"
    reader = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", url, stream, str(n)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert reader.stdout is not None
        line = await asyncio.to_thread(reader.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"floor reader did not start: {line!r}")
        w = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            for _ in range(n):
                await w.xadd(stream, {"t": repr(time.time())})
                await asyncio.sleep(gap_s)
        finally:
            await w.aclose()
        out, _ = await asyncio.to_thread(reader.communicate, timeout=60)
        return [float(x) for x in json.loads(out.strip().splitlines()[-1])]
    finally:
        if reader.poll() is None:
            reader.kill()


if __name__ == "__main__":
    url_, stream_, n_ = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(asyncio.run(_read(url_, stream_, n_))), flush=True)
