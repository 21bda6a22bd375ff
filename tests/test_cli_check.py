"""`alto check` and the spec lint behind it: a pipeline is checked without running it
(spec, imports, engines, prompt placeholders), with exit codes a CI can use. The lint's
point: templates leave unknown `{names}` as written (prompts may show JSON), so a typo
such as `{claim}` for the stage `claims` used to reach the model silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.lint import ancestors, call_errors, lint
from orchestrator.spec import parse_pipeline
from tests.worker_procs import ROOT
from workers.stagefn import resolve

FACTOOL = ROOT / "examples" / "factool" / "pipeline.yaml"


def alto_check(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "check", str(path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def write(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def chain(*stages: dict[str, Any], engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stages in a line (each `to` the next), on a sim engine unless told otherwise."""
    out = [dict(s) for s in stages]
    for a, b in zip(out, out[1:], strict=False):
        a.setdefault("to", [b["name"]])
    return {"name": "p", "engines": engines or {"default": {"kind": "sim"}}, "stages": out}


SPLIT = {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
         "framing": "items"}


def test_the_example_pipelines_pass_strict() -> None:
    for path in (FACTOOL, ROOT / "examples" / "factool" / "pipeline.sim.yaml"):
        proc = alto_check(path, "--strict")
        assert proc.returncode == 0, proc.stderr
        assert all(s in proc.stdout for s in ("claims", "queries", "search", "verify", "report"))
        assert "ok 5 stages" in proc.stderr


def test_a_misspelt_placeholder_is_a_warning_and_strict_fails_on_it(tmp_path: Path) -> None:
    path = write(tmp_path, chain(SPLIT, {"name": "ask", "kind": "lm",
                                         "prompt": "Check {splitt} against {input}."}))
    relaxed, strict = alto_check(path), alto_check(path, "--strict")
    assert relaxed.returncode == 0 and strict.returncode == 1
    for proc in (relaxed, strict):
        assert "stages.ask.prompt: {splitt} is left as written" in proc.stderr
        assert "neither a built-in" in proc.stderr


def test_a_function_that_does_not_import_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, chain(SPLIT, {"name": "up", "kind": "tool",
                                         "function": "tests.toy.stages:no_such_function"}))
    proc = alto_check(path)
    assert proc.returncode == 1
    assert "stages.up.function: cannot import 'tests.toy.stages:no_such_function'" in proc.stderr


@pytest.mark.parametrize(("stage", "message"), [
    ({"name": "up", "kind": "tool", "function": "tests.toy.miscalled:one_arg"},
     "stages.up.function: 'tests.toy.miscalled:one_arg' cannot be called with (value, ctx), "
     "as the runtime calls it: its signature is (value) (too many positional arguments)"),
    ({"name": "up", "kind": "tool", "function": "tests.toy.miscalled:words"},
     "stages.up.function: 'tests.toy.miscalled:words' is a generator function"),
    ({"name": "up", "kind": "lm", "prompt": "{input}",
      "responder": "tests.toy.miscalled:responder_one_arg"},
     "stages.up.responder: 'tests.toy.miscalled:responder_one_arg' cannot be called with "
     "(prompt, params)"),
    ({"name": "up", "kind": "lm", "prompt": "{input}",
      "responder": "tests.toy.miscalled:async_responder"},
     "stages.up.responder: 'tests.toy.miscalled:async_responder' is an async function"),
], ids=["one-argument", "sync-generator", "responder-one-argument", "async-responder"])
def test_a_function_the_runtime_cannot_call_is_an_error(
        tmp_path: Path, stage: dict[str, Any], message: str) -> None:
    """It imports, but every call of it would fail (a TypeError, or a generator object
    that is no output), which a run used to be the first to show."""
    proc = alto_check(write(tmp_path, chain(SPLIT, stage)))
    assert proc.returncode == 1, proc.stderr
    assert f"error {message}" in " ".join(proc.stderr.split()), proc.stderr


def function_errors(name: str) -> list[str]:
    """`call_errors` of a tool stage running tests.toy.miscalled's `name`."""
    path = f"tests.toy.miscalled:{name}"
    stage = spec_of(SPLIT, {"name": "up", "kind": "tool", "function": path}).stage("up")
    return call_errors(stage, resolve(path, stage="up", field_name="function"))


