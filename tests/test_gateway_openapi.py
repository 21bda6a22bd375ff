"""The OpenAPI document: the committed openapi/openapi.json is what the app serves and
what `alto openapi` prints, and a bounded schemathesis run against the served schema
(every phase: examples, coverage, fuzzing, stateful; every check) finds no 5xx, no
undocumented status, no schema or SSE-event violation, and no ignored API key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import API_KEY, REPO, LiveServer, pipelines
from workers.settings import Settings

COMMITTED = REPO / "openapi" / "openapi.json"
ST_MAX_EXAMPLES = int(os.environ.get("ALTO_ST_MAX_EXAMPLES", "15"))
ST_SEED = os.environ.get("ALTO_ST_SEED", "20240701")


def test_committed_document_is_what_the_app_serves(gateway: LiveServer) -> None:
    served = httpx.get(f"{gateway.url}/openapi.json").json()
    committed = json.loads(COMMITTED.read_text())
    assert served == committed, (
        "openapi/openapi.json is stale: regenerate it with "
        "`.venv/bin/alto openapi -o openapi/openapi.json`"
    )


def test_alto_openapi_prints_the_committed_document() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "alto"), "openapi"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert out == COMMITTED.read_text()


def test_document_does_not_depend_on_configuration(gateway: LiveServer) -> None:
    """Same document whatever pipelines and keys a server has (so one file can match)."""
    from app.main import create_app
    from workers.settings import Settings

    other = create_app(Settings(api_keys=["k"], max_body_bytes=10), pipelines=[]).openapi()
    assert other == json.loads(COMMITTED.read_text())


def test_factory_reads_its_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`uvicorn app.main:create_app --factory` calls create_app() with no arguments."""
    from app.main import create_app

    toy = REPO / "tests" / "gateway_pipelines" / "toy.yaml"
    monkeypatch.setenv("ALTO_PIPELINES", json.dumps([str(toy)]))
    monkeypatch.setenv("ALTO_API_KEYS", '["from-env"]')
    app = create_app()
    assert [k.get_secret_value() for k in app.state.settings.api_keys] == ["from-env"]
    assert {"/v1/chat/completions", "/v1/pipelines/{name}/runs", "/metrics"} <= set(
        app.openapi()["paths"]
    )


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[LiveServer]:
    """API keys on (so schemathesis can check they are enforced), fast sim engines; the
    key is an admin key too, so the dead-letter endpoints are fuzzed past their 403."""
    # FacTool refuses a blank input (input_required: a semantic 400 no schema can express
    # per model, which schemathesis' positive-data check would count as a valid request
    # refused); tests/test_input_required.py covers that rule
    specs = [s.model_copy(update={"input_required": False}) for s in pipelines("factool", "toy")]
    app = create_app(Settings(api_keys=[API_KEY], admin_api_keys=[API_KEY]), specs)
    server = LiveServer(app, env={"ALTO_SIM_TIME_SCALE": "0.001"}).start()
    try:
        yield server
    finally:
        server.stop()


def test_schemathesis_finds_no_failures(fuzz_target: LiveServer, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_target.url}/openapi.json",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--max-examples", str(ST_MAX_EXAMPLES),
        "--seed", ST_SEED,
        "--checks", "all",
        "--request-timeout", "30",
        "--no-color",
    ]
    # cwd: schemathesis keeps its example database and reports in the working directory
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failure" not in proc.stdout.lower(), tail
