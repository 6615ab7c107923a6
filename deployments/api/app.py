"""The HTTP edge: one FastAPI app over the job service, with a router per API (system, OpenAI
images, BFL async, usage), the body guard, and CORS when configured."""

from __future__ import annotations

from fastapi import FastAPI

from deployments.api import bfl, errors, events, openai, page, system, usage
from deployments.api.auth import KeyRing
from deployments.api.images import ImageReader
from deployments.api.middleware import BodyGuard
from deployments.jobs.service import JobService
from klein.image import CONTENT_TYPES, EXTENSIONS

FILE_TYPES = {EXTENSIONS[f]: CONTENT_TYPES[f] for f in EXTENSIONS}  # extension -> media type
CORS_HEADERS = ["authorization", "x-key", "content-type", "idempotency-key", "traceparent", "last-event-id"]


def build_api(service: JobService, keys: KeyRing) -> FastAPI:
    options = service.options
    app = FastAPI(
        title="klein-serve",
        version="0.1.0",
        description="FLUX.2 [klein] image generation: BFL-compatible async API and OpenAI-compatible images API.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service, app.state.keys, app.state.images = service, keys, ImageReader(options)
    errors.install(app, options.retry_after_s)
    app.add_middleware(BodyGuard, max_bytes=options.max_body_mb * 2**20)
    if options.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=options.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=CORS_HEADERS,
            max_age=600,
        )
    for api in (system, openai, bfl, events, usage, page):
        app.include_router(api.router)
    return app
