"""Gateway test fixtures: a real uvicorn server on a free port, in a background thread.

Why a thread (not a subprocess) for most tests: the test can then look at the very
objects serving it — the runtime's SimEngine instances, the gateway's in-flight count —
and wait on their conditions in the server's own event loop (`LiveServer.call`), which is
how cancellation is proven without sleeps. The README test starts `alto serve` as a
subprocess instead, exactly as a user would.

Also here: the sim responders of tests/gateway_pipelines/slow.yaml, which record every
engine call per run (`CALLS`), so a test can tell whether a cancelled run got any more.

Use from a test module with `from tests.gateway_fixtures import *  # noqa: F403`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import uvicorn

from bench.procs import free_port
from orchestrator.engine import GenParams
from orchestrator.spec import PipelineSpec, load_pipeline
from tests.waiting import eventually_sync
from workers.settings import Settings

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "tests" / "gateway_pipelines"
FACTOOL_SIM = REPO / "examples" / "factool" / "pipeline.sim.yaml"
START_TIMEOUT_S = 30.0
API_KEY = "sk-alto-test"

__all__ = [
    "API_KEY",
    "CALLS",
    "FACTOOL_SIM",
    "LiveServer",
    "PIPELINES",
    "REPO",
    "free_port",
    "gateway",
    "make_server",
    "pipelines",
    "sim_engines",
    "wait_for",
]

# ------------------------------------------------------------------------------------------
# responders (referenced by tests/gateway_pipelines/slow.yaml)
# ------------------------------------------------------------------------------------------

CALLS: dict[str, list[str]] = defaultdict(list)  # run id -> stage of each engine call
_CALLS_LOCK = threading.Lock()


def _record(params: GenParams) -> None:
    with _CALLS_LOCK:
        CALLS[str(params.tags.get("run", ""))].append(str(params.tags.get("stage", "")))


def numbered_lines(prompt: str, params: GenParams) -> str:
    """'line 1\\n' .. 'line N\\n' for the N in <n>N</n> (1 when it is not a number)."""
    _record(params)
    m = re.search(r"<n>\s*(\d{1,6})\s*</n>", prompt)
    n = int(m.group(1)) if m else 1
    return "".join(f"line {i}\n" for i in range(1, n + 1))


def echo_line(prompt: str, params: GenParams) -> str:
    _record(params)
    m = re.search(r"<line>(.*?)</line>", prompt, re.S)
    return f"echo {m.group(1).strip() if m else ''}"


# ------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _env(values: dict[str, str | None]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Server(uvicorn.Server):
    """uvicorn.Server that says when startup is over and which loop it runs on."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


class LiveServer:
    def __init__(self, app: Any, *, env: dict[str, str | None] | None = None) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            timeout_graceful_shutdown=3,
        )
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn:{self.port}",
                                       daemon=True)

    def start(self) -> LiveServer:
        # the env is read while the lifespan builds engines, which ends before `ready`
        with _env(self.env):
            self.thread.start()
            if not self.server.ready.wait(START_TIMEOUT_S):
                raise RuntimeError(f"uvicorn did not start within {START_TIMEOUT_S} s")
        if not self.server.started:
            raise RuntimeError("uvicorn failed to start (see the log above)")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
        """Run `fn()` on the server's event loop (where its engines live) and wait."""
        assert self.server.loop is not None
        return asyncio.run_coroutine_threadsafe(_call(fn), self.server.loop).result(timeout)


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def pipelines(*names: str) -> list[PipelineSpec]:
    """Specs by short name: 'factool' (the sim example) or a file in gateway_pipelines/."""
    out = []
    for name in names:
        path = FACTOOL_SIM if name == "factool" else PIPELINES / f"{name}.yaml"
        out.append(load_pipeline(path))
    return out


def make_server(
    names: tuple[str, ...],
    *,
    time_scale: float = 0.001,
    **settings: Any,
) -> LiveServer:
    """A started embedded-mode server for these pipelines; every sim engine runs at
    `time_scale` (1.0 = the calibrated real-time speed)."""
    from app.main import create_app

    app = create_app(Settings(**settings), pipelines(*names))
    return LiveServer(app, env={"ALTO_SIM_TIME_SCALE": str(time_scale)}).start()


def sim_engines(server: LiveServer, pipeline: str) -> list[Any]:
    """The SimEngine instances the server's runtime built for `pipeline`'s stages."""
    rt = server.gateway.runtime
    return [e for (key, _), e in rt.engines.items() if key.startswith(f"{pipeline}:")]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition another thread makes true, up to `timeout` seconds."""
    if not eventually_sync(predicate, timeout):
        raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def idle(server: LiveServer) -> None:
    """Until no run holds an admission slot, so a test's limits start from zero."""
    wait_for(lambda: server.gateway.inflight == 0, what="earlier runs to release their slots")


# ------------------------------------------------------------------------------------------
# clients and the error shape every /v1 failure has
# ------------------------------------------------------------------------------------------


def sdk(server: LiveServer, key: str = API_KEY) -> openai.OpenAI:
    """The OpenAI SDK against `server`, without retries (a test sees the first answer)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error_shape(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The OpenAI error envelope, exactly its four fields, with `code` and a message."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]
    return err  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def gateway() -> Iterator[LiveServer]:
    """The default server: embedded, fast sim engines, every test pipeline, no API keys."""
    server = make_server(("factool", "toy", "fanout", "slow"), resume_grace_s=30.0)
    try:
        yield server
    finally:
        server.stop()
