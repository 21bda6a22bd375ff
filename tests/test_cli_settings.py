"""`alto run`, `alto worker` and `alto serve` resolve the same settings the same way:
ALTO_REDIS_URL, ALTO_ENGINE and ALTO_ENGINE_OPTIONS first, their flags on top (an
--engine-opt overrides one option, not the whole setting). `alto run` used to ignore
ALTO_REDIS_URL and ALTO_ENGINE_OPTIONS, and `alto worker` ALTO_ENGINE_OPTIONS, so the
same environment meant different engines to different commands. Every test runs the real
CLI as a subprocess."""

from __future__ import annotations

import json

import pytest

from orchestrator.spec import load_pipeline
from tests.test_cli_errors import NOWHERE, PIPELINE, alto, clean_env, one_line_error
from tests.toy.oracle import evaluate

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
