"""Shared pytest fixtures. Keep each section self-contained; add new ones under a header.

Rules (see /work/notes/TEAM.md): real parts, no mocks. Redis tests run against a real
`redis-server` started here on a free port; nothing waits with a fixed sleep.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from orchestrator.transport import Transport

# ==========================================================================================
# Redis server
# ==========================================================================================

REDIS_START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A throw-away redis-server for the whole session; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found on PATH: install Redis >= 7.0 to run these tests")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="alto-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"redis-server exited with {proc.returncode}:\n{out}")
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not answer PING within "
                                f"{REDIS_START_TIMEOUT_S}s on port {port}")
                time.sleep(0.02)  # polling a process we cannot await; bounded by deadline
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
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