@pytest.mark.parametrize("name", ["async_words", "with_default", "star_args", "splitter"])
def test_functions_the_runtime_can_call_pass(name: str) -> None:
    """Extra parameters with defaults, *args, an async generator, a callable object."""
    assert function_errors(name) == []


def test_a_callable_object_is_checked_by_its_call_method() -> None:
    assert "is a generator function" in function_errors("generating_splitter")[0]


def test_an_invalid_spec_exits_2_naming_stage_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, chain(SPLIT, {"name": "up", "kind": "tool",
                                         "function": "tests.toy.stages:upper", "retries": 99}))
    proc = alto_check(path)
    assert proc.returncode == 2 and "stages.up.retries" in proc.stderr


def test_a_wrong_engine_option_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, chain(
        {"name": "ask", "kind": "lm", "prompt": "{input}"},
        engines={"default": {"kind": "openai", "base_url": "http://h", "retrys": 2}}))
    proc = alto_check(path)
    assert proc.returncode == 1
    assert "error engines.default: openai engine: unknown option(s) ['retrys']" in proc.stderr


def test_a_base_url_without_a_scheme_is_an_invalid_spec(tmp_path: Path) -> None:
    """QA: `localhost:8901` said `ok`, and the run failed on a connect to `/8901/v1/...`."""
    path = write(tmp_path, chain(
        {"name": "ask", "kind": "lm", "prompt": "{input}"},
        engines={"default": {"kind": "openai", "base_url": "localhost:8901", "model": "m"}}))
    proc = alto_check(path)
    assert proc.returncode == 2
    assert "engines.default.base_url: must be an http(s) URL" in proc.stderr


