"""OpenTelemetry tracing across the DAG: one trace per job, a span per stage.

The ingress opens the job's span (as a child of the caller's `traceparent`, if any) and hands a
W3C trace carrier to every stage call; each stage records its spans under it. Batched stages time
one batch and record that interval as a span in each request's own trace. Export is off by
default; `otlp` sends to a collector (OTLP/HTTP), `file` appends JSON lines (one span a line,
any number of processes), `console` prints.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import Field

from deployments.options import Options

log = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()
_LOCK = threading.Lock()
_CONFIGURED: str | None = None


class TelemetryOptions(Options):
    traces: Literal["off", "otlp", "file", "console"] = Field("off", description="where spans go")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector, e.g. http://otel-collector:4318"
    )
    file: Path | None = Field(None, description="traces=file: JSON lines, one span each")
    service_name: str = Field("klein-serve", description="resource service.name")


class _JsonLinesExporter:
    """A SpanExporter appending one JSON object per span; O_APPEND keeps processes' lines whole."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            lines.append(
                json.dumps(
                    {
                        "name": s.name,
                        "trace_id": f"{s.context.trace_id:032x}",
                        "span_id": f"{s.context.span_id:016x}",
                        "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
                        "start": s.start_time,
                        "end": s.end_time,
                        "attributes": dict(s.attributes or {}),
                        "service": s.resource.attributes.get("service.name"),
                        "component": s.resource.attributes.get("klein.component"),
                        "pid": os.getpid(),
                    }
                )
            )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, ("\n".join(lines) + "\n").encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 30000):
        return True


def route_logs() -> None:
    """Send klein's own loggers (`deployments.*`: job transitions, retries, refusals) to the
    replica's Serve log handlers, at Serve's level (INFO unless configured): without this, Python's
    default WARNING threshold drops them and Serve's files never see them. Idempotent."""
    serve_logger, ours = logging.getLogger("ray.serve"), logging.getLogger("deployments")
    if ours.handlers or not serve_logger.handlers:
        return
    for handler in serve_logger.handlers:
        ours.addHandler(handler)
    ours.setLevel(serve_logger.level or logging.INFO)
    ours.propagate = False


def setup(options: TelemetryOptions, component: str) -> None:
    """Route logs to Serve's handlers, and install a tracer provider for this process (once);
    no tracer when traces are off."""
    global _CONFIGURED
    route_logs()
    if options.traces == "off":
        return
    with _LOCK:
        if _CONFIGURED is not None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        provider = TracerProvider(
            resource=Resource.create({"service.name": options.service_name, "klein.component": component})
        )
        if options.traces == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = (options.otlp_endpoint or "http://localhost:4318").rstrip("/") + "/v1/traces"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        elif options.traces == "file":
            if options.file is None:
                raise ValueError("telemetry.traces=file needs telemetry.file")
            provider.add_span_processor(SimpleSpanProcessor(_JsonLinesExporter(options.file)))
        else:
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)
        _CONFIGURED = component
        log.info("tracing on for %s: %s", component, options.traces)


def tracer():
    return trace.get_tracer("klein-serve")


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers, to pass to the next stage."""
    out: dict[str, str] = {}
    _PROPAGATOR.inject(out)
    return out


def context_of(headers: dict[str, str] | None):
    return _PROPAGATOR.extract(headers or {})


@contextmanager
def span(name: str, parent: dict[str, str] | None = None, **attributes):
    """A span under `parent` (a carrier), or under the current span when parent is None."""
    ctx = context_of(parent) if parent is not None else None
    with tracer().start_as_current_span(name, context=ctx, attributes=attributes) as s:
        yield s


def record(
    name: str, parents: list[dict[str, str] | None], start_ns: int, end_ns: int | None = None, **attributes
):
    """One span per request of a batch, each in its own trace, covering the batch's interval."""
    end_ns = end_ns or time.time_ns()
    t = tracer()
    for parent in parents:
        if parent:
            s = t.start_span(name, context=context_of(parent), start_time=start_ns, attributes=attributes)
            s.end(end_time=end_ns)


def attach(headers: dict[str, str] | None):
    """Make `headers` the current context (returns a token for `detach`)."""
    return otel_context.attach(context_of(headers))


def detach(token) -> None:
    otel_context.detach(token)
