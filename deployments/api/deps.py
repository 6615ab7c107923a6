"""What a route needs from the app it runs in (`app.state`, set by `build_api`) and its request."""

from __future__ import annotations

from fastapi import Request

from deployments import telemetry
from deployments.api.images import ImageReader
from deployments.jobs.service import JobService
from deployments.options import IngressOptions


def service_of(request: Request) -> JobService:
    return request.app.state.service


def options_of(request: Request) -> IngressOptions:
    return request.app.state.service.options


def images_of(request: Request) -> ImageReader:
    return request.app.state.images


def base_url(request: Request) -> str:
    """The service's base URL as the client reached it (or as configured)."""
    return (options_of(request).public_url or str(request.base_url)).rstrip("/")


def sample_url(request: Request, key: str) -> str:
    return service_of(request).link(key, base_url(request))


def submit_trace(request: Request, **attributes) -> dict[str, str] | None:
    """A `submit` span joined to the caller's W3C trace context when it sent one; its context, for
    the job's spans to join."""
    caller = {k: request.headers[k] for k in ("traceparent", "tracestate") if k in request.headers}
    with telemetry.span("submit", caller or None, **attributes):
        return telemetry.carrier() or None
