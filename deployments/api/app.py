"""The HTTP edge: one FastAPI app over the job service, with the BFL and OpenAI routers, the body
guard, CORS when configured, and the system routes (health, metrics, docs, result files)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from deployments import metrics
from deployments.api import bfl, errors, openai
from deployments.api.auth import KeyRing, caller
from deployments.api.deps import service_of
from deployments.api.errors import json_error
from deployments.api.images import ImageReader
from deployments.api.middleware import BodyGuard
from deployments.jobs.service import JobService
from deployments.storage import check_key
from deployments.storage.local import LocalStorage
from klein.image import CONTENT_TYPES, EXTENSIONS

FILE_TYPES = {EXTENSIONS[f]: CONTENT_TYPES[f] for f in EXTENSIONS}  # extension -> media type
CORS_HEADERS = ["authorization", "x-key", "content-type", "idempotency-key", "traceparent"]


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
    app.include_router(system)
    app.include_router(openai.router)
    app.include_router(bfl.router)
    return app


system = APIRouter()


@system.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, key_id: str = Depends(caller)):
    """The docs need a key like every route but /healthz (when keys are configured)."""
    return JSONResponse(request.app.openapi())


@system.get("/docs", include_in_schema=False)
async def docs(key_id: str = Depends(caller)):
    from fastapi.openapi.docs import get_swagger_ui_html

    return get_swagger_ui_html(openapi_url="/openapi.json", title="klein-serve API")


@system.get("/healthz", include_in_schema=False)
async def healthz(request: Request):
    return {"status": "ok", "model": service_of(request).model_id}


@system.get("/metrics", include_in_schema=False)
async def prometheus(key_id: str = Depends(caller)):
    text = await asyncio.to_thread(metrics.gather_prometheus)
    return Response(text, media_type="text/plain; version=0.0.4")


@system.get("/v1/files/{key:path}", include_in_schema=False)
async def files(request: Request, key: str, expires: int = Query(...), signature: str = Query(...)):
    """Result files of the local storage backend, behind HMAC-signed expiring links."""
    storage = service_of(request).storage
    if not isinstance(storage, LocalStorage):
        return json_error(404, "not found")
    try:
        check_key(key)
        if not storage.verify(key, expires, signature):
            return json_error(403, "link expired or invalid")
        data = await storage.get(key)
    except ValueError:
        return json_error(404, "not found")
    if data is None:
        return json_error(404, "not found")
    return Response(data, media_type=FILE_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream"))
