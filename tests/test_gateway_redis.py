"""The gateway as a pure gateway on Redis: 503 and not-ready while a stage has no worker,
runs once workers (a Runtime on its own Redis connection, as `alto worker` would be)
are up, events kept in a Redis stream with a TTL, and resume with Redis event ids."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer, pipelines
from tests.waiting import eventually
from workers.redis_transport import RedisTransport
from workers.runner import RunnerConfig
from workers.runtime import Runtime
from workers.settings import Settings

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_gateway(redis_url: str) -> Iterator[LiveServer]:
    from app.main import create_app

    app = create_app(Settings(redis_url=redis_url, run_ttl_s=600), pipelines("toy"))
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()


async def until(predicate_coro, timeout: float = 10.0) -> None:  # noqa: ANN001
    await eventually(predicate_coro, timeout, every=0.05)


async def test_redis_gateway_end_to_end(redis_gateway: LiveServer, redis_url: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=f"{redis_gateway.url}/v1", api_key="x", max_retries=0)
    async with httpx.AsyncClient(base_url=redis_gateway.url, timeout=30) as http:
        # --- no worker yet ---------------------------------------------------------------
        r = await http.post("/v1/pipelines/toy/runs", json={"input": "a b"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_workers"
        assert "retry-after" in r.headers
        with pytest.raises(openai.InternalServerError) as info:
            await sdk.chat.completions.create(model="toy",
                                              messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 503
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["missing_workers"] == {"toy": ["split", "up", "join"]}
        assert ready.json()["checks"]["ping"] is True

        # --- workers up ------------------------------------------------------------------
        transport = RedisTransport(redis_url)
        runtime = Runtime(transport, pipelines("toy"),
                          config=RunnerConfig(heartbeat_ms=200, block_ms=50))
        await runtime.start()
        try:
            async def is_ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await until(is_ready)
            events = []
            async with aconnect_sse(http, "POST", "/v1/pipelines/toy/runs",
                                    json={"input": "over redis"}) as source:
                async for sse in source.aiter_sse():
                    events.append((sse.id, sse.event, sse.data))
            assert events[-1][1] == "result" and "OVER REDIS" in events[-1][2]
            assert all(re.fullmatch(r"\d+-\d+(\.\d+)?", i) for i, _, _ in events)  # Redis ids
            run = source.response.headers["x-alto-run"]

            resumed = []
            async with aconnect_sse(http, "GET", f"/v1/runs/{run}/events",
                                    headers={"Last-Event-ID": events[2][0]}) as source:
                async for sse in source.aiter_sse():
                    resumed.append((sse.id, sse.event, sse.data))
            assert resumed == events[3:]

            done = await sdk.chat.completions.create(
                model="toy", messages=[{"role": "user", "content": "chat over redis"}])
            assert done.choices[0].message.content == "CHAT OVER REDIS"

            r = aioredis.from_url(redis_url)
            try:
                async def has_ttl() -> bool:
                    return 0 < await r.ttl(f"alto:run:{run}:events") <= 600

                await until(has_ttl)  # the log outlives the connection, then expires
            finally:
                await r.aclose()
        finally:
            await runtime.stop()
            await transport.close()
            await sdk.close()


def test_the_redis_pool_has_room_for_every_admitted_follower(redis_url: str) -> None:
    """Each followed run holds a connection in a blocking read: with the default pool of
    64 the 65th follower queued for one (and starting runs with it)."""
    from app.main import create_app

    app = create_app(Settings(redis_url=redis_url, max_inflight_runs=300), pipelines("toy"))
    server = LiveServer(app).start()
    try:
        pool = server.gateway.transport._pool
        assert pool.max_connections >= 300 + 64
    finally:
        server.stop()
