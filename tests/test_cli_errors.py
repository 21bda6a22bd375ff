"""`alto` with a mistake in its options or its environment says so in one line and exits 2
(no traceback); `alto run --redis-url` refuses what it cannot honour (stages without
workers, options only a local run uses) and cancels its run when it is stopped; records
below the configured log level never print. Every test runs the real CLI as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import yaml

from bench.procs import WorkerProcs
from orchestrator.spec import load_pipeline
from tests.waiting import eventually
from tests.worker_procs import ROOT
from workers.client import follow_run
from workers.redis_transport import RedisTransport
from workers.status import queue_depth

PIPELINE = ROOT / "tests" / "toy" / "pipeline4.yaml"
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens there: these fail before connecting
FAST = {"ALTO_HEARTBEAT_MS": "100"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ALTO_* the developer may have set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTO_")}
    env.pop("COLUMNS", None)  # rich's default width (80): one-liners must not wrap
    return {**env, **extra}


@contextlib.asynccontextmanager
async def serving_on_any_port(env: dict[str, str]) -> AsyncIterator[
        Callable[[Callable[[str], bool]], Awaitable[str]]]:
    """`alto serve --port 0` on PIPELINE; yields `until(pred)`, which reads its stderr up to
    the first line `pred` accepts (60 s at most; fails if the server ends first). The
    server is stopped on the way out."""
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "-p", str(PIPELINE),
                             "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    stderr = proc.stderr
    seen: list[str] = []

    async def until(pred: Callable[[str], bool]) -> str:
        async def read() -> str:
            while True:
                line = await asyncio.to_thread(stderr.readline)
                assert line, f"alto serve ended: {seen}"
                seen.append(line)
                if pred(line):
                    return line

        return await asyncio.wait_for(read(), 60)

    try:
        yield until
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        stderr.close()


def alto(*args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# ---- one-line errors, exit 2 --------------------------------------------------------------


@pytest.mark.parametrize(("args", "env", "names"), [
    (["run", str(PIPELINE), "-i", "x", "--engine", "bogus"], {},
     ["--engine 'bogus'", "'sim', 'openai', 'local' or 'vllm'"]),
    (["run", str(PIPELINE), "-i", "x", "--engine", "sim", "--engine-opt", "instances=0"], {},
     ["--engine-opt instances", "greater than or equal to 1"]),
    (["worker", "-p", str(PIPELINE), "--stage", "split", "--redis-url", "http://foo"], {},
     ["--redis-url http://foo", "scheme"]),
    (["serve", "--port", "0"], {"ALTO_PORT": "abc"}, ["ALTO_PORT", "valid integer"]),
    (["serve", "--port", "0"], {"ALTO_PIPELINES": "[x"}, ["ALTO_PIPELINES", "not valid JSON"]),
    (["serve", "-p", str(PIPELINE), "--port", "0"], {"ALTO_API_KEYS": "sha256:abc"},
     ["ALTO_API_KEYS", "64 hex digits"]),
    (["serve", "-p", str(PIPELINE), "--port", "0"],
     {"ALTO_API_KEYS": "sk-1", "ALTO_ADMIN_API_KEYS": "sk-2,sha256:abc"},
     ["ALTO_ADMIN_API_KEYS entry 1", "64 hex digits"]),
    (["serve", "-p", str(PIPELINE), "--port", "0"], {"ALTO_ENGINE": "bogus"},
     ["ALTO_ENGINE 'bogus'"]),
    (["serve", "-p", str(PIPELINE), "--port", "0", "--redis-url", "http://foo"], {},
     ["--redis-url http://foo", "scheme"]),
    (["check", str(PIPELINE)], {"ALTO_LOG_FORMAT": "xml"}, ["ALTO_LOG_FORMAT", "'xml'"]),
    (["check", str(PIPELINE)], {"ALTO_LOG_LEVEL": "loud"}, ["ALTO_LOG_LEVEL", "'loud'"]),
    (["serve", "-p", str(PIPELINE)], {"ALTO_PORT": "70000"},
     ["ALTO_PORT", "less than or equal to 65535"]),
    (["worker", "-p", str(PIPELINE), "--stage", "split", "--redis-url", NOWHERE],
     {"ALTO_METRICS_PORT": "-1"}, ["ALTO_METRICS_PORT", "greater than or equal to 0"]),
], ids=["run-engine", "run-engine-opt", "worker-redis-url", "port", "pipelines", "api-keys",
        "admin-api-keys", "serve-engine", "serve-redis-url", "log-format", "log-level", "port-range",
        "metrics-port-range"])
def test_a_mistake_is_one_line_naming_the_option_or_setting(
        args: list[str], env: dict[str, str], names: list[str]) -> None:
    line = one_line_error(alto(*args, env=clean_env(**env), timeout=30))
    for name in names:
        assert name in line, line


@pytest.mark.parametrize(("args", "line"), [
    (["run", str(PIPELINE), "-i", "x", "--deadline", "-1"],
     "error: Invalid value for '--deadline': Input should be greater than or equal to 0 "
     "(see python -m app.cli run --help)"),
    (["serve", "--port", "70000"],
     "error: Invalid value for '--port': Input should be less than or equal to 65535 "
     "(see python -m app.cli serve --help)"),
    (["run", str(PIPELINE), "-i", "x", "--no-such-flag"],
     "error: No such option: --no-such-flag (see python -m app.cli run --help)"),
    (["run", "-i", "x"], "error: Missing argument 'pipeline'. (see python -m app.cli run --help)"),
    (["dead-letters", "list"],
     "error: Missing option '--pipeline' / '-p'. (see python -m app.cli dead-letters list "
     "--help)"),
    (["nope"], "error: No such command 'nope'. (see python -m app.cli --help)"),
], ids=["deadline-range", "port-range", "unknown-option", "missing-argument", "subgroup",
        "unknown-command"])
def test_a_usage_error_is_one_line(args: list[str], line: str) -> None:
    """What click refuses before a command runs is said as alto says its own mistakes, one
    line, exit 2: typer drew an error box of five lines (README: "Mistakes in options ...
    are one line naming the option")."""
    assert one_line_error(alto(*args, timeout=30)) == line


def test_help_is_still_typer_s() -> None:
    """The usage errors' one line leaves `--help` (and `alto` alone) as typer draws it."""
    proc = alto("run", "--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "╭─ Options" in proc.stdout and "--deadline" in proc.stdout, proc.stdout
    bare = alto(timeout=30)
    assert "╭─ Commands" in bare.stdout + bare.stderr, (bare.stdout, bare.stderr)


def test_a_spec_error_is_one_line_however_long(tmp_path: Path) -> None:
    """rich wrapped it at 80 columns (no terminal: its default width), so the last word
    of `stages.a.framing: framing 'items' is for tool/reduce stages` had a line of its
    own, and `[...]` in a message could be read as markup."""
    path = tmp_path / "a-rather-long-file-name-for-a-pipeline-spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "stages": [
        {"name": "a", "kind": "lm", "prompt": "{input}", "framing": "items"}]}))
    line = one_line_error(alto("check", str(path), timeout=30))
    assert line.startswith(f"invalid pipeline {path}: stages.a.framing: framing 'items' is "
                           "for tool/reduce stages"), line


