"""The `openai` engine against real servers: llama.cpp's OpenAI-compatible server serving the
bundled Gemma model, and a scripted SSE server for stream shapes and failures."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from orchestrator.engine import Delta, Engine, GenParams
from orchestrator.spec import EngineSpec
from tests import fixtures_llama
from tests.fixtures_llama import LlamaServer, ScriptedSSEServer, chat_chunk, start_scripted
from workers.engines import build_engine
from workers.engines.common import (
    EngineConnectError,
    EngineHTTPError,
    EngineStreamError,
)
from workers.engines.openai_compat import API_KEY_ENV, BASE_URL_ENV, OpenAIEngine, api_root

# fixtures from tests/fixtures_llama.py, bound here so pytest finds them for this module
gemma_model_path = fixtures_llama.gemma_model_path
llama_server = fixtures_llama.llama_server
scripted_server = fixtures_llama.scripted_server

PROMPT = "Q: What is the capital of France?\nA:"


async def collect(engine: OpenAIEngine, prompt: str, params: GenParams) -> list[Delta]:
    return [d async for d in engine.generate(prompt, params)]


def closed_port() -> int:
    """A port nothing listens on (bound then released: connecting is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------
# against llama.cpp's server (a real third-party OpenAI-compatible implementation)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("api", ["chat", "completions"])
async def test_streams_deltas_from_llama_cpp_server(llama_server: LlamaServer, api: str) -> None:
    engine = OpenAIEngine(
        base_url=llama_server.base_url, api_key=llama_server.api_key, model="gemma", api=api
    )
    await engine.start()
    try:
        params = GenParams(max_tokens=12, temperature=0.0)
        first = await collect(engine, PROMPT, params)
        second = await collect(engine, PROMPT, params)
    finally:
        await engine.aclose()
    text = "".join(d.text for d in first)
    assert text.strip(), "the model produced no text"
    assert len(first) >= 3, "expected several streamed deltas, not one blob"
    assert all(d.finish_reason is None for d in first[:-1])
    assert first[-1].finish_reason in ("stop", "length")
    # temperature 0 is deterministic end to end
    assert text == "".join(d.text for d in second)
    # llama-cpp-python's server (0.3.x) ignores stream_options and sends no usage while
    # streaming: the engine must report "unknown", never invent counts
    assert first[-1].prompt_tokens is None and first[-1].completion_tokens is None


@pytest.mark.slow
async def test_cancel_disconnects_from_llama_cpp_server(llama_server: LlamaServer) -> None:
    engine = OpenAIEngine(base_url=llama_server.base_url, api_key=llama_server.api_key)
    await engine.start()
    try:
        stream = engine.generate("Count from 1 to 300.", GenParams(max_tokens=400))
        got = [await anext(stream)]
        await stream.aclose()
        assert got[0].text
        # the server notices the closed connection and stops generating
        assert llama_server.wait_for_log("Disconnected from client", timeout_s=20), (
            llama_server.log()[-2000:]
        )
        # and the engine (and the server) still serve the next request
        after = await collect(engine, PROMPT, GenParams(max_tokens=4))
        assert "".join(d.text for d in after)
    finally:
        await engine.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_missing_or_wrong_api_key_is_a_clear_error(
    llama_server: LlamaServer, key: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    engine = OpenAIEngine(base_url=llama_server.base_url, api_key=key, retries=0)
    try:
        with pytest.raises(EngineHTTPError) as info:
            await collect(engine, PROMPT, GenParams(max_tokens=4))
    finally:
        await engine.aclose()
    assert info.value.status == 401
    assert "authentication failed" in str(info.value)
    assert API_KEY_ENV in str(info.value)


# ------------------------------------------------------------------------------------------
# stream shapes and failures, against a scripted server
# ------------------------------------------------------------------------------------------

USAGE = {
    "prompt_tokens": 21,
    "completion_tokens": 3,
    "total_tokens": 24,
    "prompt_tokens_details": {"cached_tokens": 16},
}


async def test_usage_chunk_lands_on_the_final_delta(
    scripted_server: list[ScriptedSSEServer],
) -> None:
    server = await start_scripted(
        scripted_server,
        [
            chat_chunk("Red"),
            chat_chunk(", blue"),
            chat_chunk(", green", finish="stop"),
            chat_chunk(usage=USAGE),  # OpenAI/vLLM: usage last, with empty choices
            "[DONE]",
        ],
    )
    engine = OpenAIEngine(base_url=server.base_url, api_key="k1", model="m")
    try:
        deltas = await collect(
            engine, "colors?", GenParams(max_tokens=7, stop=["\n"], system="be brief")
        )
    finally:
        await engine.aclose()
    assert [d.text for d in deltas] == ["Red", ", blue", ", green", ""]
    last = deltas[-1]
    assert (last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (21, 3, 16)
    assert last.finish_reason == "stop"
    # what went over the wire
    body = server.requests[0]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "colors?"},
    ]
    assert (body["max_tokens"], body["stop"], body["model"]) == (7, ["\n"], "m")
    assert server.headers[0]["authorization"] == "Bearer k1"


async def test_connect_errors_are_retried_then_raised() -> None:
    attempts: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        attempts.append(request)

    engine = OpenAIEngine(
        base_url=f"http://127.0.0.1:{closed_port()}",
        retries=3,
        backoff_s=0.001,
        event_hooks={"request": [count]},
    )
    try:
        with pytest.raises(EngineConnectError, match="after 4 attempt"):
            await collect(engine, "hi", GenParams(max_tokens=4))
    finally:
        await engine.aclose()
    assert len(attempts) == 4  # the first try and 3 retries


class Waits:
    """Records the waits between retries instead of sleeping them."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


STREAM = [chat_chunk("Hel"), chat_chunk("lo", finish="stop"), "[DONE]"]


async def test_retryable_statuses_are_sent_again_until_a_stream_comes(
    scripted_server: list[ScriptedSSEServer],
) -> None:
    """A load balancer's 503 during a rolling restart, then a rate limit's 429 with
    Retry-After: nothing was generated, so the same request is sent again (after the
    server's wait when it names one, else the backoff) and the run goes on."""
    server = await start_scripted(scripted_server, STREAM)
    server.errors = [(503, {}), (429, {"Retry-After": "7"}), (502, {"retry-after-ms": "1500"})]
    waits = Waits()
    engine = OpenAIEngine(base_url=server.base_url, retries=3, backoff_s=0.25, sleep=waits)
    try:
        got = await collect(engine, "hi", GenParams(max_tokens=8))
    finally:
        await engine.aclose()
    assert "".join(d.text for d in got) == "Hello"
    assert len(server.requests) == 4
    assert all(r == server.requests[0] for r in server.requests)  # the same request again
    assert waits.seconds == [0.25, 7.0, 1.5]


@pytest.mark.parametrize(
    ("status", "headers", "retried"),
    [
        (400, {}, False),  # the request itself is wrong: sending it again cannot help
        (404, {}, False),
        (422, {}, False),
        (500, {"x-should-retry": "false"}, False),  # the server says no
        (400, {"x-should-retry": "true"}, True),  # ... or yes
        (408, {}, True),
        (409, {}, True),
    ],
)
async def test_which_error_statuses_are_retried(
    scripted_server: list[ScriptedSSEServer], status: int, headers: dict[str, str],
    retried: bool,
) -> None:
    server = await start_scripted(scripted_server, STREAM)
    server.errors = [(status, headers)]
    engine = OpenAIEngine(base_url=server.base_url, retries=2, sleep=Waits())
    try:
        if retried:
            assert "".join(d.text for d in await collect(engine, "hi", GenParams())) == "Hello"
        else:
            with pytest.raises(EngineHTTPError) as info:
                await collect(engine, "hi", GenParams())
            assert info.value.status == status and "scripted" in str(info.value)
    finally:
        await engine.aclose()
    assert len(server.requests) == (2 if retried else 1)


async def test_connect_errors_and_error_statuses_share_one_retry_budget(
    scripted_server: list[ScriptedSSEServer],
) -> None:
    """A server that first cannot be reached and then answers 503s: `retries` counts
    every re-send, whatever its cause (each had its own budget: up to (retries+1)^2
    sends)."""
    server = await start_scripted(scripted_server, STREAM)
    server.errors = [(503, {})] * 10
    port = server.port
    await server.close()  # refused at first
    tries = 0

    async def reopen(seconds: float) -> None:
        nonlocal tries
        tries += 1
        if tries == 2:  # after two refused connects, the server is back (same port)
            server._server = await asyncio.start_server(server._handle, "127.0.0.1", port)

    engine = OpenAIEngine(base_url=f"http://127.0.0.1:{port}/v1", retries=4, sleep=reopen)
    try:
        with pytest.raises(EngineHTTPError, match="after 5 attempts"):
            await collect(engine, "hi", GenParams())
    finally:
        await engine.aclose()
    assert len(server.requests) == 3  # 2 refused + 3 answered 503 = 5 sends in all
    assert tries == 4


async def test_retryable_statuses_give_up_after_the_retries(
    scripted_server: list[ScriptedSSEServer],
) -> None:
    server = await start_scripted(scripted_server, STREAM)
    server.errors = [(503, {"Retry-After": "3600"})] * 3
    waits = Waits()
    engine = OpenAIEngine(base_url=server.base_url, retries=2, sleep=waits)
    try:
        with pytest.raises(EngineHTTPError, match=r"HTTP 503 .*after 3 attempts") as info:
            await collect(engine, "hi", GenParams())
    finally:
        await engine.aclose()
    assert info.value.status == 503 and info.value.retry_after == 3600
    assert len(server.requests) == 3
    assert waits.seconds == [30.0, 30.0]  # a long Retry-After is cut to RETRY_AFTER_MAX_S


@pytest.mark.parametrize("ending", ["abrupt", "done"])
async def test_a_stream_broken_mid_way_is_not_retried(
    scripted_server: list[ScriptedSSEServer], ending: str
) -> None:
    # "abrupt": the server dies mid-stream; "done": it ends cleanly but before any
    # finish_reason or [DONE], i.e. the answer is truncated
    server = await start_scripted(scripted_server, [chat_chunk("Hel"), chat_chunk("lo")], ending)
    engine = OpenAIEngine(base_url=server.base_url, retries=5, backoff_s=0.001)
    got: list[Delta] = []
    try:
        with pytest.raises(EngineStreamError, match="not retried"):
            async for d in engine.generate("hi", GenParams(max_tokens=8)):
                got.append(d)
    finally:
        await engine.aclose()
    assert [d.text for d in got] == ["Hel", "lo"]
    assert server.connections == 1 and len(server.requests) == 1


async def test_closing_the_stream_closes_the_connection(
    scripted_server: list[ScriptedSSEServer],
) -> None:
    server = await start_scripted(scripted_server, [chat_chunk("one")], ending="hang")
    engine = OpenAIEngine(base_url=server.base_url)
    try:
        stream = engine.generate("hi", GenParams(max_tokens=8))
        assert (await anext(stream)).text == "one"
        await stream.aclose()
        await asyncio.wait_for(server.disconnected.wait(), timeout=5)
    finally:
        await engine.aclose()


async def test_cancelling_the_consumer_task_closes_the_connection(
    scripted_server: list[ScriptedSSEServer],
) -> None:
    server = await start_scripted(scripted_server, [chat_chunk("one")], ending="hang")
    engine = OpenAIEngine(base_url=server.base_url)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate("hi", GenParams(max_tokens=8)):
            first.set()

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.disconnected.wait(), timeout=5)
    finally:
        await engine.aclose()


async def test_server_error_event_mid_stream_raises(
    scripted_server: list[ScriptedSSEServer],
) -> None:
    server = await start_scripted(
        scripted_server, [chat_chunk("a"), '{"error": {"message": "out of memory"}}']
    )
    engine = OpenAIEngine(base_url=server.base_url)
    try:
        with pytest.raises(EngineStreamError, match="out of memory"):
            await collect(engine, "hi", GenParams())
    finally:
        await engine.aclose()


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------


def test_api_root_accepts_both_url_forms() -> None:
    assert api_root("http://h:1") == "http://h:1/v1"
    assert api_root("http://h:1/v1/") == "http://h:1/v1"
    assert api_root("https://api.example.com/v1") == "https://api.example.com/v1"


def test_build_engine_reads_options_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BASE_URL_ENV, "http://env-host:9/v1")
    monkeypatch.setenv(API_KEY_ENV, "env-key")
    engine = build_engine(EngineSpec(kind="openai", model="m", capacity=5, api="completions"), 2)
    assert isinstance(engine, OpenAIEngine) and isinstance(engine, Engine)
    assert (engine.root, engine.capacity, engine.api, engine.model) == (
        "http://env-host:9/v1",
        5,
        "completions",
        "m",
    )
    assert engine._headers["Authorization"] == "Bearer env-key"
    assert engine.name == "openai:m#2"
    # spec options win over the environment
    engine = build_engine(EngineSpec(kind="openai", base_url="http://opt:1", api_key="o"))
    assert isinstance(engine, OpenAIEngine)
    assert engine.root == "http://opt:1/v1" and engine._headers["Authorization"] == "Bearer o"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base_url": "http://h", "api": "edits"}, "'api' must be one of"),
        ({"base_url": "http://h", "retrys": 2}, r"unknown option\(s\) \['retrys'\]"),
        ({"base_url": "http://h", "retries": -1}, "'retries' must be an integer >= 0"),
        ({"base_url": "http://h", "read_timeout_s": "soon"}, "'read_timeout_s' must be a number"),
        ({}, f"no base_url .*{BASE_URL_ENV}"),
    ],
)
def test_bad_options_fail_at_build_time(
    options: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    with pytest.raises(ValueError, match=message):
        build_engine(EngineSpec(kind="openai", **options))


def test_registry_builds_each_kind_without_loading_anything() -> None:
    from workers.engines.local import LocalEngine
    from workers.engines.sim import SimEngine

    sim = build_engine(EngineSpec(kind="sim", capacity=3), 1)
    assert isinstance(sim, SimEngine) and isinstance(sim, Engine) and sim.capacity == 3
    local = build_engine(EngineSpec(kind="local"))
    assert isinstance(local, LocalEngine) and local._llm is None  # loads only in start()
    with pytest.raises(ValueError, match="unknown engine kind 'tpu'"):
        build_engine(EngineSpec.model_construct(kind="tpu"))
    with pytest.raises(ValueError, match="instance must be >= 0"):
        build_engine(EngineSpec(kind="sim"), -1)


# --- raw completions on a chat-only server (hosted chat models have no /completions) ------

_CHAT_SSE = ('data: {"choices":[{"delta":{"content":" Paris."}}]}\n\n'
             'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')


def _chat_only_engine(chat_status: int = 200, concurrent: bool = False
                      ) -> tuple[OpenAIEngine, list[str], asyncio.Event]:
    """An engine on a server with /chat/completions only; the second /completions request
    is answered only once a chat request was served (both in flight at the first contact,
    ordered by an event, not by time)."""
    paths: list[str] = []
    chatted, second = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path.endswith("/chat/completions"):
            chatted.set()
            if chat_status != 200:
                return httpx.Response(chat_status, json={"error": {"message": "no such model"}})
            return httpx.Response(200, text=_CHAT_SSE,
                                  headers={"content-type": "text/event-stream"})
        if paths.count(request.url.path) == 2:  # the second first contact: answered late
            second.set()
            await chatted.wait()
        elif concurrent:  # the first: not before the second is in flight too
            await second.wait()
        return httpx.Response(404, json={"error": {"message": "no such route"}})

    engine = OpenAIEngine(base_url="http://upstream/v1", model="m", api="chat", retries=0)
    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return engine, paths, chatted


async def _raw(engine: OpenAIEngine) -> str:
    return "".join([d.text async for d in engine.generate("The capital", GenParams(raw=True))])


async def test_raw_completions_in_flight_together_both_fall_back_to_chat() -> None:
    engine, paths, _ = _chat_only_engine(concurrent=True)
    try:
        answers = await asyncio.gather(_raw(engine), _raw(engine))
        later = await _raw(engine)
    finally:
        await engine.aclose()
    assert answers == [" Paris.", " Paris."] and later == " Paris."
    assert paths.count("/v1/completions") == 2  # the two first contacts, then chat only
    assert paths[-1] == "/v1/chat/completions" and paths.count("/v1/chat/completions") == 3


async def test_a_404_from_chat_too_does_not_switch_the_engine_to_chat() -> None:
    """A wrong model is a 404 on both endpoints: the error goes to the caller, and raw
    prompts keep their API once the model exists."""
    engine, paths, _ = _chat_only_engine(chat_status=404)
    try:
        with pytest.raises(EngineHTTPError):
            await _raw(engine)
    finally:
        await engine.aclose()
    assert paths == ["/v1/completions", "/v1/chat/completions"]
    assert engine._chat_only is False
