"""`input_required`: a pipeline that needs an input refuses a blank one at the door.
FacTool given "" or "   " fact-checked its claims prompt's worked example (QA); an empty
input is now a 400 `empty_input` naming the field, and `alto run` exits 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import FACTOOL_SIM, REPO, LiveServer, assert_error_shape, make_server


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    s = make_server(("factool", "toy"))
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/pipelines/factool/runs", {"input": "   "}, "input"),
    # format characters str.strip keeps: zero-width space and joiners, a byte-order mark
    ("/v1/pipelines/factool/runs", {"input": "\u200b\u200c\u200d \ufeff"}, "input"),
    ("/v1/chat/completions",
     {"model": "factool", "messages": [{"role": "user", "content": ""}]}, "messages"),
    ("/v1/completions", {"model": "factool", "prompt": "\n\t"}, "prompt"),
])
def test_a_blank_input_is_refused(server: LiveServer, path: str, body: dict[str, object],
                                  param: str) -> None:
    started = server.gateway.metrics.runs_started.labels("factool")._value.get()
    err = assert_error_shape(httpx.post(f"{server.url}{path}", json=body, timeout=30),
                             400, "empty_input")
    assert err["param"] == param and "factool" in err["message"]
    assert server.gateway.metrics.runs_started.labels("factool")._value.get() == started


def test_a_pipeline_without_the_flag_takes_a_blank_input(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/pipelines/toy/runs", json={"input": " "}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text


def test_alto_run_refuses_a_blank_input() -> None:
    proc = subprocess.run([sys.executable, "-m", "app.cli", "run", str(FACTOOL_SIM), "-i", " "],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs an input" in " ".join(proc.stderr.split())
