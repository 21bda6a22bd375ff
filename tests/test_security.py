"""Security of the gateway, through its public HTTP API (official SDK and httpx against a
real uvicorn server): API keys (plain or hashed at rest, compared over every key), runs
readable only with the key that created them (404 for any other key, on every run
endpoint), unguessable run ids, a per-key rate limit, and pipelines that only ever come
from configured files."""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from hypothesis import given, settings
from hypothesis import strategies as st

from app.middleware import key_digests, key_hash
from orchestrator.ratelimit import gcra
from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import (
    CALLS,
    REPO,
    LiveServer,
    assert_error_shape,
    auth,
    make_server,
    sdk,
    sim_engines,
    wait_for,
)
from workers.client import new_run_id, start_run

KEY_A = "sk-alto-owner-a"
KEY_B = "sk-alto-owner-b"  # configured only as its hash: never stored in clear
KEYS = [KEY_A, f"sha256:{hashlib.sha256(KEY_B.encode()).hexdigest()}"]


@pytest.fixture(scope="module")
def keyed() -> Iterator[LiveServer]:
    # real-time sim engines: a `slow` run of thousands of lines outlasts any test
    server = make_server(("toy", "slow"), time_scale=1.0, api_keys=KEYS, resume_grace_s=30.0)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------


def test_plain_and_hashed_keys_authenticate(keyed: LiveServer) -> None:
    assert {m.id for m in sdk(keyed, KEY_A).models.list()} >= {"toy", "slow"}
    assert {m.id for m in sdk(keyed, KEY_B).models.list()} >= {"toy", "slow"}
    # the hash at rest is not a key: sending the configured entry itself is refused
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(keyed, KEYS[1]).models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    # nor is the hex digest alone, nor a prefix of a real key
    for wrong in (KEYS[1].removeprefix("sha256:"), KEY_A[:-1], KEY_A + "x"):
        assert_error_shape(httpx.get(f"{keyed.url}/v1/models", headers=auth(wrong)), 401,
                 "invalid_api_key")


