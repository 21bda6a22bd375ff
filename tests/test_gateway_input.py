"""What the gateway makes of a request's text before anything runs, and what an engine
model's upstream receives: a lone surrogate is refused with a 400 (it used to run the whole
pipeline and then fail its response with a 500 or a cut stream); text parts are joined as
vLLM joins them; and an engine model passes the conversation, top_p and seed through to an
OpenAI-compatible server (and its failure is a 502 that does not name the server)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from app.main import create_app
from orchestrator.spec import parse_pipeline
from tests.fixtures_llama import (
    ScriptedSSEServer,
    chat_chunk,
    scripted_server,  # noqa: F401 - fixture
    start_scripted,
)
from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer, assert_error_shape, idle
from workers.settings import Settings

LONE = "x \\ud83d y"  # JSON text: a high surrogate with no low one after it


def _post(server: LiveServer, path: str, raw: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=raw.encode(),
                      headers={"Content-Type": "application/json"}, timeout=30)


@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/v1/chat/completions",
     '{"model":"toy","messages":[{"role":"user","content":"@"}]}', "messages"),
    ("/v1/chat/completions",
     '{"model":"toy","stream":true,"messages":[{"role":"user","content":[{"type":"text",'
     '"text":"@"}]}]}', "messages"),
    ("/v1/completions", '{"model":"toy","prompt":"@"}', "prompt"),
    ("/v1/pipelines/toy/runs", '{"input":"@"}', "input"),
])
def test_a_lone_surrogate_is_refused_before_a_run_starts(
        gateway: LiveServer, path: str, raw: str, param: str) -> None:
    idle(gateway)
    started = gateway.gateway.metrics.runs_started.labels("toy")._value.get()
    err = assert_error_shape(_post(gateway, path, raw.replace("@", LONE)), 400, "invalid_value")
    assert "surrogate" in err["message"] and (err["param"] or "").startswith(param)
    assert gateway.gateway.metrics.runs_started.labels("toy")._value.get() == started


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b"}], "stream": None,
                              "stream_options": {"include_usage": None}}),
    ("/v1/completions", {"prompt": "a b", "stream": None, "echo": None, "suffix": None}),
])
def test_null_for_an_optional_flag_means_its_default(
        gateway: LiveServer, path: str, body: dict[str, object]) -> None:
    """OpenAI's schema and vLLM take null for these (QA: `"stream": null` was a 400)."""
    r = httpx.post(f"{gateway.url}{path}", json={"model": "toy", **body}, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice.get("text") or choice.get("message", {}).get("content")) == "A B"


@pytest.mark.parametrize(("field", "value"), [("echo", True), ("suffix", "!")])
def test_completion_options_not_honoured_are_refused_not_ignored(
        gateway: LiveServer, field: str, value: object) -> None:
    """An answer without the echoed prompt, or ignoring the suffix, would look right and be
    wrong (both were accepted and ignored)."""
    r = httpx.post(f"{gateway.url}/v1/completions", timeout=30,
                   json={"model": "toy", "prompt": "a", field: value})
    err = assert_error_shape(r, 400, "invalid_value")
    assert err["param"] == field


