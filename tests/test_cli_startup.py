"""`alto` refuses at once, in one line, what would otherwise fail after it had started: an
engine that cannot be built (`alto serve` printed uvicorn's 40-line "Application startup
failed" traceback and exited 3; `alto run` called it a failure of the run, and `alto
worker` a failure to start its stage once connected to Redis, exit 1), a
metrics port that is taken (`alto worker`), an output file that cannot be written
(`alto openapi`).
Every test runs the real CLI as a subprocess."""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

import httpx
import pytest
import yaml

from tests.test_cli_errors import (
    NOWHERE,
    PIPELINE,
    alto,
    clean_env,
    one_line_error,
    serving_on_any_port,
)

KNOWN_SIM = "known options: ['block_size'"


def lm_pipeline(tmp_path: Path, engine: dict[str, object]) -> Path:
    """One LM stage on `engine` (the pipeline's default engine)."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "name": "p", "engines": {"default": engine},
        "stages": [{"name": "a", "kind": "lm", "prompt": "{input}", "max_tokens": 4}]}))
    return path


def command_args(command: str, path: Path) -> list[str]:
    """`command` on the pipeline at `path`, its LM stage `a` for a worker (on a Redis URL
    where nothing listens: the engine is checked before anything connects)."""
    return {"serve": ["serve", "-p", str(path), "--port", "0"],
            "run": ["run", str(path), "-i", "x"],
            "worker": ["worker", "-p", str(path), "--stage", "a", "--redis-url", NOWHERE],
            }[command]


SPEC_ENGINES = {
    "openai-no-base-url": ({"kind": "openai", "model": "m"},
                           "openai engine: no base_url (set the engine option or "
                           "ALTO_OPENAI_BASE_URL)"),
    "sim-unknown-option": ({"kind": "sim", "foo": 1}, "sim engine: unknown option(s) ['foo']"),
}


@pytest.mark.parametrize("command", ["serve", "run", "worker"])
@pytest.mark.parametrize("case", list(SPEC_ENGINES))
def test_an_engine_that_cannot_be_built_is_one_line(command: str, case: str,
                                                    tmp_path: Path) -> None:
    """`alto worker` said it after connecting to Redis, as its stage failed to start
    (exit 1)."""
    engine, why = SPEC_ENGINES[case]
    path = lm_pipeline(tmp_path, engine)
    line = one_line_error(alto(*command_args(command, path), timeout=30))
    assert line.startswith(f"error: invalid engine 'default' of pipeline 'p': {why}"), line


OVERRIDES = {
    "bad-value": (["--engine-opt", "time_scale=abc"], {},
                  "--engine-opt time_scale: sim engine option 'time_scale' must be a number, "
                  "got 'abc'"),
    "unknown-flag": (["--engine-opt", "time_scale=0", "--engine-opt", "bogus=1"], {},
                     "--engine-opt bogus: sim engine: unknown option(s) ['bogus']"),
    "unknown-setting": ([], {"ALTO_ENGINE_OPTIONS": '{"bogus": 1}'},
                        "ALTO_ENGINE_OPTIONS bogus: sim engine: unknown option(s) ['bogus']"),
}


@pytest.mark.parametrize("command", ["serve", "run", "worker"])
@pytest.mark.parametrize("case", list(OVERRIDES))
def test_an_override_option_the_engine_refuses_is_one_line_naming_it(
        command: str, case: str, tmp_path: Path) -> None:
    """The option is named as the flag or the setting it came from (the engine's message
    names only the key)."""
    flags, env, why = OVERRIDES[case]
    path = lm_pipeline(tmp_path, {"kind": "sim", "time_scale": 0})
    line = one_line_error(alto(*command_args(command, path), "--engine", "sim", *flags,
                               env=clean_env(**env), timeout=30))
    assert line.startswith(f"error: invalid engine override: {why}"), line


def test_serve_with_an_engine_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    """An engine that builds (the check before uvicorn passes) but cannot start: a local
    model file that is not there. uvicorn logged the 40-line traceback Starlette handed
    it and exited 3; now one line after uvicorn's own startup lines, exit 1 (what this
    machine lacks, as `alto run` and `alto worker` say it)."""
    path = lm_pipeline(tmp_path, {"kind": "sim", "time_scale": 0})
    model = tmp_path / "missing.gguf"
    proc = alto(*command_args("serve", path), "--engine", "local", "--engine-opt",
                f"model_path={model}", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "startup failed" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [x for x in lines if "error" in x.lower()] == lines[-1:], proc.stderr
    why = f"model file {str(model)!r} not found" if importlib.util.find_spec("llama_cpp") \
        else "the local engine needs llama-cpp-python"
    assert lines[-1].startswith(f"error: cannot start the gateway: {why}"), lines[-1]


def test_a_worker_checks_only_its_own_stage_s_engine(tmp_path: Path) -> None:
    """Another stage's engine may be one this machine cannot build (it runs elsewhere):
    the worker of stage `a` gets past the check, to Redis (where nothing listens)."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "name": "p", "engines": {"default": {"kind": "sim", "time_scale": 0},
                                 "other": {"kind": "sim", "foo": 1}},
        "stages": [{"name": "a", "kind": "lm", "prompt": "{input}", "max_tokens": 4,
                    "to": ["b"]},
                   {"name": "b", "kind": "lm", "engine": "other", "prompt": "{input}",
                    "max_tokens": 4}]}))
    proc = alto(*command_args("worker", path), timeout=30)
    assert proc.returncode == 1 and proc.stderr.startswith("cannot reach Redis"), proc.stderr
    line = one_line_error(alto("worker", "-p", str(path), "--stage", "b", "--redis-url",
                               NOWHERE, timeout=30))
    assert line.startswith("error: invalid engine 'other' of pipeline 'p': sim engine: "
                           "unknown option(s) ['foo']"), line


