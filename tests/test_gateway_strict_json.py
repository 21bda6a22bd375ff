"""What the gateway sends is strict JSON (RFC 8259), whatever a stage returns: a NaN or
an infinity in a unit is `null` to clients (JavaScript's JSON.parse and most parsers
refuse a bare `NaN`; the OpenAI endpoints used to send one), as the native API's typed
fields already had it. A unit JSON cannot hold at all fails its run with a message that
says so, not the encoder's TypeError."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from orchestrator.spec import parse_pipeline
from orchestrator.transport import Transport
from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer, make_server
from tests.inprocess import run_texts
from workers.runner import RunnerConfig


def strict(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant} in {text[:200]}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    s = make_server(("scores", "scored", "notjson"))
    try:
        yield s
    finally:
        s.stop()


CHAT = {"model": "scores", "messages": [{"role": "user", "content": "a b"}]}
NULLED = {"score": None, "high": None, "low": None}


def test_chat_completion_is_strict_json(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200, r.text
    body = strict(r.text)
    assert body["alto"]["output"] == [{"word": w, **NULLED} for w in ("a", "b")]


def test_streamed_chunks_are_strict_json(server: LiveServer) -> None:
    datas = []
    body = {**CHAT, "model": "scored", "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                datas.append(strict(line[6:]))
    partials = [c["alto"] for c in datas if c.get("alto", {}).get("event") == "partial"]
    assert [p["data"] for p in partials if p["stage"] == "score"] == \
        [{"word": w, **NULLED} for w in ("a", "b")]


def test_native_run_and_its_events_are_strict_json(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/pipelines/scores/runs", json={"input": "a b"}, timeout=30)
    body = strict(r.text)
    assert body["status"] == "completed" and body["units"] == [{"word": w, **NULLED}
                                                               for w in ("a", "b")]
    with httpx.stream("GET", f"{server.url}/v1/runs/{body['id']}/events", timeout=30) as ev:
        lines = [line[6:] for line in ev.iter_lines() if line.startswith("data: ")]
    assert lines and all(strict(x) is not None for x in lines)


def test_a_unit_that_is_not_json_fails_its_run_saying_so(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/pipelines/notjson/runs", json={"input": "a"}, timeout=30)
    body = strict(r.text)
    assert body["status"] == "failed"
    assert body["error"]["stage"] == "bad" and body["error"]["code"] == "stage_error"
    assert "produced a unit that is not JSON" in body["error"]["message"]
    assert "set is not JSON serializable" in body["error"]["message"]


async def test_a_unit_that_is_not_json_fails_on_both_transports_alike(
    transport: Transport,
) -> None:
    """Also where nothing encodes it on the way: the embedded transport passes envelopes
    on as objects, and without partial events a middle stage's set reached the next
    stage (a reviewer's repro), where Redis failed the run."""
    spec = parse_pipeline({"name": "middle", "stages": [
        {"name": "bad", "kind": "tool", "function": "tests.toy.stages:not_json", "to": ["up"]},
        {"name": "up", "kind": "tool", "function": "tests.toy.stages:upper"}]})
    [events], _ = await run_texts(transport, spec, "a", config=RunnerConfig(
        block_ms=20, heartbeat_ms=50, partial_events=False))
    assert events[-1]["type"] == "error" and events[-1]["stage"] == "bad"
    assert "produced a unit that is not JSON" in events[-1]["message"]


async def test_a_unit_that_is_not_json_is_not_retried(transport: Transport) -> None:
    """A deterministic bug: `retries` would only repeat it (with backoff)."""
    from tests.toy import stages

    stages.NOT_JSON_CALLS.clear()
    spec = parse_pipeline({"name": "noretry", "stages": [
        {"name": "bad", "kind": "tool", "function": "tests.toy.stages:streams_not_json",
         "retries": 2, "retry_backoff_s": 0.01}]})
    [events], _ = await run_texts(transport, spec, "a")
    assert events[-1]["type"] == "error" and "not JSON" in events[-1]["message"]
    assert stages.NOT_JSON_CALLS == ["a"]
