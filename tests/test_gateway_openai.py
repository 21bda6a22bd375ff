"""The OpenAI-compatible endpoints, driven by the official `openai` SDK (sync and async,
streaming and not) against a real uvicorn server."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer


def client(server: LiveServer, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, **kw)


def aclient(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_list_every_pipeline_and_engine(gateway: LiveServer) -> None:
    models = {m.id: m for m in client(gateway).models.list()}
    assert {"factool", "toy", "fanout", "slow"} <= set(models)
    assert {"factool/default", "slow/default"} <= set(models)
    assert "toy/default" not in models  # toy has no LM stage and declares no engine
    assert models["factool"].model_extra["alto"]["kind"] == "pipeline"
    assert models["slow/default"].model_extra["alto"]["kind"] == "engine"
    assert all(m.object == "model" and m.owned_by == "alto" for m in models.values())
    one = client(gateway).models.retrieve("slow/default")
    assert one.id == "slow/default"


def test_chat_pipeline_not_streaming(gateway: LiveServer) -> None:
    done = client(gateway).chat.completions.create(
        model="toy",
        messages=[{"role": "system", "content": "ignored"}, *user("first"), *user("hello world")],
    )
    assert done.object == "chat.completion"
    assert done.choices[0].message.content == "HELLO WORLD"  # the *last* user message
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.prompt_tokens == 2
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.model_extra["alto"]["run"].startswith("run_")


def test_chat_without_a_user_turn_uses_the_last_message(gateway: LiveServer) -> None:
    done = client(gateway).chat.completions.create(
        model="toy", messages=[{"role": "system", "content": "only a system turn"}]
    )
    assert done.choices[0].message.content == "ONLY A SYSTEM TURN"


def test_chat_pipeline_several_units_in_lineage_order(gateway: LiveServer) -> None:
    done = client(gateway).chat.completions.create(model="fanout", messages=user("ab:3"))
    assert done.choices[0].message.content == "ab#0\nab#1\nab#2"


def test_chat_streaming_content_partials_and_usage(gateway: LiveServer) -> None:
    stream = client(gateway).chat.completions.create(
        model="slow", messages=user("5"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # the output stage's units arrive as they are produced, joined by newlines
    assert sorted(content.split("\n")) == sorted(f"echo line {i}" for i in range(1, 6))
    alto = [c.model_extra.get("alto") for c in chunks if c.model_extra.get("alto")]
    assert alto[0]["event"] == "run"
    drafts = [a for a in alto if a["event"] == "partial" and a["stage"] == "draft"]
    assert [a["data"] for a in sorted(drafts, key=lambda a: a["lineage"])] == [
        f"line {i}" for i in range(1, 6)
    ]
    assert {a["stage"] for a in alto if a["event"] == "stage_done"} == {"draft", "expand"}
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk, last
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_chat_streaming_without_usage_has_no_usage_chunk(gateway: LiveServer) -> None:
    chunks = list(client(gateway).chat.completions.create(
        model="toy", messages=user("a b"), stream=True
    ))
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "A B"


def test_stream_ends_with_done_on_the_wire(gateway: LiveServer) -> None:
    body = {"model": "toy", "messages": user("x"), "stream": True}
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    datas = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "chat.completion.chunk" for d in datas[:-1])


async def test_async_client_streaming_and_not(gateway: LiveServer) -> None:
    c = aclient(gateway)
    done = await c.chat.completions.create(model="toy", messages=user("async works"))
    assert done.choices[0].message.content == "ASYNC WORKS"
    stream = await c.chat.completions.create(model="fanout", messages=user("q:2"), stream=True)
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert sorted(text.split("\n")) == ["q#0", "q#1"]
    await c.close()


def test_legacy_completions(gateway: LiveServer) -> None:
    c = client(gateway)
    done = c.completions.create(model="toy", prompt="legacy api")
    assert done.object == "text_completion"
    assert done.choices[0].text == "LEGACY API"
    parts = list(c.completions.create(model="toy", prompt=["x y"], stream=True,
                                      stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == "X Y"
    assert parts[-1].usage is not None


def test_engine_model_proxy(gateway: LiveServer) -> None:
    c = client(gateway)
    done = c.chat.completions.create(
        model="slow/default", messages=user("say something"), max_tokens=12
    )
    assert done.choices[0].message.content
    assert done.usage is not None and 1 <= done.usage.completion_tokens <= 12
    chunks = list(c.chat.completions.create(
        model="slow/default", messages=user("stream it"), max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(
        [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    )  # the sim engine streams one token per delta
    legacy = c.completions.create(model="factool/default", prompt="hello", max_tokens=5)
    assert legacy.choices[0].text


def test_engine_model_reports_a_reply_cut_by_max_tokens(gateway: LiveServer) -> None:
    """The sim engine's text is drawn at 16 tokens or more: under max_tokens=5 it is cut,
    and `finish_reason` says so ("length"), streamed or not; with room it is "stop"."""
    c = client(gateway)
    done = c.chat.completions.create(model="slow/default", messages=user("cut"), max_tokens=5)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 5
    chunks = list(c.chat.completions.create(
        model="slow/default", messages=user("cut"), max_tokens=5, stream=True))
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices
            and ch.choices[0].finish_reason] == ["length"]
    roomy = c.chat.completions.create(model="slow/default", messages=user("cut"),
                                      max_tokens=16)
    assert roomy.choices[0].finish_reason == "stop"
    assert roomy.usage is not None and roomy.usage.completion_tokens == 16


def test_pipeline_failure_raises_sdk_errors(gateway: LiveServer) -> None:
    c = client(gateway)
    with pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(model="fanout", messages=user("boom:x"))
    assert info.value.status_code == 500
    assert info.value.code == "stage_error"
    assert "fan" in info.value.message
    with pytest.raises(openai.APIError, match="the run failed"):
        list(c.chat.completions.create(model="fanout", messages=user("boom:x"), stream=True))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"model": "toy", "messages": []}, "messages"),
        ({"model": "toy", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "toy", "messages": user("x"), "n": 2}, "n"),
        ({"model": "toy", "messages": user("x"), "temperature": 9}, "temperature"),
        ({"model": "toy", "messages": user("x"), "stream": "yes"}, "stream"),
        ({"model": "toy", "messages": user("x"), "max_tokens": "10"}, "max_tokens"),
        ({"model": "toy", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ],
)
def test_bad_requests_name_the_field(gateway: LiveServer, kwargs: dict[str, Any],
                                     param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).chat.completions.create(**kwargs)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_unknown_model_is_not_found(gateway: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(gateway).chat.completions.create(model="nope", messages=user("x"))
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client(gateway).completions.create(model="nope", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client(gateway).models.retrieve("nope")


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/pipelines/toy/runs", {"input": "hi"}),
    ("/v1/pipelines/toy/dead-letters/replay", {"all": True}),
])
def test_a_json_body_without_its_content_type_says_so(
        gateway: LiveServer, content_type: str | None, path: str, body: dict[str, Any]) -> None:
    """QA: `curl -d` (form encoding) got "Input should be a valid dictionary or object",
    which never named the Content-Type; the body is still not read as JSON (a browser
    sends such bodies cross-site without a preflight)."""
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{gateway.url}{path}", content=json.dumps(body).encode(), headers=headers)
    assert r.status_code == 400, r.text
    got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    assert r.json() == {"error": {
        "message": "the request body must be JSON sent with Content-Type: application/json; "
                   f"this request has {got} (curl -d sends application/x-www-form-urlencoded: "
                   "add -H 'Content-Type: application/json')",
        "type": "invalid_request_error", "param": None, "code": "invalid_json"}}


def test_malformed_json_is_400(gateway: LiveServer) -> None:
    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=b'{"model": "toy",',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and set(err) == {"message", "type", "param", "code"}