@pytest.mark.redis
def test_worker_metrics_port_in_use_is_one_line(redis_url: str) -> None:
    """It was a 60-line traceback (OSError from the metrics server's bind); the worker
    ends before its stage starts (no 'worker ready'), its Redis connection closed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = alto("worker", "-p", str(PIPELINE), "--stage", "split", "--redis-url",
                    redis_url, "--metrics-port", str(port),
                    env=clean_env(ALTO_METRICS_HOST="127.0.0.1"), timeout=30)
    line = one_line_error(proc, 1)
    assert line == f"error: cannot serve metrics on 127.0.0.1:{port}: address already in use"


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_openapi_output_that_cannot_be_written_is_one_line(where: str,
                                                           tmp_path: Path) -> None:
    """It was a traceback of the FileNotFoundError (or IsADirectoryError)."""
    path, why = (tmp_path / "no" / "x.json", "no such file or directory") \
        if where == "missing-dir" else (tmp_path, "is a directory")
    line = one_line_error(alto("openapi", "-o", str(path), timeout=30), 1)
    assert line == f"error: cannot write {path}: {why}", line


async def test_serve_on_any_free_port_says_the_port_it_bound() -> None:
    """`alto serve --port 0` printed `http://127.0.0.1:0` as its address; the start line
    now comes once uvicorn has bound, with the real port, where the gateway answers."""
    async with serving_on_any_port(clean_env()) as until:
        line = await until(lambda line: line.startswith("alto gateway"))
        found = re.match(r"alto gateway http://127\.0\.0\.1:(\d+) \(embedded; pipelines: toy4\)$",
                         line.strip())
        assert found, line
        port = int(found[1])
        assert port != 0, line
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert reply.status_code == 200, reply.text


def test_the_startup_guard_takes_its_log_filter_off_again() -> None:
    """`alto serve` quiets uvicorn's startup-failure line with a filter on its logger; each
    serve added one and none was removed (a process serving twice piled them up)."""
    import logging

    from app.cli import _StartupGuard

    logger = logging.getLogger("uvicorn.error")
    before = list(logger.filters)
    guard = _StartupGuard(object())
    assert len(logger.filters) == len(before) + 1
    guard.close()
    assert logger.filters == before
