"""The service's own routes: health, Prometheus metrics, the API docs, and result files of the
local storage backend (behind signed, expiring links)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from deployments import metrics
from deployments.api.auth import caller
from deployments.api.deps import options_of, service_of
from deployments.api.errors import json_error
from deployments.jobs.records import ANONYMOUS
from deployments.storage import check_key
from deployments.storage.local import LocalStorage
from klein.image import CONTENT_TYPES, EXTENSIONS

FILE_TYPES = {EXTENSIONS[f]: CONTENT_TYPES[f] for f in EXTENSIONS}  # extension -> media type


router = APIRouter()


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, key_id: str = Depends(caller)):
    """The docs need a key like every route but /healthz (when keys are configured)."""
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(key_id: str = Depends(caller)):
    from fastapi.openapi.docs import get_swagger_ui_html

    return get_swagger_ui_html(openapi_url="/openapi.json", title="klein-serve API")


@router.get("/healthz", include_in_schema=False)
async def healthz(request: Request):
    return {"status": "ok", "model": service_of(request).model_id}


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request, key_id: str = Depends(caller)):
    """The whole service's counters (every tenant's jobs): for the operator's keys only, where keys
    are configured (ingress.metrics_key_ids); open on a keyless loopback service."""
    if key_id != ANONYMOUS and key_id not in options_of(request).metrics_key_ids:
        return json_error(403, "metrics are the operator's: this key's id is not in ingress.metrics_key_ids")
    text = await asyncio.to_thread(metrics.gather_prometheus)
    return Response(text, media_type="text/plain; version=0.0.4")


@router.get("/v1/files/{key:path}", include_in_schema=False)
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
