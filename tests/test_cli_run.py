"""`alto run` end to end: the embedded transport in a real subprocess, JSON event lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from orchestrator.spec import load_pipeline
from tests.toy.oracle import evaluate

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "toy" / "pipeline4.yaml"


def alto(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


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
