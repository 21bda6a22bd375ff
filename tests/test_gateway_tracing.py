"""Gateway run spans (workers/tracing.py): a run the gateway starts gets one `run` span
from admission to its end, in the same trace as the stage-call spans of the embedded
runners (the trace id is a function of the run id); nothing is traced without a tracer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk import trace as sdk
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.gateway_fixtures import LiveServer, pipelines, wait_for
from workers import tracing
from workers.settings import Settings


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[LiveServer, InMemorySpanExporter]]:
    from app.main import create_app

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(Settings(), pipelines("toy", "fanout"),
                     tracer=provider.get_tracer("alto"))
    server = LiveServer(app, env={"ALTO_SIM_TIME_SCALE": "0.001"}).start()
    try:
        yield server, exporter
    finally:
        server.stop()


def _spans_of(exporter: InMemorySpanExporter, run: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.attributes.get("alto.run") == run]


def test_a_run_has_a_gateway_span_in_its_trace_with_every_stage_call(
    traced: tuple[LiveServer, InMemorySpanExporter],
) -> None:
    server, exporter = traced
    r = httpx.post(f"{server.url}/v1/pipelines/toy/runs", json={"input": "a b c"}, timeout=30)
    assert r.status_code == 200 and r.json()["output"] == "A B C"
    run = r.json()["id"]
    # the handle closes (and ends the span) as the response finishes: wait for it
    wait_for(lambda: any(s.name == "run" for s in _spans_of(exporter, run)), what="run span")
    mine = _spans_of(exporter, run)
    [gw] = [s for s in mine if s.name == "run"]
    assert gw.attributes["alto.pipeline"] == "toy"
    assert gw.attributes["alto.outcome"] == "completed"
    assert gw.status.status_code != StatusCode.ERROR
    calls = sorted(s.name for s in mine if s.name != "run")
    assert calls == ["join call", "split call"] + ["up call"] * 3
    for s in mine:  # one trace, every span a child of the run's virtual root
        assert s.context.trace_id == tracing.trace_id_of(run)
        assert s.parent is not None and s.parent.span_id == tracing.root_span_id_of(run)
    # the run span covers the run: it starts before the first call and ends after the last
    assert gw.start_time <= min(s.start_time for s in mine if s.name != "run")
    assert gw.end_time >= max(s.end_time for s in mine if s.name != "run")


def test_a_failed_run_has_an_error_span(
    traced: tuple[LiveServer, InMemorySpanExporter],
) -> None:
    server, exporter = traced
    body = httpx.post(f"{server.url}/v1/pipelines/fanout/runs", json={"input": "z:y"},
                      timeout=30).json()
    assert body["status"] == "failed"
    run = body["id"]
    wait_for(lambda: any(s.name == "run" for s in _spans_of(exporter, run)), what="run span")
    [gw] = [s for s in _spans_of(exporter, run) if s.name == "run"]
    assert gw.attributes["alto.outcome"] == "failed"
    assert gw.status.status_code == StatusCode.ERROR
    assert gw.context.trace_id == tracing.trace_id_of(run)


def test_no_tracer_no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an OTLP endpoint (or a tracer passed in) the gateway traces nothing: no
    tracer on the gateway, the runners' observer is the metrics one alone, runs still work."""
    from app.main import create_app

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    app = create_app(Settings(), pipelines("toy"))
    server = LiveServer(app).start()
    try:
        r = httpx.post(f"{server.url}/v1/pipelines/toy/runs", json={"input": "x y"}, timeout=30)
        assert r.status_code == 200 and r.json()["output"] == "X Y"
        gw = server.gateway
        assert gw.tracer is None
        assert all(runner.observer == app.state.metrics.observe for runner in gw.runtime.runners)
    finally:
        server.stop()


def test_a_client_that_leaves_ends_the_span_as_cancelled() -> None:
    """OpenAI streams cancel at once when their client goes: the span ends then, in error."""
    import openai

    from app.main import create_app

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(Settings(), pipelines("slow"), tracer=provider.get_tracer("alto"))
    server = LiveServer(app, env={"ALTO_SIM_TIME_SCALE": "1.0"}).start()
    try:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        stream = c.chat.completions.create(  # 2000 lines: still writing when we leave
            model="slow", messages=[{"role": "user", "content": "2000"}], stream=True
        )
        run = ""
        for chunk in stream:
            alto = (chunk.model_extra or {}).get("alto") or {}
            run = alto.get("run") or run
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()
        assert run
        wait_for(lambda: any(s.name == "run" for s in _spans_of(exporter, run)),
                 what="run span")
    finally:
        server.stop()
    [gw] = [s for s in _spans_of(exporter, run) if s.name == "run"]
    assert gw.attributes["alto.outcome"] == "cancelled"
    assert gw.status.status_code == StatusCode.ERROR
    assert gw.context.trace_id == tracing.trace_id_of(run)
