"""A gateway stopped (SIGTERM, as in a rolling update) while it streams an OpenAI-format
answer ends that stream with an error chunk and `[DONE]`: the stream used to stop
mid-answer, which an OpenAI client cannot tell from a whole answer. Real `alto serve`
process, real socket, real signal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.gateway_fixtures import REPO, free_port
from tests.waiting import eventually_sync

PIPELINE = REPO / "tests" / "gateway_pipelines" / "slow.yaml"


@contextlib.contextmanager
def serving(**popen: Any) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`alto serve` of the slow pipeline on a free port, ready (its /readyz answers 200);
    killed at the end if the test has not ended it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "-p", str(PIPELINE), "--port", str(port),
         "--host", "127.0.0.1"], cwd=REPO, text=True, **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, "alto serve exited"
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert eventually_sync(ready, timeout=60, every=0.1), "alto serve did not start"
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def stream_through_sigterm(
    url: str, proc: subprocess.Popen[str], path: str, body: dict[str, Any], *,
    started: Callable[[list[str]], bool], headers: dict[str, str] | None = None,
) -> tuple[list[str], list[BaseException]]:
    """POST `body` to `path` as a stream, SIGTERM the server once `started(lines so far)`,
    and read the stream to its end: its lines, and what reading it raised (if anything).
    The server must then exit 128 + SIGTERM, through alto's exit (atexit runs: batched
    spans are sent), not killed by the signal uvicorn re-raises after shutting down."""
    lines: list[str] = []
    failure: list[BaseException] = []
    flowing = threading.Event()

    def read() -> None:
        try:
            with httpx.stream("POST", f"{url}{path}", json=body, headers=headers,
                              timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if started(lines):
                        flowing.set()
        except BaseException as exc:  # noqa: BLE001 - the caller asserts on it
            failure.append(exc)
            flowing.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert flowing.wait(60), "the stream did not start"
    proc.send_signal(signal.SIGTERM)
    reader.join(60)
    assert not reader.is_alive(), "the stream did not end"
    assert proc.wait(30) == 128 + signal.SIGTERM
    return lines, failure


@pytest.mark.parametrize("model", ["slow", "slow/default"])  # a pipeline; an engine model
def test_sigterm_ends_an_open_stream_with_an_error_and_done(model: str) -> None:
    env = {**os.environ, "ALTO_SIM_TIME_SCALE": "1.0"}  # calibrated speed: seconds of output
    body = {"model": model, "stream": True, "max_tokens": 20000,
            "messages": [{"role": "user", "content": "400"}]}

    def data(lines: list[str]) -> list[str]:
        return [x[len("data: "):] for x in lines if x.startswith("data: ")]

    with serving(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as (url, proc):
        lines, failure = stream_through_sigterm(
            url, proc, "/v1/chat/completions", body, started=lambda got: len(data(got)) >= 3)
    assert failure == [], failure
    datas = data(lines)
    assert datas[-1] == "[DONE]", datas[-3:]
    last = json.loads(datas[-2])
    assert last["error"]["code"] == "server_shutting_down", datas[-3:]
    chunks = [json.loads(d) for d in datas[:-2]]
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_serve_ends_with_128_plus_the_signal(sig: signal.Signals) -> None:
    """What a shell reports for a process the signal ended, after alto's own cleanup:
    SIGINT used to exit 0 (uvicorn.run swallows the KeyboardInterrupt it re-raises),
    SIGTERM to die by the signal (-15)."""
    with serving(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as (_, proc):
        proc.send_signal(sig)
        assert proc.wait(30) == 128 + sig
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def test_sigterm_ends_a_native_stream_cleanly() -> None:
    """A native stream open at shutdown ends its body cleanly. It was cut mid-chunk:
    clients raised an incomplete-body error and the server logged an ERROR per open
    stream. Embedded, the run ends with the process: an `error` event says so, without an
    id (on Redis a comment and a `retry` hint say to resume elsewhere instead)."""
    env = {**os.environ, "ALTO_SIM_TIME_SCALE": "1.0"}
    with serving(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as (url, proc):
        lines, failure = stream_through_sigterm(
            url, proc, "/v1/pipelines/slow/runs", {"input": "400"},
            headers={"Accept": "text/event-stream"},
            started=lambda got: sum(x.startswith("event: partial") for x in got) >= 2)
        log = proc.stdout.read() if proc.stdout else ""
    assert failure == [], failure
    assert "event: result" not in lines
    at = lines.index("event: error")
    assert json.loads(lines[at + 1][len("data: "):])["code"] == "server_shutting_down"
    assert not lines[at - 1].startswith("id:")  # no id: the last id is the run's own
    assert "ASGI callable returned without completing response" not in log


def test_on_redis_the_native_farewell_says_to_resume() -> None:
    from app.streaming import native_farewell

    [event] = native_farewell("r", resumable=True)
    text = event.encode().decode()
    assert text.startswith(": the server is shutting down") and "retry: 1000" in text
    assert "event:" not in text and "data:" not in text  # no event: the run goes on
