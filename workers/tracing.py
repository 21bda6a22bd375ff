"""Optional OpenTelemetry traces: one trace per run, across the gateway and every worker.

Nothing travels on the wire for it: a run's trace id is derived from its run id (the first
16 bytes of its SHA-256), and every process parents its spans on the same virtual root
span (the next 8 bytes), so the spans of one run land in one trace whichever process,
pod or restart wrote them, and a trace is found from a run id alone
(`python -m workers.tracing RUN_ID` prints its trace id).

Off unless the SDK is installed (`pip install 'alto[otel]'`) and an OTLP endpoint is
configured (`OTEL_EXPORTER_OTLP_ENDPOINT`, or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); then
`configure()` installs an OTLP/HTTP exporter. Otherwise every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("alto.tracing")

Observer = Callable[[str, dict[str, Any]], None]


def trace_id_of(run: str) -> int:
    """The 128-bit trace id of a run (never 0, which OpenTelemetry treats as invalid)."""
    return int.from_bytes(hashlib.sha256(run.encode()).digest()[:16], "big") or 1


def root_span_id_of(run: str) -> int:
    """The virtual root span every process parents a run's spans on."""
    return int.from_bytes(hashlib.sha256(run.encode()).digest()[16:24], "big") or 1


def configure(service_name: str) -> bool:
    """Install a TracerProvider exporting over OTLP/HTTP, if the SDK and an endpoint are
    there; returns whether tracing is on."""
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not "
                    "installed (pip install 'alto[otel]'): no traces")
        return False
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


def _tracer(tracer: Any = None) -> Any:
    if tracer is not None:
        return tracer
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_tracer("alto")


def run_context(run: str) -> Any:
    """An OpenTelemetry Context whose current span is the run's virtual root."""
    from opentelemetry import trace

    root = trace.SpanContext(
        trace_id=trace_id_of(run), span_id=root_span_id_of(run), is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(root))


@contextlib.contextmanager
def run_span(run: str, name: str, tracer: Any = None, **attributes: Any) -> Iterator[Any]:
    """A span in the run's trace around a block (the gateway: a run from start to result);
    yields the span, or None when tracing is off."""
    t = _tracer(tracer)
    if t is None:
        yield None
        return
    attrs = {"alto.run": run, **{f"alto.{k}": v for k, v in attributes.items() if v is not None}}
    with t.start_as_current_span(name, context=run_context(run), attributes=attrs) as span:
        yield span


def start_run_span(run: str, name: str, tracer: Any = None, start_time: int | None = None,
                   **attributes: Any) -> Any:
    """`run_span` for a run whose start and end are in different places (the gateway opens
    it in `Gateway.start` and ends it in `RunHandle.close`, possibly in another task, where a
    `with` block or an attached context cannot reach); the span is not made current. Returns
    None when tracing is off; the caller must `end()` the span."""
    t = _tracer(tracer)
    if t is None:
        return None
    attrs = {"alto.run": run, **{f"alto.{k}": v for k, v in attributes.items() if v is not None}}
    return t.start_span(name, context=run_context(run), attributes=attrs, start_time=start_time)


class SpanRecorder:
    """A runner observer that writes one span per finished stage call into the run's trace
    (start and end from the call's own timing, a `first unit` event when it streamed) and
    one error span per failed input."""

    def __init__(self, tracer: Any = None) -> None:
        self.tracer = _tracer(tracer)

    def observe(self, event: str, data: dict[str, Any]) -> None:
        if self.tracer is None or not data.get("run"):
            return
        try:
            from opentelemetry.trace import SpanKind, Status, StatusCode

            end = time.time_ns()
            start = end - int(float(data.get("seconds") or 0.0) * 1e9)
            attrs = {f"alto.{k}": data[k] for k in ("run", "pipeline", "stage", "instance")
                     if data.get(k) is not None}
            if event == "call":
                for k in ("units", "prompt_tokens", "completion_tokens", "cached_tokens"):
                    if data.get(k) is not None:
                        attrs[f"alto.{k}"] = int(data[k])
                span = self.tracer.start_span(f"{data.get('stage')} call",
                                              context=run_context(data["run"]),
                                              kind=SpanKind.CONSUMER, attributes=attrs,
                                              start_time=start)
                if data.get("first_unit_s") is not None:
                    span.add_event("first unit",
                                   timestamp=start + int(float(data["first_unit_s"]) * 1e9))
                span.end(end_time=end)
            elif event == "error":
                span = self.tracer.start_span(f"{data.get('stage')} error",
                                              context=run_context(data["run"]),
                                              kind=SpanKind.CONSUMER, attributes=attrs)
                span.set_status(Status(StatusCode.ERROR, str(data.get("message") or "")))
                span.end()
        except Exception:  # noqa: BLE001 - tracing must not break a runner
            log.exception("tracing observer failed")


def combine(*observers: Observer | None) -> Observer:
    """One runner observer calling several (metrics and traces)."""
    active = [o for o in observers if o is not None]

    def observe(event: str, data: dict[str, Any]) -> None:
        for o in active:
            o(event, data)

    return observe


if __name__ == "__main__":
    for run_id in sys.argv[1:]:
        print(f"{run_id} {trace_id_of(run_id):032x}")
