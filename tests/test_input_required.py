"""`input_required`: a pipeline that needs an input refuses a blank one at the door.
FacTool given "" or "   " fact-checked its claims prompt's worked example (QA); an empty
input is now a 400 `empty_input` naming the field, and `alto run` exits 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from orchestrator.template import is_blank
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
    # invisible fillers of other categories: Hangul filler, Braille blank, variation selector
    ("/v1/pipelines/factool/runs", {"input": "\u3164\u2800\ufe0f"}, "input"),
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


# Whitespace and invisible characters: an input of only these shows the model nothing.
INVISIBLE = [" ", "\t\n", "\u3000", "\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad",
             "\u180e", "\U000e0041", "\u2800", "\u3164", "\u115f", "\u1160", "\uffa0", "\u034f",
             "\ufe0f", "\U000e0100"]
# Format characters (category Cf) that are drawn: prepended concatenation marks, such as
# the Arabic end of ayah and number sign.
VISIBLE_FORMAT = ["\u0600", "\u0601", "\u0602", "\u0603", "\u0604", "\u0605", "\u06dd",
                  "\u070f", "\u0890", "\u0891", "\u08e2", "\U000110bd", "\U000110cd"]


@pytest.mark.parametrize("char", INVISIBLE)
def test_is_blank_over_invisible_characters(char: str) -> None:
    assert is_blank(char) and is_blank(f" {char}\u200b{char}\n")


@pytest.mark.parametrize("char", [*VISIBLE_FORMAT, "a", "\u0301", "\U0001f600"])
def test_is_blank_not_over_visible_characters(char: str) -> None:
    assert not is_blank(char) and not is_blank(f" {char}\u200b\u3164\n")


def test_a_pipeline_without_the_flag_takes_a_blank_input(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/pipelines/toy/runs", json={"input": " "}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text


def test_alto_run_refuses_a_blank_input() -> None:
    proc = subprocess.run([sys.executable, "-m", "app.cli", "run", str(FACTOOL_SIM), "-i", " "],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs an input" in " ".join(proc.stderr.split())
