"""Optional OpenTelemetry traces: spans of one run, written by different processes with
nothing shared but the run id, land in one trace; off (no-op) without an endpoint."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk import trace as sdk
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.embedded import EmbeddedTransport
from orchestrator.spec import parse_pipeline
from workers import tracing
from workers.client import run_to_completion
from workers.metrics import WorkerMetrics
from workers.runtime import Runtime

SPEC = parse_pipeline({"name": "traced", "stages": [
    {"name": "split", "kind": "tool", "function": "tests.toy.stages:split_words",
     "framing": "items", "to": ["up"]},
    {"name": "up", "kind": "tool", "function": "tests.toy.stages:upper"},
]})


def provider() -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    p = sdk.TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p, exporter


def test_trace_ids_are_a_function_of_the_run_id() -> None:
    assert tracing.trace_id_of("r1") == tracing.trace_id_of("r1") != tracing.trace_id_of("r2")
    assert 0 < tracing.trace_id_of("r1") < 2**128 and 0 < tracing.root_span_id_of("r1") < 2**64


def test_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.configure("alto-test") is False


async def test_gateway_and_worker_spans_share_the_runs_trace() -> None:
    gateway_provider, gateway_spans = provider()  # two providers: two processes
    worker_provider, worker_spans = provider()
    recorder = tracing.SpanRecorder(worker_provider.get_tracer("alto"))
    metrics = WorkerMetrics()
    t = EmbeddedTransport()
    rt = Runtime(t, [SPEC], observer=tracing.combine(metrics.observe, recorder.observe))
    await rt.start()
    try:
        runs = []
        for text in ("a b c", "d e"):
            run, events = await run_to_completion(t, SPEC, text, deadline_s=30)
            assert events[-1]["type"] == "result"
            with tracing.run_span(run, "run", tracer=gateway_provider.get_tracer("alto"),
                                  pipeline=SPEC.name):
                pass
            runs.append((run, len(text.split())))
    finally:
        await rt.stop()
    spans = worker_spans.get_finished_spans()
    gw = {s.attributes["alto.run"]: s for s in gateway_spans.get_finished_spans()
          if s.name == "run"}
    for run, words in runs:
        mine = [s for s in spans if s.attributes["alto.run"] == run]
        # one span per call: split once, `up` once per word
        assert sorted(s.name for s in mine) == ["split call"] + ["up call"] * words
        for s in mine:
            assert s.context.trace_id == tracing.trace_id_of(run)
            assert s.parent is not None and s.parent.span_id == tracing.root_span_id_of(run)
            assert s.start_time <= s.end_time
        assert gw[run].context.trace_id == tracing.trace_id_of(run)
        assert gw[run].attributes["alto.pipeline"] == "traced"
    # the metrics observer still got every call through `combine`
    calls = metrics.registry.get_sample_value(
        "alto_stage_call_seconds_count", {"pipeline": "traced", "stage": "up"})
    assert calls == sum(w for _, w in runs)


def test_error_events_become_error_spans() -> None:
    p, exported = provider()
    rec = tracing.SpanRecorder(p.get_tracer("alto"))
    rec.observe("error", {"run": "r1", "pipeline": "p", "stage": "s", "message": "boom"})
    rec.observe("error", {"pipeline": "p", "stage": "s"})  # no run: nothing to attach to
    (span,) = exported.get_finished_spans()
    assert span.name == "s error" and span.status.status_code.name == "ERROR"
    assert span.context.trace_id == tracing.trace_id_of("r1")