def test_text_parts_are_joined_by_a_newline(gateway: LiveServer) -> None:
    raw = json.dumps({"model": "toy", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Paris is"}, {"type": "text", "text": "the capital"}]}]})
    r = _post(gateway, "/v1/chat/completions", raw)
    assert r.status_code == 200, r.text
    # toy upper-cases each whitespace-separated word: "Paris isthe capital" had 3 of them
    assert r.json()["choices"][0]["message"]["content"] == "PARIS IS THE CAPITAL"


async def test_an_engine_model_passes_the_conversation_and_sampling_through(
        scripted_server: list[ScriptedSSEServer]) -> None:  # noqa: F811
    up = await start_scripted(scripted_server, [
        chat_chunk("You said hi."), chat_chunk(finish="stop"),
        chat_chunk(usage={"prompt_tokens": 9, "completion_tokens": 3}), "[DONE]"])
    spec = parse_pipeline({
        "name": "proxy",
        "engines": {"default": {"kind": "openai", "base_url": up.base_url, "model": "m"}},
        "stages": [{"name": "ask", "kind": "lm", "prompt": "{input}"}],
    })
    server = LiveServer(create_app(Settings(), [spec])).start()
    messages = [
        {"role": "developer", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "tool", "name": "clock", "content": "12:00"},
        {"role": "user", "content": "What did I say?"},
    ]
    try:
        r = await asyncio.to_thread(
            httpx.post, f"{server.url}/v1/chat/completions", timeout=30,
            json={"model": "proxy/default", "messages": messages, "top_p": 0.5, "seed": 7,
                  "max_tokens": 20})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "You said hi."
    sent = up.requests[-1]
    # roles every chat template knows; a tool result (no tool_call_id: alto makes no tool
    # calls, and servers refuse such a turn) goes as a user turn saying what it is
    # (merged with the user turn after it: some templates need roles to alternate)
    assert sent["messages"] == [
        {"role": "system", "content": "Be nice."}, *messages[1:3],
        {"role": "user", "content": "[tool clock result]\n12:00\n\nWhat did I say?"}]
    assert (sent["top_p"], sent["seed"], sent["max_tokens"]) == (0.5, 7, 20)


async def _ask_engine(base_url: str) -> httpx.Response:
    """One chat completion from an engine model in front of `base_url` (no retries)."""
    spec = parse_pipeline({
        "name": "proxy",
        "engines": {"default": {"kind": "openai", "base_url": base_url, "model": "m",
                                "retries": 0}},
        "stages": [{"name": "ask", "kind": "lm", "prompt": "{input}"}],
    })
    server = LiveServer(create_app(Settings(), [spec])).start()
    try:
        return await asyncio.to_thread(
            httpx.post, f"{server.url}/v1/chat/completions", timeout=30,
            json={"model": "proxy/default", "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        server.stop()


async def test_a_completions_request_to_a_chat_engine_goes_as_a_raw_completion(
        scripted_server: list[ScriptedSSEServer]) -> None:  # noqa: F811
    """`/v1/completions` promises the prompt as written; through an engine configured for
    the chat API it used to go as a user message, so the server's chat template wrapped it."""
    chunk = json.dumps({"id": "c1", "object": "text_completion", "model": "m",
                        "choices": [{"index": 0, "text": " Paris.", "finish_reason": "stop"}]})
    up = await start_scripted(scripted_server, [chunk, "[DONE]"])
    spec = parse_pipeline({
        "name": "proxy",
        "engines": {"default": {"kind": "openai", "base_url": up.base_url, "model": "m",
                                "api": "chat"}},
        "stages": [{"name": "ask", "kind": "lm", "prompt": "{input}"}],
    })
    server = LiveServer(create_app(Settings(), [spec])).start()
    try:
        r = await asyncio.to_thread(
            httpx.post, f"{server.url}/v1/completions", timeout=30,
            json={"model": "proxy/default", "prompt": "The capital of France is"})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " Paris."
    sent = up.requests[-1]
    assert sent["prompt"] == "The capital of France is" and "messages" not in sent
    assert up.paths[-1] == "/v1/completions"


async def test_a_raw_completion_falls_back_to_chat_on_a_chat_only_server(
        scripted_server: list[ScriptedSSEServer]) -> None:  # noqa: F811
    """Hosted chat models have no /completions: the server's 404 sends the prompt to
    /chat/completions as a user message instead (as before raw completions), and the
    engine remembers it (a reviewer: /v1/completions had turned into an upstream error)."""
    up = await start_scripted(scripted_server, [chat_chunk(" Paris."), chat_chunk(finish="stop"),
                                                "[DONE]"])
    up.errors.append((404, {}))
    spec = parse_pipeline({
        "name": "proxy",
        "engines": {"default": {"kind": "openai", "base_url": up.base_url, "model": "m"}},
        "stages": [{"name": "ask", "kind": "lm", "prompt": "{input}"}],
    })
    server = LiveServer(create_app(Settings(), [spec])).start()
    try:
        answers = [await asyncio.to_thread(
            httpx.post, f"{server.url}/v1/completions", timeout=30,
            json={"model": "proxy/default", "prompt": "The capital of France is"})
            for _ in range(2)]
    finally:
        server.stop()
    assert [r.status_code for r in answers] == [200, 200], answers[0].text
    assert [r.json()["choices"][0]["text"] for r in answers] == [" Paris.", " Paris."]
    assert up.paths == ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions"]
    assert up.requests[-1]["messages"][-1] == {"role": "user",
                                               "content": "The capital of France is"}


async def test_an_unreachable_engine_is_a_502_that_hides_its_address() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = await _ask_engine(f"http://127.0.0.1:{port}/v1")
    err = assert_error_shape(r, 502, "engine_error")
    assert "cannot connect" in err["message"] and str(port) not in err["message"]


@pytest.mark.parametrize(("status", "code", "want"), [
    (500, "engine_error", 502),  # the server failed: a bad gateway
    (404, "engine_error", 502),  # a wrong model or base_url: the gateway's setup
    (400, "engine_rejected_request", 400),  # it refused what the client asked
    (429, "engine_overloaded", 503),  # its load: try again later
])
async def test_an_engine_answering_an_error_status(
        scripted_server: list[ScriptedSSEServer], status: int, code: str,  # noqa: F811
        want: int) -> None:
    up = await start_scripted(scripted_server, [])
    up.errors.append((status, {}))
    r = await _ask_engine(up.base_url)
    err = assert_error_shape(r, want, code)
    assert f"HTTP {status}" in err["message"] and "scripted" in err["message"]
    assert str(up.port) not in err["message"] and "127.0.0.1" not in err["message"]


def test_a_lone_surrogate_a_tool_returns_is_escaped_not_a_500() -> None:
    spec = parse_pipeline({"name": "odd", "stages": [
        {"name": "t", "kind": "tool", "function": "tests.toy.faulty:lone_surrogate"}]})
    server = LiveServer(create_app(Settings(), [spec])).start()
    try:
        native = httpx.post(f"{server.url}/v1/pipelines/odd/runs", json={"input": "x"},
                            timeout=30)
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                          json={"model": "odd", "messages": [{"role": "user", "content": "x"}]})
    finally:
        server.stop()
    assert native.status_code == 200, native.text
    assert native.json()["output"] == "x \ud83d"  # as JSON escapes it
    assert b"\\ud83d" in native.content
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == "x \ud83d"