def test_missing_or_wrong_key_is_401_on_every_v1_endpoint(keyed: LiveServer) -> None:
    run = new_run_id()
    calls = [
        ("GET", "/v1/models", None), ("GET", "/v1/pipelines", None),
        ("POST", "/v1/chat/completions", {"model": "toy", "messages": []}),
        ("POST", "/v1/completions", {"model": "toy", "prompt": "x"}),
        ("POST", "/v1/pipelines/toy/runs", {"input": "x"}),
        ("GET", f"/v1/runs/{run}", None), ("GET", f"/v1/runs/{run}/events", None),
        ("POST", f"/v1/runs/{run}/cancel", None),
    ]
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for headers in ({}, auth("sk-wrong"), {"Authorization": f"Basic {KEY_A}"}):
            for method, path, body in calls:
                r = http.request(method, path, json=body, headers=headers)
                err = assert_error_shape(r, 401, "invalid_api_key")
                assert err["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"
                assert KEY_A not in r.text


def test_key_entries_are_hashed_and_malformed_hashes_refused() -> None:
    digests = key_digests([" sk-1 ", "", f"SHA256:{'ab' * 32}"])
    assert digests == [hashlib.sha256(b"sk-1").digest(), bytes.fromhex("ab" * 32)]
    secret_looking = "sha256:not-a-hash-but-maybe-a-secret"
    with pytest.raises(ValueError) as info:
        key_digests(["ok", secret_looking])
    assert "entry 1" in str(info.value) and secret_looking not in str(info.value)


# ------------------------------------------------------------------------------------------
# run ownership
# ------------------------------------------------------------------------------------------


def test_a_run_is_visible_only_to_the_key_that_created_it(keyed: LiveServer) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        r = http.post("/v1/pipelines/toy/runs", json={"input": "mine only"}, headers=auth(KEY_A))
        assert r.status_code == 200 and r.json()["output"] == "MINE ONLY"
        run = r.headers["x-alto-run"]
        unknown = new_run_id()
        for method, path in (("GET", "/v1/runs/{}"), ("GET", "/v1/runs/{}/events"),
                             ("POST", "/v1/runs/{}/cancel")):
            theirs = http.request(method, path.format(run), headers=auth(KEY_B))
            err = assert_error_shape(theirs, 404, "run_not_found")
            nobody = http.request(method, path.format(unknown), headers=auth(KEY_B))
            # the same answer as for a run that does not exist: existence is not revealed
            assert err == {**assert_error_shape(nobody, 404, "run_not_found"),
                           "message": err["message"]}
            assert err["message"].replace(run, unknown) == nobody.json()["error"]["message"]
        status = http.get(f"/v1/runs/{run}", headers=auth(KEY_A)).json()
        assert status["status"] == "completed" and status["id"] == run
        with connect_sse(http, "GET", f"/v1/runs/{run}/events", headers=auth(KEY_A)) as src:
            replay = [(s.event, s.data) for s in src.iter_sse()]
    assert replay[0][0] == "run" and replay[-1][0] == "result"
    # the owner is stored as the key's hash, and shown to nobody (not even the owner)
    text = "".join(d for _, d in replay)
    assert KEY_A not in text and key_hash(KEY_A) not in text and "owner" not in text
    raw = keyed.call(lambda: keyed.gateway.transport.read_events(run, None, 1, 0))
    assert raw[0][1]["owner"] == key_hash(KEY_A)
    assert KEY_A not in repr(raw)


def test_runs_started_through_openai_endpoints_are_owned_too(keyed: LiveServer) -> None:
    raw = sdk(keyed, KEY_B).chat.completions.with_raw_response.create(
        model="toy", messages=[{"role": "user", "content": "b owns this"}])
    assert raw.parse().choices[0].message.content == "B OWNS THIS"
    run = raw.headers["x-alto-run"]
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        assert_error_shape(http.get(f"/v1/runs/{run}", headers=auth(KEY_A)), 404, "run_not_found")
        assert http.get(f"/v1/runs/{run}", headers=auth(KEY_B)).json()["status"] == "completed"


def test_another_keys_cancel_does_not_touch_the_run(keyed: LiveServer) -> None:
    """Key B cannot cancel key A's run (404), and the run goes on; A can cancel it."""
    engine = sim_engines(keyed, "slow")[0]
    before = engine.cancelled
    with httpx.Client(base_url=keyed.url, headers=auth(KEY_A), timeout=30) as http, \
            connect_sse(http, "POST", "/v1/pipelines/slow/runs", json={"input": "3000"}) as src:
        events = src.iter_sse()
        assert next(events).event == "run"
        assert next(events).event == "partial"  # the engine is generating
        run = src.response.headers["x-alto-run"]
        assert_error_shape(http.post(f"/v1/runs/{run}/cancel", headers=auth(KEY_B)), 404,
                 "run_not_found")
        assert http.get(f"/v1/runs/{run}").json()["status"] == "running"
        cancelled = http.post(f"/v1/runs/{run}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
        rest = list(events)
    assert rest[-1].event == "error" and '"cancelled"' in rest[-1].data
    keyed.call(lambda: engine.wait_until(lambda e: e.cancelled > before and e.running == 0))


def test_run_ids_are_unguessable() -> None:
    ids = {new_run_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"run_[0-9a-f]{32}", i) for i in ids)  # 128 random bits
    # no structure to exploit: every hex digit position takes many values (uuid1-style
    # or counter ids would pin some)
    for pos in range(4, 36):
        assert len({i[pos] for i in ids}) > 8


# ------------------------------------------------------------------------------------------
# rate limit
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited() -> Iterator[LiveServer]:
    """Bursts of 2 and a rate so low that no token comes back during the test."""
    server = make_server(("toy",), api_keys=KEYS, rate_limit_rps=0.001, rate_limit_burst=2)
    try:
        yield server
    finally:
        server.stop()


def test_rate_limit_is_per_key_with_retry_after(limited: LiveServer) -> None:
    a = sdk(limited, KEY_A)
    assert a.models.list().data
    done = a.chat.completions.create(model="toy", messages=[{"role": "user", "content": "x"}])
    assert done.choices[0].message.content == "X"
    with pytest.raises(openai.RateLimitError) as info:
        a.models.list()
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 1
    r = httpx.post(f"{limited.url}/v1/pipelines/toy/runs", json={"input": "x"},
                   headers=auth(KEY_A))
    err = assert_error_shape(r, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    # wrong keys get 401 (auth comes first) and spend nobody's tokens; B has its own bucket
    for _ in range(3):
        assert_error_shape(httpx.get(f"{limited.url}/v1/models", headers=auth("sk-wrong")), 401,
                 "invalid_api_key")
    b = sdk(limited, KEY_B)
    assert b.models.list().data and b.models.list().data
    with pytest.raises(openai.RateLimitError):
        b.models.list()
    # probes and scrapers are never rate limited
    for _ in range(3):
        assert httpx.get(f"{limited.url}/healthz").status_code == 200


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.1, 50), burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.floats(0, 2), st.sampled_from("ab")), max_size=200),
)
def test_gcra_never_allows_more_than_burst_plus_refill(
    rate: float, burst: int, steps: list[tuple[float, str]]
) -> None:
    """The limit's arithmetic (both transports run it): over any sequence of requests, a
    caller gets at most `burst` + `rate` x elapsed; a refused request is told when the
    next one would pass, which is at most one interval away and passes then."""
    now = 0.0
    tats: dict[str, float | None] = {"a": None, "b": None}
    allowed = {"a": 0, "b": 0}
    for dt, who in steps:
        now += dt
        tat, wait = gcra(tats[who], now, rate, burst)
        assert wait >= 0
        if tat is not None:
            assert wait == 0
            tats[who] = tat
            allowed[who] += 1
        else:
            assert 0 < wait <= 1 / rate + 1e-9
            assert gcra(tats[who], now + wait, rate, burst)[0] is not None
    for count in allowed.values():
        assert count <= burst + rate * now + 1e-6