def test_serve_checks_its_stage_functions_before_starting(tmp_path: Path) -> None:
    """As `alto worker` and `alto run` do, not with a traceback from uvicorn's lifespan."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "stages": [
        {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
         "framing": "items", "to": ["up"]},
        {"name": "up", "kind": "tool", "function": "tests.toy.stages:no_such_function"}]}))
    line = one_line_error(alto("serve", "-p", str(path), "--port", "0", timeout=30))
    assert line.startswith("cannot start stage 'up': stages.up.function: cannot import "
                           "'tests.toy.stages:no_such_function'"), line


@pytest.mark.parametrize("command", [
    ["run", str(PIPELINE), "-i", "x"],
    ["worker", "-p", str(PIPELINE), "--stage", "split", "--redis-url", NOWHERE],
    ["serve", "-p", str(PIPELINE), "--port", "0"],
], ids=["run", "worker", "serve"])
def test_engine_opt_without_engine_is_an_error(command: list[str]) -> None:
    line = one_line_error(alto(*command, "--engine-opt", "seed=1", timeout=30))
    assert "--engine-opt needs --engine" in line, line


@pytest.mark.parametrize("local", [["--no-stream"], ["--engine", "sim"],
                                   ["--engine-opt", "seed=1"]],
                         ids=["no-stream", "engine", "engine-opt"])
def test_run_on_redis_refuses_options_only_a_local_run_uses(local: list[str]) -> None:
    line = one_line_error(alto("run", str(PIPELINE), "-i", "x", "--redis-url", NOWHERE, *local))
    assert f"{local[0]} cannot be combined with --redis-url" in line, line


@pytest.mark.parametrize(("args", "option"), [
    (["run", str(PIPELINE), "-i", "x", "--deadline", "-1"], "--deadline"),
    (["worker", "-p", str(PIPELINE), "--stage", "split", "--redis-url", NOWHERE,
      "--concurrency", "0"], "--concurrency"),
    (["worker", "-p", str(PIPELINE), "--stage", "split", "--redis-url", NOWHERE,
      "--concurrency", "-1"], "--concurrency"),
    (["serve", "-p", str(PIPELINE), "--port", "70000"], "--port"),
    (["serve", "-p", str(PIPELINE), "--port", "-1"], "--port"),
    (["worker", "-p", str(PIPELINE), "--stage", "split", "--redis-url", NOWHERE,
      "--metrics-port", "65536"], "--metrics-port"),
], ids=["deadline", "concurrency-0", "concurrency-negative", "port-over", "port-negative",
        "metrics-port-over"])
def test_out_of_range_numbers_are_rejected(args: list[str], option: str) -> None:
    """A usage error (exit 2) before anything starts: uvicorn, given a port over 65535,
    said it was listening there and served nothing."""
    proc = alto(*args, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert f"Invalid value for '{option}'" in proc.stderr


# ---- logging ------------------------------------------------------------------------------


def test_records_below_the_level_do_not_print_whatever_a_library_sets() -> None:
    """bm25s sets its own logger to DEBUG when imported (the factool search stage)."""
    args = ("run", str(ROOT / "examples" / "factool" / "pipeline.sim.yaml"),
            "--input", "Paris is the capital of France.")
    default = alto(*args)
    assert default.returncode == 0, default.stderr
    assert "DEBUG" not in default.stderr, default.stderr
    debug = alto(*args, env=clean_env(ALTO_LOG_LEVEL="debug"))
    assert debug.returncode == 0, debug.stderr
    assert "DEBUG bm25s:" in debug.stderr  # the level is the filter, not the library


async def test_serve_json_logs_keep_uvicorns_own_level() -> None:
    """A guard for the above: with ALTO_LOG_FORMAT=json uvicorn logs through a handler like
    the root's, at `Settings.log_level` (info), as its text handlers do."""
    def uvicorn_started(line: str) -> bool:
        if not line.startswith("{"):
            return False
        record = json.loads(line)
        return bool(record["logger"].startswith("uvicorn")
                    and "startup complete" in record["message"])

    async with serving_on_any_port(clean_env(ALTO_LOG_FORMAT="json")) as until:
        await until(uvicorn_started)