def test_an_engine_that_needs_the_environment_is_a_warning(tmp_path: Path) -> None:
    """No base_url in the spec: where it runs, ALTO_OPENAI_BASE_URL may give one."""
    path = write(tmp_path, chain({"name": "ask", "kind": "lm", "prompt": "{input}"},
                                 engines={"default": {"kind": "openai"}}))
    env = {k: v for k, v in os.environ.items() if k != "ALTO_OPENAI_BASE_URL"}
    relaxed = subprocess.run([sys.executable, "-m", "app.cli", "check", str(path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    strict = subprocess.run([sys.executable, "-m", "app.cli", "check", str(path), "--strict"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert relaxed.returncode == 0 and strict.returncode == 1
    assert "warning engines.default: cannot be built here: openai engine: no base_url" \
        in relaxed.stderr


# ---- the lint itself ----------------------------------------------------------------------


def spec_of(*stages: dict[str, Any]) -> Any:
    return parse_pipeline(chain(*stages))


def messages(spec: Any) -> list[str]:
    return [str(w) for w in lint(spec)]


def test_placeholders_of_upstream_stages_and_builtins_are_known() -> None:
    spec = spec_of(SPLIT, {"name": "ask", "kind": "lm", "prompt": "{input} {text} {split}"},
                   {"name": "again", "kind": "lm", "prompt": "{split} / {ask} / {text}"})
    assert messages(spec) == []
    assert ancestors(spec) == {"split": set(), "ask": {"split"}, "again": {"split", "ask"}}


def test_items_text_and_downstream_stages_are_named_for_what_they_are() -> None:
    spec = spec_of(
        SPLIT,
        {"name": "ask", "kind": "lm", "prompt": "{items} {later} {json}"},
        {"name": "later", "kind": "lm", "prompt": "{text}"},
        {"name": "sum", "kind": "lm", "aggregate_by": ["request", "split"],
         "prompt": "{split} {items} {text} {ask} {input}"},
    )
    assert messages(spec) == [
        "stages.ask.prompt: {items} is left as written (only an aggregating stage "
        "(aggregate_by) has items)",
        "stages.ask.prompt: {later} is left as written (stage 'later' is not upstream of "
        "this stage)",
        "stages.ask.prompt: {json} is left as written (neither a built-in (input, text, "
        "items) nor a stage of the pipeline)",
        "stages.sum.prompt: {text} is left as written (an aggregating stage has {items}, "
        "not {text})",
        "stages.sum.prompt: {ask} is left as written (stage 'ask' is upstream, but its text "
        "does not reach this stage: an aggregating stage keeps only the input and the stages "
        "up to its innermost aggregate_by stage, for itself and what follows it, and a stage "
        "reached by several paths gets only what every path carries)",
    ]


def test_what_an_aggregation_or_a_join_drops_is_not_known_after_it() -> None:
    """Downstream of an aggregating stage a unit carries only what the group shared; a
    stage reached by two paths only what both carry."""
    after_agg = spec_of(
        SPLIT,
        {"name": "check", "kind": "tool", "function": "tests.toy.stages:upper"},
        {"name": "final", "kind": "reduce", "function": "tests.toy.stages:collect",
         "aggregate_by": ["request"]},
        {"name": "show", "kind": "lm", "prompt": "{final} {input} {check} {split}"},
    )
    assert [w.message.split(" (")[0] for w in lint(after_agg)] == [
        "{check} is left as written", "{split} is left as written"]
    join = parse_pipeline({"name": "j", "engines": {"default": {"kind": "sim"}}, "stages": [
        {**SPLIT, "to": ["a", "b"]},
        {"name": "a", "kind": "tool", "function": "tests.toy.stages:upper", "to": ["ask"]},
        {"name": "b", "kind": "tool", "function": "tests.toy.stages:upper", "to": ["ask"]},
        {"name": "ask", "kind": "lm", "prompt": "{split} {a}"},
    ]})
    assert [w.message.split(" (")[0] for w in lint(join)] == ["{a} is left as written"]


@pytest.mark.parametrize("prompt", ['Answer as {"verdict": true}.', 'A set: { 1, 2 }.',
                                    "In code: if x { other }"])
def test_json_and_other_braces_are_not_placeholders(prompt: str) -> None:
    assert messages(spec_of(SPLIT, {"name": "ask", "kind": "lm", "prompt": prompt})) == []


def test_a_placeholder_written_with_blanks_is_a_warning() -> None:
    """`{ input }` (or Jinja's `{{ split }}`) is left as written by the renderer, so the
    model would read the braces: said for names a placeholder could mean (a built-in or
    a stage), not for any word in braces (`{ other }` in a code sample)."""
    from orchestrator.template import render

    prompt = 'Check { input } against {{ split }}, {"a": {  split\t}} and { other }.'
    assert render(prompt, {"input": "I", "split": "S"}) == prompt
    assert messages(spec_of(SPLIT, {"name": "ask", "kind": "lm", "prompt": prompt})) == [
        "stages.ask.prompt: { input } is left as written (a placeholder has no blanks inside "
        "its braces: write {input} to fill it in)",
        # quoted as the prompt has it (it said `{ split }`, which it did not have), but for
        # a brace that closes the JSON around it and blanks shown as spaces (one line)
        "stages.ask.prompt: {{ split }} is left as written (a placeholder has no blanks "
        "inside its braces: write {split} to fill it in)",
        "stages.ask.prompt: {  split } is left as written (a placeholder has no blanks "
        "inside its braces: write {split} to fill it in)",
    ]


def test_an_escaped_placeholder_is_text_for_the_lint_and_the_model() -> None:
    """`{{name}}` shows the model a placeholder itself: the lint does not take it for a
    typo, and the prompt the stage sends has it in single braces."""
    from orchestrator.template import render

    prompt = "Fill {{claims}} and {{nowhere}} in with {input}."
    assert messages(spec_of(SPLIT, {"name": "ask", "kind": "lm", "prompt": prompt})) == []
    assert render(prompt, {"input": "I", "claims": "C"}) == "Fill {claims} and {nowhere} in with I."


@given(name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,8}", fullmatch=True),
       value=st.text(max_size=10), around=st.text(alphabet="ab {}\"", max_size=6))
def test_escaped_names_render_as_written_and_others_fill(name: str, value: str, around: str) -> None:
    from orchestrator.template import render, variables

    escaped = render(around + "{{" + name + "}}" + around, {name: value})
    assert ("{" + name + "}") in escaped and variables("{{" + name + "}}") == []
    assert render("{" + name + "}", {name: value}) == value


def test_an_lm_stage_left_on_the_implicit_simulator_is_a_warning() -> None:
    """No `engines:` (or an engine without `kind`) means the simulator: say so, since its
    pseudo-text looks like a model gone wrong. A written `kind: sim` is a choice."""
    ask = {"name": "ask", "kind": "lm", "prompt": "{input}"}
    implicit = parse_pipeline({"name": "p", "stages": [ask]})
    assert [(w.stage, w.field) for w in lint(implicit)] == [("ask", "engine")]
    assert "simulated engine" in str(lint(implicit)[0])
    no_kind = parse_pipeline({"name": "p", "engines": {"default": {"model": "m"}}, "stages": [ask]})
    assert [(w.stage, w.field) for w in lint(no_kind)] == [("ask", "engine")]
    assert lint(parse_pipeline(chain(ask))) == []  # kind: sim, written


UP = {"name": "up", "kind": "tool", "function": "tests.toy.stages:upper"}
ALL = {"name": "all", "kind": "reduce", "function": "tests.toy.stages:collect",
       "aggregate_by": ["request"]}
INERT = [
    "stages.up.partitions: has no effect: only an aggregating stage (aggregate_by) is "
    "partitioned, by its groups; a stage without aggregate_by reads one stream that all its "
    "instances share",
    "stages.up.retry_backoff_s: has no effect: the stage has no retries (retries: 0), so a "
    "failed call is never tried again; set retries to use the backoff",
]


def test_partitions_without_aggregate_by_and_a_backoff_without_retries_are_warnings() -> None:
    """Both load (they are valid settings) and do nothing: the author meant to spread a
    stage over partitions, or to retry its failed calls, and would not find out."""
    spec = spec_of(SPLIT, {**UP, "partitions": 8, "retry_backoff_s": 2.0}, ALL)
    assert messages(spec) == INERT
    assert [(w.stage, w.field) for w in lint(spec)] == [("up", "partitions"),
                                                        ("up", "retry_backoff_s")]
    explicit_zero = spec_of(SPLIT, {**UP, "retries": 0, "retry_backoff_s": 1.0}, ALL)
    assert messages(explicit_zero) == INERT[1:]


def test_partitions_and_a_backoff_where_they_act_are_no_warning() -> None:
    spec = spec_of(SPLIT, {**UP, "retries": 2, "retry_backoff_s": 0.1},
                   {**ALL, "partitions": 8, "retries": 1, "retry_backoff_s": 3.0})
    assert messages(spec) == []


RESPOND = {"name": "ask", "kind": "lm", "prompt": "{input}",
           "responder": "tests.toy.stages:repetitive"}


@pytest.mark.parametrize("kind", ["openai", "local", "vllm"])
def test_a_responder_on_an_engine_that_is_not_sim_is_a_warning(kind: str) -> None:
    """QA: only the sim engine calls a responder; on an openai stage it passed the check
    silently, though the docs say check warns about settings that do nothing."""
    engines = {"default": {"kind": "sim"}, "gpu": {"kind": kind, "base_url": "http://h"}}
    spec = parse_pipeline(chain({**RESPOND, "engine": "gpu"}, engines=engines))
    assert messages(spec) == [
        f"stages.ask.responder: has no effect: only a sim engine calls a responder, and "
        f"engine 'gpu' is kind {kind}; it is used only where --engine sim (or "
        f"ALTO_ENGINE=sim) overrides the pipeline's engines"]
    on_sim = parse_pipeline(chain(RESPOND, engines=engines))  # the default engine: sim
    assert messages(on_sim) == []


def test_alto_check_prints_an_inert_setting_and_strict_fails_on_it(tmp_path: Path) -> None:
    path = write(tmp_path, chain(SPLIT, {**UP, "partitions": 8, "retry_backoff_s": 2.0}, ALL))
    relaxed, strict = alto_check(path), alto_check(path, "--strict")
    assert relaxed.returncode == 0 and strict.returncode == 1, relaxed.stderr
    for proc in (relaxed, strict):
        out = " ".join(proc.stderr.split())
        assert all(line in out for line in INERT), proc.stderr


@pytest.mark.parametrize("name", ["one_arg", "words"])
def test_alto_run_refuses_such_a_function_before_any_input(tmp_path: Path, name: str) -> None:
    """The same check when a stage starts (alto run, worker, serve): the run used to start
    and fail on its first input, or (a generator) never run at all."""
    path = write(tmp_path, chain(SPLIT, {"name": "up", "kind": "tool",
                                         "function": f"tests.toy.miscalled:{name}"}))
    proc = subprocess.run([sys.executable, "-m", "app.cli", "run", str(path), "--input", "a b"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, out
    assert f"stages.up.function: 'tests.toy.miscalled:{name}'" in out
    assert "run run_" not in out  # no run was started