@given(rate=st.floats(0.1, 50), burst=st.integers(1, 20))
def test_gcra_allows_a_full_burst_at_once(rate: float, burst: int) -> None:
    tat = None
    for _ in range(burst):
        tat, wait = gcra(tat, 100.0, rate, burst)
        assert tat is not None and wait == 0
    assert gcra(tat, 100.0, rate, burst)[0] is None


async def test_embedded_rate_limit_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import embedded

    monkeypatch.setattr(embedded, "RATE_KEYS", 50)
    t = embedded.EmbeddedTransport()
    for i in range(1000):
        assert await t.take_token(f"addr:{i}", 0.001, 1) == 0
    assert len(t._tats) == 50
    assert await t.take_token("addr:999", 0.001, 1) > 0  # the recent ones are remembered
    assert await t.take_token("addr:0", 0.001, 1) == 0  # the oldest was let go


@pytest.mark.redis
def test_the_rate_limit_is_shared_by_gateway_replicas(redis_url: str) -> None:
    """Two gateways on one Redis (two replicas of a Deployment): a caller's burst spent at
    one is spent at the other. With a limit per process it got twice its rate."""
    servers = [make_server(("toy",), api_keys=KEYS, redis_url=redis_url,
                           rate_limit_rps=0.001, rate_limit_burst=2) for _ in range(2)]
    try:
        one, two = (sdk(s, KEY_A) for s in servers)
        assert one.models.list().data
        assert two.models.list().data
        for client in (one, two):
            with pytest.raises(openai.RateLimitError) as info:
                client.models.list()
            assert int(info.value.response.headers["retry-after"]) >= 1
        assert sdk(servers[1], KEY_B).models.list().data  # another key has its own
    finally:
        for s in servers:
            s.stop()


# ------------------------------------------------------------------------------------------
# pipelines come only from configured files
# ------------------------------------------------------------------------------------------

