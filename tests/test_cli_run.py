"""`alto run` end to end: the embedded transport in a real subprocess, JSON event lines."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.spec import load_pipeline
from tests.test_cli_errors import one_line_error
from tests.toy.oracle import evaluate

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "toy" / "pipeline4.yaml"


def alto(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, input=stdin)


def test_run_json_prints_events_ending_with_the_result() -> None:
    text = "one two three"
    proc = alto("run", str(PIPELINE), "--input", text, "--json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert events[0]["type"] == "run"
    assert events[-1]["type"] == "result"
    assert events[-1]["units"] == evaluate(load_pipeline(PIPELINE), text)
    partial_stages = {e["stage"] for e in events if e["type"] == "partial"}
    assert {"split", "final"} <= partial_stages


def test_barrier_mode_gives_the_same_result() -> None:
    text = "alpha beta gamma delta"
    a = alto("run", str(PIPELINE), "--input", text, "--json")
    b = alto("run", str(PIPELINE), "--input", text, "--json", "--no-stream")
    last = [json.loads(p.stdout.splitlines()[-1]) for p in (a, b)]
    assert last[0]["units"] == last[1]["units"] == evaluate(load_pipeline(PIPELINE), text)


def test_human_output_ends_with_the_result() -> None:
    proc = alto("run", str(PIPELINE), "--input", "x y")
    assert proc.returncode == 0
    assert proc.stdout.strip() == evaluate(load_pipeline(PIPELINE), "x y")[0]


def _strict(line: str) -> dict:  # type: ignore[type-arg]
    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant} in {line[:200]}")

    return json.loads(line, parse_constant=refuse)  # type: ignore[no-any-return]


def test_json_lines_are_strict_json() -> None:
    """A NaN or an infinity a stage returns is `null` to a strict parser (jq, JSON.parse)."""
    proc = alto("run", str(ROOT / "tests" / "gateway_pipelines" / "scores.yaml"),
                "--input", "a", "--json")
    assert proc.returncode == 0, proc.stderr
    events = [_strict(line) for line in proc.stdout.splitlines() if line.strip()]
    assert events[-1]["units"] == [{"word": "a", "score": None, "high": None, "low": None}]


def test_json_mode_exits_1_when_the_run_fails() -> None:
    proc = alto("run", str(ROOT / "tests" / "gateway_pipelines" / "notjson.yaml"),
                "--input", "a", "--json")
    events = [_strict(line) for line in proc.stdout.splitlines() if line.strip()]
    assert events[-1]["type"] == "error" and "not JSON" in events[-1]["message"]
    assert proc.returncode == 1


def test_an_unreachable_engine_is_one_error_line_without_tracebacks(tmp_path: Path) -> None:
    """QA: an openai engine on a closed port printed two ~60-line tracebacks (httpx
    internals, from the runner's log) before the useful line, itself wrapped."""
    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "dead.yaml"
    path.write_text(
        "name: dead\n"
        f"engines: {{default: {{kind: openai, base_url: 'http://127.0.0.1:{port}', model: m, "
        "retries: 0}}\n"
        "stages:\n  - {name: answer, kind: lm, prompt: '{input}'}\n")
    proc = alto("run", str(path), "--input", "hi")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "alto.runner" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        "error answer: EngineConnectError: openai:m#0: cannot connect to its server "
        "(POST /v1/chat/completions) after 1 attempt(s): ConnectError"], proc.stderr


def test_a_stage_function_that_raises_keeps_its_traceback(tmp_path: Path) -> None:
    """The author's own bug: the runner's record keeps the traceback into their code."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nstages:\n"
                    "  - {name: check, kind: tool, function: 'tests.toy.faulty:fail_on_bad'}\n")
    proc = alto("run", str(path), "--input", "bad")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and 'faulty.py", line' in proc.stderr, proc.stderr
    assert "error check: ValueError: cannot process 'bad'" in proc.stderr


@pytest.mark.parametrize(("given", "stdin", "text", "contents"), [
    ("-", "from stdin\n", "from stdin\n", ""),
    ("@-", "from stdin too", "from stdin too", ""),
    ("@{file}", None, "from a file\n", "from a file\n"),
    ("@{file}", None, "from a file\n", "\ufefffrom a file\n"),
    ("@{file}", None, "\ufefffrom a file\n", "\ufeff\ufefffrom a file\n"),
    ("@@x y", None, "@x y", ""),
    ("a@b", None, "a@b", ""),
], ids=["stdin", "at-stdin", "file", "file-bom", "file-bom-twice", "escaped-at", "inner-at"])
def test_input_from_stdin_or_a_file(given: str, stdin: str | None, text: str,
                                    contents: str, tmp_path: Path) -> None:
    """curl's conventions: `-` stdin, `@PATH` a file (verbatim, its newline included,
    except a leading UTF-8 byte order mark, which Windows editors write: only that one),
    `@@` a text that starts with @."""
    path = tmp_path / "input.txt"
    path.write_text(contents, encoding="utf-8")
    proc = alto("run", str(PIPELINE), "--input", given.format(file=path), "--json",
                stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    units = json.loads(proc.stdout.splitlines()[-1])["units"]
    assert units == evaluate(load_pipeline(PIPELINE), text)


@pytest.mark.parametrize("given", ["@{missing}", "@"], ids=["missing-file", "no-name"])
def test_input_file_that_cannot_be_read_is_one_line(given: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    proc = alto("run", str(PIPELINE), "--input", given.format(missing=missing))
    line = one_line_error(proc, 2)
    why = f"cannot read {missing}: no such file or directory" if given != "@" \
        else "a file name must follow @"
    assert line.startswith(f"error: --input {given.format(missing=missing)}: {why}"), line


def test_run_help_documents_the_input_conventions() -> None:
    proc = alto("run", "--help")
    text = " ".join(proc.stdout.split())
    assert "`--input -` reads the input from stdin and `--input @PATH` from a file, " \
        "verbatim (`--input @@text` is the text `@text`)" in text, proc.stdout
