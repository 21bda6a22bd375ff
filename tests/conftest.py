"""Shared pytest fixtures. Keep each section self-contained; add new ones under a header.

Rules (see /work/notes/TEAM.md): real parts, no mocks. Redis tests run against a real
`redis-server` started here on a free port; nothing waits with a fixed sleep.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from bench.procs import free_port, start_redis, stop_process
from orchestrator.transport import Transport
from tests import loop_stalls

loop_stalls.install()  # only with ALTO_TEST_LOOP_STALL_MS set (a flake hunt)

# ==========================================================================================
# Redis server
# ==========================================================================================

REDIS_START_TIMEOUT_S = 10.0

_free_port = free_port  # the name other test modules import


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A throw-away redis-server for the whole session; yields its URL."""
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="alto-redis-")
    try:
        try:
            proc = start_redis(port, workdir=workdir, timeout_s=REDIS_START_TIMEOUT_S,
                               capture=True)
        except RuntimeError as e:
            pytest.fail(str(e))
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_process(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The session server's URL, emptied (FLUSHALL) before each test."""
    client = redis.Redis.from_url(redis_server)
    try:
        client.flushall()
    finally:
        client.close()
    yield redis_server


# ==========================================================================================
# Transports (one fixture, both implementations: the conformance suite runs on each)
# ==========================================================================================

TRANSPORT_KINDS = [
    "embedded",
    pytest.param("redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=TRANSPORT_KINDS)
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    """A fresh, empty transport of each kind; closed after the test."""
    t: Transport
    if request.param == "embedded":
        from orchestrator.embedded import EmbeddedTransport

        t = EmbeddedTransport()
    else:
        from workers.redis_transport import RedisTransport

        url = request.getfixturevalue("redis_url")
        t = RedisTransport(url)
    try:
        yield t
    finally:
        await t.close()


@pytest.fixture
async def redis_t(redis_url: str) -> AsyncIterator[Any]:
    """A Redis transport on this test's database, for tests that run real worker
    processes against it (those are Redis-only, unlike the `transport` fixture)."""
    from workers.redis_transport import RedisTransport

    t = RedisTransport(redis_url)
    try:
        yield t
    finally:
        await t.close()
