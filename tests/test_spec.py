"""Pipeline spec validation: every mistake fails at load, naming the stage and the field."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from orchestrator.spec import SpecError, load_pipeline, parse_pipeline, with_streaming
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
T = "tests.toy.stages:"

BASE: dict[str, Any] = {
    "name": "p",
    "stages": [
        {"name": "a", "kind": "tool", "function": T + "split_words", "framing": "items", "to": ["b"]},
        {"name": "b", "kind": "lm", "prompt": "say {a}", "to": ["c"]},
        {"name": "c", "kind": "reduce", "function": T + "join", "aggregate_by": ["request", "a"],
         "to": ["d"]},
        {"name": "d", "kind": "reduce", "function": T + "join", "aggregate_by": ["request"]},
    ],
}


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    node: Any = raw
    for p in path[:-1]:
        node = node[p]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


def test_base_is_valid_and_graph_facts() -> None:
    spec = parse_pipeline(BASE)
    assert spec.entry_stage == "a" and spec.output_stage == "d"
    assert spec.flow == {s: Fraction(1) for s in "abcd"}
    assert not with_streaming(spec, False).streaming_for("b")


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (["stages", 0, "to"], ["nope"], "stages.a.to[0]"),
        (["stages", 1, "prompt"], KeyError, "stages.b.prompt"),
        (["stages", 1, "engine"], "gpu9", "stages.b.engine"),
        (["stages", 0, "function"], KeyError, "stages.a.function"),
        (["stages", 0, "function"], "no_colon", "stages.a.function"),
        (["stages", 2, "aggregate_by"], ["claims"], "stages.c.aggregate_by"),
        (["stages", 2, "aggregate_by"], ["request", "zzz"], "stages.c.aggregate_by"),
        (["stages", 2, "aggregate_by"], ["request", "c"], "stages.c.aggregate_by"),
        (["stages", 3, "aggregate_by"], ["request", "b"], "stages.d.aggregate_by"),
        (["stages", 3, "aggregate_by"], KeyError, "stages.d.aggregate_by"),
        (["stages", 0, "aggregate_by"], ["request"], "stages.a.aggregate_by"),
        (["stages", 1, "framing"], "paragraphs", "stages.b.framing"),
        (["stages", 1, "max_tokens"], 0, "stages.b.max_tokens"),
        (["stages", 1, "kind"], "llm", "stages.b.kind"),
        (["stages", 1, "colour"], "red", "stages.b.colour"),
        (["stages", 3, "to"], ["a"], "stages."),  # a cycle
        (["stages", 1, "name"], "a", "stages.a.name"),  # duplicate
        # built-in template values: a stage of that name would hide them (QA)
        (["stages", 0, "name"], "input", "stages.input.name: stage name 'input' is reserved"),
        (["stages", 0, "name"], "text", "stages.text.name: stage name 'text' is reserved"),
        (["stages", 0, "name"], "items", "stages.items.name: stage name 'items' is reserved"),
        (["output"], "b", "output"),
    ],
)
def test_invalid_specs_name_stage_and_field(path: list[Any], value: Any, where: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_pipeline(mutate(path, value))
    assert where in str(exc.value)


@pytest.mark.parametrize(("field", "value"), [
    ("prompt", "say {text}"), ("system", "be brief"), ("engine", "default"), ("max_tokens", 9),
    ("temperature", 0.7), ("stop", ["\n"]), ("responder", "x:y"), ("policy", "cache_aware"),
])
def test_lm_fields_on_a_tool_or_reduce_stage_are_refused(field: str, value: Any) -> None:
    """They would do nothing there: the stage calls its function (QA: `prompt` and
    `max_tokens` on a tool passed `alto check`)."""
    for index, name in ((0, "a"), (3, "d")):
        with pytest.raises(SpecError, match=f"stages\\.{name}\\.{field}: .*for lm stages"):
            parse_pipeline(mutate(["stages", index, field], value))


def test_a_function_on_an_lm_stage_is_refused() -> None:
    with pytest.raises(SpecError, match=r"stages\.b\.function: .*tool and reduce"):
        parse_pipeline(mutate(["stages", 1, "function"], T + "upper"))


def test_aggregator_around_which_units_escape_is_rejected() -> None:
    raw = copy.deepcopy(BASE)
    raw["stages"][0]["to"] = ["b", "side"]
    raw["stages"].append({"name": "side", "kind": "tool", "function": T + "upper"})
    raw["output"] = "d"
    with pytest.raises(SpecError, match=r"stages\.[cd]\.aggregate_by: .*without passing this stage"):
        parse_pipeline(raw)


def test_aggregator_that_drops_the_scope_in_between_is_rejected() -> None:
    raw = copy.deepcopy(BASE)
    raw["stages"][2]["aggregate_by"] = ["request"]
    raw["stages"][3]["aggregate_by"] = ["request", "a"]
    with pytest.raises(SpecError, match=r"stages\.d\.aggregate_by: stage 'c' .*drops"):
        parse_pipeline(raw)


@pytest.mark.parametrize("written", ["{{{input}}}", "{{{a}}}", "{{input}}}", "{{{text}}",
                                     "{{{{items}}}}"])
def test_a_placeholder_in_more_braces_is_ambiguous(written: str) -> None:
    """`{{{input}}}` was sent as `{{input}}` (an escape with a brace either side), where
    Python's format would send the value in braces and Mustache the value: refused at
    load, naming the stage and the field, with what to write instead."""
    name = written.strip("{}")
    with pytest.raises(SpecError) as caught:
        parse_pipeline(mutate(["stages", 1, "prompt"], f"say {written} now"))
    assert str(caught.value) == (
        f"stages.b.prompt: {written} is ambiguous: write {{{name}}} for its value, "
        f"{{{{{name}}}}} to show the model {{{name}}} itself, and a blank between braces "
        f"meant as text ({{ {{{name}}} }})")


def test_braces_around_placeholders_as_the_docs_say() -> None:
    """`{x}` is the value, `{{x}}` shows `{x}`, one brace on a side of a placeholder is
    the value with braces around it (JSON), and a name that is no placeholder between
    longer runs of braces is left as written (a Mustache example shown to the model)."""
    from orchestrator.template import render, variables

    prompt = ('{a} {{a}} {"k": {"j": {a}}} {{{body}}} {{{{body}}}} {{body}}} { {a} } '
              "{{a}{input}}")
    parse_pipeline(mutate(["stages", 1, "prompt"], prompt))
    assert render(prompt, {"a": "A", "input": "I"}) == (
        'A {a} {"k": {"j": A}} {{{body}}} {{{{body}}}} {{body}}} { A } {AI}')
    assert variables(prompt) == ["a", "a", "a", "a", "input"]


def test_stop_may_be_one_string_as_in_the_openai_api() -> None:
    """QA: `stop: "END"` failed with `Input should be a valid list`, while the API's
    `"stop": "."` is accepted; one string is a one-element list."""
    assert parse_pipeline(mutate(["stages", 1, "stop"], "END")).stage("b").stop == ["END"]
    assert parse_pipeline(mutate(["stages", 1, "stop"], ["a", "b"])).stage("b").stop == ["a", "b"]
    with pytest.raises(SpecError, match=r"stages\.b\.stop"):
        parse_pipeline(mutate(["stages", 1, "stop"], 5))


def openai_engine(base_url: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw["engines"] = {"gpu": {"kind": "openai", "model": "m", "base_url": base_url}}
    raw["stages"][1]["engine"] = "gpu"
    return raw


@pytest.mark.parametrize("url", ["localhost:8901", "ftp://x", "http://", "gpu-0",
                                 ["http://a:8000", "b:8000"], "http://a,b:8000", ["http://a", 3]])
def test_an_openai_base_url_must_be_http(url: Any) -> None:
    """QA: `localhost:8901` passed the check, and the run failed on `POST /8901/v1/...`
    (UnsupportedProtocol); refused at load, naming the engine and the field."""
    with pytest.raises(SpecError, match=r"^engines\.gpu\.base_url: must be an http\(s\) URL"):
        parse_pipeline(openai_engine(url))


@pytest.mark.parametrize("url", ["http://localhost:8901", "https://api.example.com/v1",
                                 ["http://gpu-0:8000", "http://[::1]:8000"], "http://a, http://b",
                                 None, ""])
def test_http_base_urls_and_none_load(url: Any) -> None:
    """None: ALTO_OPENAI_BASE_URL may give it where the engine runs."""
    parse_pipeline(openai_engine(url))


PIPELINES_MD = ROOT / "docs" / "PIPELINES.md"


def doc_text() -> str:
    return " ".join(PIPELINES_MD.read_text(encoding="utf-8").split())


def test_the_documented_side_branch_around_an_aggregator_is_refused_as_documented() -> None:
    """QA: PIPELINES.md stated only that a scope stage must be on every path into its
    aggregator; the converse (nothing from the scope may end around it), which the loader
    enforces, was in ARCHITECTURE.md only."""
    raw = {"name": "p", "output": "j", "stages": [
        {"name": "split", "kind": "tool", "function": T + "split_words", "framing": "items",
         "to": ["summ"]},
        {"name": "summ", "kind": "tool", "function": T + "upper", "to": ["combine", "note"]},
        {"name": "combine", "kind": "reduce", "function": T + "join",
         "aggregate_by": ["request", "split"], "to": ["j"]},
        {"name": "note", "kind": "tool", "function": T + "upper"},
        {"name": "j", "kind": "reduce", "function": T + "join", "aggregate_by": ["request"]}]}
    with pytest.raises(SpecError) as caught:
        parse_pipeline(raw)
    assert "no path from the scope stage may reach a final stage without passing" in doc_text()
    assert f"`{caught.value}`" in doc_text()


def test_functions_import_from_the_working_directory_as_documented(tmp_path: Path) -> None:
    """QA: nothing said that `module:name` is imported from where alto starts (or
    PYTHONPATH), not next to the spec; the same spec checked from another directory fails."""
    (tmp_path / "work" / "ragpkg").mkdir(parents=True)
    (tmp_path / "work" / "ragpkg" / "__init__.py").write_text("")
    (tmp_path / "work" / "ragpkg" / "fns.py").write_text(
        "def retrieve(value, ctx):\n    return value\n")
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "rag.yaml"
    spec.write_text("name: rag\nstages:\n"
                    "  - {name: retrieve, kind: tool, function: 'ragpkg.fns:retrieve'}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    alto = [str(Path(sys.executable).parent / "alto"), "check", str(spec)]
    here = subprocess.run(alto, cwd=tmp_path / "work", capture_output=True, text=True,
                          timeout=60, env=env)
    assert here.returncode == 0, here.stderr
    beside = subprocess.run(alto, cwd=tmp_path / "specs", capture_output=True, text=True,
                            timeout=60, env=env)
    assert beside.returncode == 1
    said = "stages.retrieve.function: cannot import 'ragpkg.fns:retrieve': No module named " \
           "'ragpkg'"
    assert said in " ".join(beside.stderr.split())
    assert f"`{said}`" in doc_text()
    assert "not a file next to the spec" in doc_text()
    on_path = subprocess.run(alto, cwd=tmp_path / "specs", capture_output=True, text=True,
                             timeout=60, env={**env, "PYTHONPATH": str(tmp_path / "work")})
    assert on_path.returncode == 0, on_path.stderr


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML") as exc:
        load_pipeline(bad)
    assert f'in "{bad}", line 3' in str(exc.value)  # the position names the file too
    with pytest.raises(SpecError, match="cannot read"):
        load_pipeline(tmp_path / "missing.yaml")


def test_cli_reports_invalid_spec_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("name: p\nstages:\n  - {name: a, kind: lm}\n")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "run", str(bad), "--input", "x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "stages.a.prompt" in proc.stderr


def test_settings_accept_json_or_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALTO_API_KEYS", "k1, k2")
    monkeypatch.setenv("ALTO_PIPELINES", '["a.yaml", "b.yaml"]')
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"] and s.pipelines == ["a.yaml", "b.yaml"]