_OPENED: list[str] = []
_WATCH: set[str] = set()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _WATCH and args and isinstance(args[0], str | bytes | Path):
        path = str(args[0] if not isinstance(args[0], bytes) else args[0].decode())
        if any(w in path for w in _WATCH):
            _OPENED.append(path)


sys.addaudithook(_audit)  # audit hooks cannot be removed; it only records watched names


def test_no_request_selects_a_file_or_callable(keyed: LiveServer, tmp_path: Path) -> None:
    """A model or pipeline name that is a path (to a valid pipeline file, even) or a
    'module:function' gets 404 in OpenAI's shape, and no such file is ever opened."""
    marker = tmp_path / "evil-pipeline.yaml"
    marker.write_text((REPO / "tests" / "gateway_pipelines" / "toy.yaml").read_text()
                      .replace("name: toy", "name: evil"))
    names = [str(marker), "../../tests/gateway_pipelines/toy.yaml", "tests.toy.stages:upper",
             "file:///etc/passwd", "/etc/passwd"]
    _WATCH.update({"evil-pipeline", "passwd", "gateway_pipelines/toy.yaml"})
    try:
        a = sdk(keyed, KEY_A)
        for name in names:
            with pytest.raises(openai.NotFoundError) as info:
                a.chat.completions.create(model=name, messages=[{"role": "user",
                                                                 "content": "x"}])
            assert info.value.code == "model_not_found" and info.value.param == "model"
            with pytest.raises(openai.NotFoundError):
                a.completions.create(model=name, prompt="x")
            r = httpx.post(f"{keyed.url}/v1/pipelines/{name}/runs", json={"input": "x"},
                           headers=auth(KEY_A))
            assert r.status_code == 404 and r.json()["error"]["code"] in (
                "pipeline_not_found", "not_found")
        # the native request body takes `input` only: any extra field is refused
        r = httpx.post(f"{keyed.url}/v1/pipelines/toy/runs", headers=auth(KEY_A),
                       json={"input": "x", "pipeline": str(marker),
                             "function": "os:system"})
        assert assert_error_shape(r, 400, "invalid_value")["param"] in ("pipeline", "function")
        assert "evil" not in {m.id for m in a.models.list()}
    finally:
        _WATCH.clear()
    assert _OPENED == []


def test_audit_hook_would_see_a_read(tmp_path: Path) -> None:
    """The check above is only as good as its hook: prove it records an open."""
    target = tmp_path / "evil-pipeline.yaml"
    target.write_text("x")
    _WATCH.add("evil-pipeline")
    try:
        target.read_text()
    finally:
        _WATCH.clear()
    assert _OPENED and _OPENED.pop().endswith("evil-pipeline.yaml")


def test_an_abandoned_run_past_its_deadline_is_failed_when_looked_at(
    keyed: LiveServer,
) -> None:
    """A run whose gateway died (nobody follows it, nobody enforces its deadline) is
    failed and cancelled by the next status read after its deadline."""
    gw = keyed.gateway
    spec = gw.pipelines["slow"]
    engine = sim_engines(keyed, "slow")[0]
    before = engine.cancelled
    owner = key_hash(KEY_A)
    run = keyed.call(lambda: start_run(
        gw.transport, spec, "3000",
        meta={"owner": owner, "deadline_s": 1.0, "created": int(time.time()) - 60},
    ))
    wait_for(lambda: "draft" in CALLS[run], what="the engine to start the abandoned run")
    status = httpx.get(f"{keyed.url}/v1/runs/{run}", headers=auth(KEY_A), timeout=30).json()
    assert status["status"] == "failed" and status["error"]["code"] == "deadline_exceeded"
    keyed.call(lambda: engine.wait_until(lambda e: e.cancelled > before and e.running == 0))
    again = httpx.get(f"{keyed.url}/v1/runs/{run}", headers=auth(KEY_A), timeout=30).json()
    assert again["status"] == "failed"