# ---- alto run --redis-url: workers first, and a stopped run is cancelled -------------------


@pytest.fixture
def pool(redis_url: str) -> Iterator[WorkerProcs]:
    workers = WorkerProcs(redis_url, PIPELINE, clean_env(**FAST))
    try:
        yield workers
    finally:
        workers.stop()


async def test_run_on_redis_names_the_stages_without_workers(
        pool: WorkerProcs, redis_t: RedisTransport, redis_url: str) -> None:
    """What the gateway answers with 503 no_workers; the run used to wait out --deadline."""
    pool.start("split")
    await pool.wait_ready(redis_t)
    proc = await asyncio.to_thread(alto, "run", str(PIPELINE), "-i", "a b",
                                   "--redis-url", redis_url, "--deadline", "30")
    line = one_line_error(proc, 1)
    assert "no worker serves stage(s) expandx5, group, final of pipeline 'toy4'" in line, line
    kept, _, _ = await queue_depth(redis_t, load_pipeline(PIPELINE), "split")
    assert kept == 0  # no run was started


@pytest.mark.parametrize("how", ["sigint", "deadline"])
async def test_stopping_run_cancels_its_run(how: str, tmp_path: Path, redis_url: str,
                                            redis_t: RedisTransport) -> None:
    """SIGINT (Ctrl-C) or --deadline passing: the run's cancel flag is set and an `error`
    event says why, so its worker stops the call (its input is acknowledged) instead of
    generating for a client that is gone."""
    path = tmp_path / "slow.yaml"  # a sim engine at an hour per decode step: never ends
    path.write_text(yaml.safe_dump({
        "name": "slow", "engines": {"default": {"kind": "sim", "decode_base_ms": 3_600_000}},
        "stages": [{"name": "ask", "kind": "lm", "prompt": "{input}", "max_tokens": 8}]}))
    spec = load_pipeline(path)
    workers = WorkerProcs(redis_url, path, clean_env(**FAST))
    proc: subprocess.Popen[str] | None = None
    try:
        workers.start("ask")
        await workers.wait_ready(redis_t)
        args = ["run", str(path), "-i", "a question", "--redis-url", redis_url, "--json"]
        if how == "deadline":
            args += ["--deadline", "2"]
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=ROOT,
                                env=clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            first = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert first, proc.stderr.read() if proc.stderr else ""
            run = json.loads(first)["run"]

            async def in_flight(n: int) -> bool:
                return (await queue_depth(redis_t, spec, "ask"))[1] == n

            if how == "sigint":
                await eventually(lambda: in_flight(1), 60, every=0.05)  # the worker has it
                proc.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
        assert code == (128 + signal.SIGINT if how == "sigint" else 1), err
        assert await redis_t.is_cancelled(run)
        events = [ev async for _, ev in follow_run(redis_t, spec, run, deadline_s=10)]
        assert events[-1]["type"] == "error", events
        assert events[-1]["code"] == ("cancelled" if how == "sigint" else "deadline_exceeded")
        await eventually(lambda: in_flight(0), 60, every=0.05)  # the worker let go of it
    finally:
        workers.stop()
        for pipe in (proc.stdout, proc.stderr) if proc is not None else ():
            if pipe:
                pipe.close()
