"""`alto run`, `alto worker` and `alto serve` resolve the same settings the same way:
ALTO_REDIS_URL, ALTO_ENGINE and ALTO_ENGINE_OPTIONS first, their flags on top (an
--engine-opt overrides one option, not the whole setting). `alto run` used to ignore
ALTO_REDIS_URL and ALTO_ENGINE_OPTIONS, and `alto worker` ALTO_ENGINE_OPTIONS, so the
same environment meant different engines to different commands. Every test runs the real
CLI as a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.routing import stage_group
from orchestrator.spec import load_pipeline
from tests.test_cli_errors import FAST, NOWHERE, PIPELINE, alto, clean_env, one_line_error
from tests.test_cli_startup import lm_pipeline
from tests.toy.oracle import evaluate
from tests.waiting import eventually
from tests.worker_procs import ROOT
from workers.redis_transport import RedisTransport

COMMANDS = {
    "run": ["run", str(PIPELINE), "-i", "x"],
    "worker": ["worker", "-p", str(PIPELINE), "--stage", "split", "--redis-url", NOWHERE],
    "serve": ["serve", "-p", str(PIPELINE), "--port", "0"],
}
BAD_OPTION = {"ALTO_ENGINE": "sim", "ALTO_ENGINE_OPTIONS": '{"instances": 0}'}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_reads_the_engine_options_setting(command: str) -> None:
    """An option that does not validate is named as the setting it came from: the
    setting was read (run and worker used to drop it and start on the engine's defaults)."""
    line = one_line_error(alto(*COMMANDS[command], env=clean_env(**BAD_OPTION), timeout=30))
    assert "ALTO_ENGINE_OPTIONS instances" in line, line
    assert "greater than or equal to 1" in line, line


@pytest.mark.parametrize("command", list(COMMANDS))
def test_engine_options_setting_without_an_engine_is_an_error(command: str) -> None:
    """As --engine-opt without --engine is: nothing would use them."""
    env = clean_env(ALTO_ENGINE_OPTIONS='{"seed": 1}')
    line = one_line_error(alto(*COMMANDS[command], env=env, timeout=30))
    assert "ALTO_ENGINE_OPTIONS needs ALTO_ENGINE (or --engine)" in line, line


def test_flags_override_the_settings_option_by_option() -> None:
    """--engine over ALTO_ENGINE, --engine-opt over the same key of ALTO_ENGINE_OPTIONS
    (the setting's other keys stay): the bad values in the environment are never used."""
    env = clean_env(ALTO_ENGINE="bogus",
                    ALTO_ENGINE_OPTIONS='{"instances": 0, "time_scale": 0.01}')
    proc = alto("run", str(PIPELINE), "-i", "a b", "--json", "--engine", "sim",
                "--engine-opt", "instances=1", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.splitlines()[-1])
    assert last["units"] == evaluate(load_pipeline(PIPELINE), "a b")


@pytest.mark.redis
def test_run_uses_the_redis_url_setting(redis_url: str) -> None:
    """ALTO_REDIS_URL alone sends the run to Redis, as it does for `alto worker` and `alto
    serve`: with no workers there, it says so (it used to run every stage in-process)."""
    proc = alto("run", str(PIPELINE), "-i", "a b", "--deadline", "30",
                env=clean_env(ALTO_REDIS_URL=redis_url))
    line = one_line_error(proc, 1)
    assert "no worker serves stage(s) split, expandx5, group, final" in line, line


def test_run_on_the_redis_url_setting_refuses_local_options() -> None:
    """Named as the setting (the user may not know it is set), with the way out."""
    proc = alto("run", str(PIPELINE), "-i", "x", "--engine", "sim",
                env=clean_env(ALTO_REDIS_URL=NOWHERE))
    line = one_line_error(proc)
    assert "--engine cannot be combined with ALTO_REDIS_URL" in line, line
    assert "ALTO_REDIS_URL= empty to run here" in line, line


def test_run_with_an_empty_redis_url_setting_runs_here() -> None:
    proc = alto("run", str(PIPELINE), "-i", "x y", env=clean_env(ALTO_REDIS_URL=""))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == evaluate(load_pipeline(PIPELINE), "x y")[0]


def test_run_help_says_where_the_run_goes() -> None:
    proc = alto("run", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "or else ALTO_REDIS_URL" in text, proc.stdout
    assert "(ALTO_REDIS_URL unset or empty) every stage runs in this process" in text


@pytest.mark.redis
@pytest.mark.parametrize(("env", "flags", "instances", "capacity"), [
    ({"ALTO_INSTANCES": "3", "ALTO_CONCURRENCY": "2"}, [], 3, 2),
    ({"ALTO_INSTANCES": "3", "ALTO_CONCURRENCY": "2"},
     ["--instances", "2", "--concurrency", "1"], 2, 1),
])
async def test_worker_reads_instances_and_concurrency_settings(
        redis_url: str, tmp_path: Path, env: dict[str, str], flags: list[str],
        instances: int, capacity: int) -> None:
    """ALTO_INSTANCES and ALTO_CONCURRENCY size an `alto worker` as they size `alto run`
    and `alto serve`, and its flags override them: the worker ignored both settings (1
    instance, the sim engine's capacity of 256). Read from the instances' heartbeats in
    Redis (what `alto status` counts)."""
    path = lm_pipeline(tmp_path, {"kind": "sim"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "-p", str(path), "--stage", "a",
         "--redis-url", redis_url, *flags],
        cwd=ROOT, env=clean_env(**FAST, **env), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    t = RedisTransport(redis_url)
    group = stage_group("p", "a")
    try:
        async def registered() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return len(await t.members(group)) >= instances

        await eventually(registered, 60, every=0.05)
        members = await t.members(group)
        assert len(members) == instances, members
        assert {m["capacity"] for m in members.values()} == {capacity}, members
    finally:
        await t.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stderr:
            proc.stderr.close()


def test_worker_refuses_an_instances_setting_out_of_range() -> None:
    """A setting gets the range its flag has (typer checks the flag's), in one line."""
    line = one_line_error(alto("worker", "-p", str(PIPELINE), "--stage", "split",
                               "--redis-url", NOWHERE, env=clean_env(ALTO_INSTANCES="0")))
    assert line == ("error: invalid setting ALTO_INSTANCES: 0 is not between 1 and 256 "
                    "(--instances's range)"), line


def test_instances_help_says_it_is_for_lm_stages_only() -> None:
    """A tool or reduce stage runs one runner whatever --instances / ALTO_INSTANCES say (its
    --concurrency sizes it); the help and README said nothing, so a deployment-wide
    ALTO_INSTANCES gave no hint that function stages did not scale with it."""
    proc = alto("worker", "--help", env=clean_env(COLUMNS="1000"))
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "--instances" in x)
    assert "LM stages only" in line, line
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`ALTO_INSTANCES` (LM stages only" in readme
