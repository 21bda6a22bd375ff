"""The operator endpoints for dead letters (app/routes_admin.py), on the embedded transport
where the letters live in the gateway process: before them, nothing could list, replay
or drop a failed input there, and `alto_dead_letters` stayed above 0 until a restart.
With API keys configured they need an admin key: the letters hold other callers' inputs."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import LiveServer, assert_error_shape, make_server, wait_for
from tests.test_gateway_metrics import scrape, value
from tests.toy import faulty

ADMIN_KEY = "sk-alto-admin"
USER_KEY = "sk-alto-user"
LETTERS = "/v1/pipelines/dead/dead-letters"


@pytest.fixture
def broken() -> Iterator[set[str]]:
    faulty.BROKEN.clear()
    yield faulty.BROKEN
    faulty.BROKEN.clear()


@pytest.fixture(scope="module")
def open_server() -> Iterator[LiveServer]:
    server = make_server(("dead",))
    try:
        yield server
    finally:
        server.stop()


def _fail(http: httpx.Client, text: str) -> str:
    """A run that fails at `check`; its run id."""
    r = http.post("/v1/pipelines/dead/runs", json={"input": text})
    body = r.json()
    assert body["status"] == "failed" and body["error"]["code"] == "stage_error", r.text
    return str(body["id"])


def _status(http: httpx.Client, run: str) -> str:
    r = http.get(f"/v1/runs/{run}")
    assert r.status_code == 200, r.text
    return str(r.json()["status"])


def test_list_replay_and_drop_over_http(open_server: LiveServer, broken: set[str]) -> None:
    broken.add("bad")
    with httpx.Client(base_url=open_server.url, timeout=30) as http:
        first = _fail(http, "good bad")
        second = _fail(http, "bad fine")
        listed = http.get(LETTERS).json()
        again = http.get(LETTERS, params={"limit": 1}).json()
        gauge_before = value(scrape(open_server), "alto_dead_letters", pipeline="dead")

        missing = http.post(f"{LETTERS}/drop", json={"ids": ["9-9"]})
        ids = [d["id"] for d in listed["data"]]
        dropped = http.post(f"{LETTERS}/drop", json={"ids": [ids[0]]}).json()

        broken.clear()  # the cause is fixed: the second input goes through now
        everything = http.post(f"{LETTERS}/replay", json={})  # all: said, never implied
        replayed = http.post(f"{LETTERS}/replay", json={"all": True}).json()
        new_run = replayed["runs"][ids[1]]
        wait_for(lambda: _status(http, new_run) == "completed", 30, "the replayed run")
        after = http.get(LETTERS).json()
        gauge_after = value(scrape(open_server), "alto_dead_letters", pipeline="dead")
        unknown = http.get("/v1/pipelines/nope/dead-letters")
    assert [d["run"] for d in listed["data"]] == [first, second]  # oldest first
    assert [d["input"] for d in listed["data"]] == ["good bad", "bad fine"]
    assert all(d["stage"] == "check" and "ValueError" in d["reason"] for d in listed["data"])
    assert listed["unresolved"] == 2 and gauge_before == 2
    assert len(again["data"]) == 1 and again["unresolved"] == 2  # listing resolves nothing
    assert_error_shape(missing, 404, "dead_letter_not_found")
    assert everything.status_code == 400
    assert dropped == {"object": "dead_letters.dropped", "dropped": 1}
    assert list(replayed["runs"]) == [ids[1]] and new_run not in (first, second)
    assert after == {"object": "list", "data": [], "unresolved": 0}
    assert gauge_after == 0  # the alert clears
    assert_error_shape(unknown, 404, "pipeline_not_found")


@pytest.mark.parametrize(("body", "param", "code", "problem"), [
    ({}, None, "missing_required_parameter", "missing 'ids' or 'all'"),
    ({"idz": ["1-1"]}, None, "missing_required_parameter", "missing 'ids' or 'all'"),
    (None, None, "missing_required_parameter", "missing request body"),
    ([], None, "invalid_value", "invalid request body: not a JSON object"),
    ({"all": False}, "all", "invalid_value", "invalid value for 'all'"),
    ({"ids": []}, "ids", "invalid_value", "invalid value for 'ids'"),
    ({"ids": [""]}, "ids[0]", "invalid_value", "invalid value for 'ids[0]'"),
    ({"ids": ["1-1"], "x": 1}, "x", "invalid_value", "invalid value for 'x'"),
    ({"ids": ["1-1"], "all": True}, None, "invalid_value", "'ids' and 'all' together"),
], ids=["empty", "other-key", "no-body", "not-an-object", "all-false", "no-ids", "empty-id",
        "extra-key", "both"])
@pytest.mark.parametrize("action", ["replay", "drop"])
def test_a_wrong_selection_names_both_shapes(open_server: LiveServer, action: str,
                                             body: object, param: str | None, code: str,
                                             problem: str) -> None:
    """The body is `{"ids": [...]}` or `{"all": true}`: a 400 named only the first shape
    (`missing required field 'DeadLetterIds.ids'`, a schema name for a field), so
    `{"all": true}` stayed hidden. The problem is the one of the shape the body meant."""
    with httpx.Client(base_url=open_server.url, timeout=30) as http:
        r = http.post(f"{LETTERS}/{action}", json=body) if body is not None \
            else http.post(f"{LETTERS}/{action}")
    err = assert_error_shape(r, 400, code)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(problem), err
    assert '{"ids": [letter id, ...]}' in err["message"], err
    assert '{"all": true}' in err["message"] and "DeadLetterIds" not in err["message"], err


def test_a_letter_without_its_input_is_not_replayed(open_server: LiveServer) -> None:
    with httpx.Client(base_url=open_server.url, timeout=30) as http:
        r = http.post(f"{LETTERS}/replay", json={"ids": ["not-an-id"]})
    assert_error_shape(r, 404, "dead_letter_not_found")


def test_with_api_keys_only_an_admin_key_may_use_them(broken: set[str]) -> None:
    server = make_server(("dead",), api_keys=[USER_KEY], admin_api_keys=[ADMIN_KEY])
    keyless = make_server(("dead",), api_keys=[USER_KEY])
    try:
        def get(s: LiveServer, key: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.get(f"{s.url}{LETTERS}", headers=headers, timeout=30)

        as_admin, as_user, anonymous = get(server, ADMIN_KEY), get(server, USER_KEY), get(server, None)
        no_admin_configured = get(keyless, USER_KEY)
        # an admin key is an API key too
        models = httpx.get(f"{server.url}/v1/models", timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        user_drop = httpx.post(f"{server.url}{LETTERS}/drop", json={"all": True}, timeout=30,
                               headers={"Authorization": f"Bearer {USER_KEY}"})
    finally:
        server.stop()
        keyless.stop()
    assert as_admin.status_code == 200 and as_admin.json()["object"] == "list"
    assert_error_shape(as_user, 403, "admin_key_required")
    assert_error_shape(anonymous, 401, "invalid_api_key")
    assert_error_shape(no_admin_configured, 403, "admin_key_required")
    assert models.status_code == 200
    assert_error_shape(user_drop, 403, "admin_key_required")


def test_a_replayed_run_belongs_to_the_failed_runs_owner(broken: set[str]) -> None:
    """Only the key that sent the input reads its replay (QA: a replay had no owner, so
    every API key could read it, input included)."""
    other = "sk-alto-other"
    server = make_server(("dead",), api_keys=[USER_KEY, other], admin_api_keys=[ADMIN_KEY])
    broken.add("bad")
    try:
        def as_(key: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}"}

        with httpx.Client(base_url=server.url, timeout=30) as http:
            r = http.post("/v1/pipelines/dead/runs", json={"input": "secret bad"},
                          headers=as_(USER_KEY))
            assert r.json()["status"] == "failed", r.text
            broken.clear()
            replayed = http.post(f"{LETTERS}/replay", json={"all": True},
                                 headers=as_(ADMIN_KEY)).json()
            (new_run,) = replayed["runs"].values()
            owner_reads = http.get(f"/v1/runs/{new_run}", headers=as_(USER_KEY))
            other_reads = http.get(f"/v1/runs/{new_run}", headers=as_(other))
            admin_reads = http.get(f"/v1/runs/{new_run}", headers=as_(ADMIN_KEY))
    finally:
        server.stop()
    assert owner_reads.status_code == 200, owner_reads.text
    assert_error_shape(other_reads, 404, "run_not_found")
    assert_error_shape(admin_reads, 404, "run_not_found")  # the owner's run, not the admin's
