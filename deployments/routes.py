"""The HTTP surface of the Ingress: BFL-compatible async routes, OpenAI-compatible sync routes,
result files for the local storage backend, health and docs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from datetime import date

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from deployments import metrics, netguard, telemetry
from deployments.api import (
    FieldError,
    GenerateRequest,
    ImageData,
    ImagesRequest,
    ImagesResponse,
    ResultResponse,
    SubmitResponse,
    decode_image,
    parse_size,
)
from deployments.auth import ANONYMOUS, presented_key
from deployments.ingress import IdempotencyConflict, Overloaded, TooManyJobs
from deployments.jobs import CONTENT_TYPES, EXTENSIONS, Status
from deployments.metering import summarize
from deployments.storage import LocalStorage, StorageError, check_key

log = logging.getLogger(__name__)
OPENAI_FIELDS = {"width": "size", "height": "size", "references": "image"}
FILE_TYPES = {EXTENSIONS[f]: CONTENT_TYPES[f] for f in EXTENSIONS}  # extension -> media type
EDIT_FORM_FIELDS = set(ImagesRequest.model_fields) | {"image", "image[]", "mask"}


def _field_error(e: FieldError) -> JSONResponse:
    return JSONResponse(
        {"detail": [{"loc": ["body", e.field], "msg": e.message, "type": "value_error"}]},
        status_code=e.status,
    )


def _documented(*codes: int) -> dict:
    """OpenAPI entries for a route's error answers (FastAPI adds 422 itself where it parses the body)."""
    what = {
        400: "malformed body, or the request was moderated (OpenAI routes)",
        401: "missing or unknown API key",
        404: "unknown model or job",
        409: "Idempotency-Key reused with another body, or the job already finished",
        413: "body or input image over its cap",
        415: "wrong Content-Type",
        422: "a field out of its bounds: `detail[].loc` names it, `msg` says the bound",
        429: "too many jobs in flight for this key (Retry-After)",
        500: "the job failed after its retries (OpenAI routes)",
        503: "overloaded, or storage unavailable (Retry-After)",
        504: "no result within sync_timeout_s (OpenAI routes)",
    }
    return {code: {"description": what[code]} for code in codes}


def _edit_form_schema() -> dict:
    """The multipart form of POST /v1/images/edits (read by hand, so FastAPI cannot infer it)."""
    form = ImagesRequest.model_json_schema()
    form["properties"] = {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": 4,
                  "description": "1-4 reference images (also accepted as image[])"},
        **form["properties"],
    }  # fmt: skip
    form["required"] = ["image", *form.get("required", [])]
    form.pop("title", None)
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


def _validation_error(e: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without echoing the input back: it can be megabytes, or text that cannot be
    encoded as UTF-8 (an unpaired surrogate), which would turn a 422 into a 500."""
    detail = [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        | ({"ctx": {k: str(v)[:200] for k, v in err["ctx"].items()}} if err.get("ctx") else {})
        for err in e.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _json_error(status: int, detail: str, headers: dict | None = None) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BodyGuard:
    """ASGI middleware in front of every route: the body cap holds for chunked uploads too (the
    body is read here, up to the cap, before any route sees it: 413 beyond), and request bodies
    must have the content type their route parses (415 otherwise)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    FORM = ("multipart/form-data", "application/x-www-form-urlencoded")

    @classmethod
    def expected_types(cls, method: str, path: str) -> tuple[str, ...]:
        if method != "POST":
            return ()
        return cls.FORM if path.rstrip("/") == "/v1/images/edits" else ("application/json",)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit_mb = self.max_bytes // 2**20
        too_large = _json_error(413, f"request body must be at most {limit_mb} MB")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        expected = self.expected_types(scope["method"], scope["path"])
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if expected and ctype not in expected:
            msg = f"Content-Type must be {' or '.join(expected)}, got {ctype or 'none'}"
            return await _json_error(415, msg)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        return await self.app(scope, replay, send)


def build_api(ingress) -> FastAPI:  # noqa: C901 - one closure per route reads best here
    app = FastAPI(
        title="klein-serve",
        version="0.1.0",
        description="FLUX.2 [klein] image generation: BFL-compatible async API and OpenAI-compatible images API.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    opts = ingress.options
    max_image_bytes = opts.max_input_image_mb * 2**20

    app.add_exception_handler(FieldError, lambda _req, e: _field_error(e))
    app.add_exception_handler(RequestValidationError, lambda _req, e: _validation_error(e))
    app.add_exception_handler(
        TooManyJobs,
        lambda _req, e: JSONResponse(
            {"detail": str(e)}, 429, headers={"Retry-After": str(opts.retry_after_s)}
        ),
    )
    busy = {"Retry-After": str(opts.retry_after_s)}
    app.add_exception_handler(
        Overloaded, lambda _req, e: _json_error(503, f"overloaded: {e}; retry later", busy)
    )
    app.add_exception_handler(
        StorageError, lambda _req, e: _json_error(503, "storage is unavailable; retry later", busy)
    )
    app.add_exception_handler(
        IdempotencyConflict,
        lambda _req, e: JSONResponse(
            {"detail": "Idempotency-Key was already used with a different request body"}, 409
        ),
    )

    async def caller(request: Request) -> str:
        """The calling API key's id; 401 without a known key (when keys are configured)."""
        if not ingress.keys.enabled:
            return ANONYMOUS
        kid = ingress.keys.identify(presented_key(request.headers))
        if kid is None:
            raise HTTPException(
                401, "missing or unknown API key: send it as `x-key` or `Authorization: Bearer`",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        return kid

    app.add_middleware(BodyGuard, max_bytes=opts.max_body_mb * 2**20)
    if opts.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=opts.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "x-key", "content-type", "idempotency-key", "traceparent"],
            max_age=600,
        )  # fmt: skip

    decoding = asyncio.Semaphore(4)  # a 40 MP image is ~120 MB decoded: bound how many at once

    async def decode(data: str | bytes, field: str):
        """Decode off the event loop (a large image takes a while), a few at a time."""
        async with decoding:
            return await asyncio.to_thread(
                decode_image, data, field, max_image_bytes, opts.max_input_image_pixels
            )

    async def fetch_image(field: str, url: str) -> bytes:
        try:
            return await netguard.fetch(url, max_image_bytes, opts.fetch_timeout_s, opts.fetch_allow_private)
        except netguard.TargetRefused as e:
            if e.too_large:
                raise FieldError(field, f"image must be at most {opts.max_input_image_mb} MB", 413) from None
            raise FieldError(field, f"cannot use this URL: {e}") from None

    def incoming_trace(request: Request) -> dict[str, str] | None:
        """The caller's W3C trace context, if it sent one: the job joins the caller's trace."""
        ctx = {k: request.headers[k] for k in ("traceparent", "tracestate") if k in request.headers}
        return ctx or None

    def base_url(request: Request) -> str:
        return (opts.public_url or str(request.base_url)).rstrip("/")

    def sample_url(request: Request, key: str) -> str:
        return ingress.storage.url(key, base_url(request), ingress.storage_options.presign_expiry_s)

    # The docs need a key like every route but /healthz (when keys are configured).
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(key_id: str = Depends(caller)):
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(key_id: str = Depends(caller)):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="klein-serve API")

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok", "model": ingress.model_id}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(key_id: str = Depends(caller)):
        text = await asyncio.to_thread(metrics.gather_prometheus)
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(key_id: str = Depends(caller)):
        return {"object": "list", "data": [{"id": ingress.model_id, "object": "model", "created": 0,
                                            "owned_by": "black-forest-labs"}]}  # fmt: skip

    # --- BFL-compatible async API ---

    @app.get("/v1/get_result", response_model=ResultResponse, response_model_exclude_none=True,
             responses=_documented(401, 503))  # fmt: skip
    async def get_result(
        request: Request, id: str = Query(..., max_length=64), key_id: str = Depends(caller)
    ):
        job = await ingress.jobs.get(id, retry_s=opts.request_storage_retry_s)
        if job is None or job.key_id != key_id:  # another key's job does not exist for this caller
            return ResultResponse(id=id, status=Status.NOT_FOUND.value)
        sample = sample_url(request, job.result.key) if job.status is Status.READY and job.result else None
        return ResultResponse(
            id=job.id,
            status=job.status.value,
            result=ingress.result_payload(job, sample),
            progress=1.0 if job.status.terminal else None,
            details={"error": job.error} if job.error else None,
            cost=job.cost,
            input_mp=job.input_mp,
            output_mp=job.output_mp,
        )

    @app.delete("/v1/jobs/{job_id}", status_code=202, responses=_documented(401, 404, 409, 503))
    async def cancel(job_id: str, key_id: str = Depends(caller)):
        job = await ingress.jobs.get(job_id, retry_s=opts.request_storage_retry_s)
        if job is None or job.key_id != key_id:
            return JSONResponse({"id": job_id, "status": Status.NOT_FOUND.value}, status_code=404)
        if job.status.terminal:
            return JSONResponse({"id": job_id, "status": job.status.value, "detail": "already finished"}, 409)
        await ingress.cancel(job_id)
        return JSONResponse(
            {"id": job_id, "status": job.status.value, "cancel_requested": True}, status_code=202
        )

    @app.get("/v1/usage", responses=_documented(401, 503))
    async def usage(
        start: date = Query(..., description="first day, YYYY-MM-DD (UTC, by submission)"),
        end: date = Query(..., description="last day, inclusive"),
        group_by: str = Query("day", pattern="^(day|model)$", description="day or model"),
        key_id: str = Depends(caller),
    ):
        if end < start:
            raise FieldError("end", f"must not be before start ({start})")
        if (end - start).days > 366:
            raise FieldError("end", "the range must be at most 366 days")
        records = await ingress.usage(key_id, start.isoformat(), end.isoformat())
        total = summarize(records, "key_id")
        return {
            "key_id": key_id,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "group_by": group_by,
            "groups": summarize(records, group_by),
            "total": total[0] if total else {"jobs": 0, "input_mp": 0.0, "output_mp": 0.0, "cost": 0.0},
        }

    @app.post("/v1/{model}", response_model=SubmitResponse,
              responses=_documented(400, 401, 404, 409, 413, 415, 429, 503))  # fmt: skip
    async def submit(
        model: str,
        body: GenerateRequest,
        request: Request,
        key_id: str = Depends(caller),
        idempotency_key: str | None = Header(None, max_length=255),
    ):
        if model != ingress.model_id:
            return JSONResponse(
                {"detail": f"unknown model {model!r}; this service runs {ingress.model_id}"}, 404
            )
        images = []
        for field, data in body.images():
            if data.startswith(("http://", "https://")) and opts.fetch_input_urls:
                data = await fetch_image(field, data)
            raw, image = await decode(data, field)
            images.append((field, raw, image))
        with telemetry.span("submit", incoming_trace(request), model=model):
            trace = telemetry.carrier() or None
        job, _ = await ingress.submit(
            prompt=body.prompt, width=body.width, height=body.height, seed=body.seed, steps=body.steps,
            guidance=body.guidance, safety_tolerance=body.safety_tolerance, output_format=body.output_format,
            images=images, webhook_url=str(body.webhook_url) if body.webhook_url else None,
            webhook_secret=body.webhook_secret, fields={"references": "input_image"}, key_id=key_id,
            public_url=base_url(request), start=True,
            idempotency_key=idempotency_key, trace=trace,
            body_hash=hashlib.sha256(f"{model}\n{body.model_dump_json()}".encode()).hexdigest()
            if idempotency_key is not None else "",
        )  # fmt: skip
        return SubmitResponse(
            id=job.id,
            polling_url=f"{base_url(request)}/v1/get_result?id={job.id}",
            cost=job.cost,
            input_mp=job.input_mp,
            output_mp=job.output_mp,
        )

    # --- OpenAI-compatible images API ---

    async def openai_images(request: Request, body: ImagesRequest, images: list, key_id: str) -> Response:
        if body.model is not None and body.model != ingress.model_id:
            return JSONResponse(
                {"error": {"message": f"model {body.model!r} not found", "type": "invalid_request_error",
                           "param": "model", "code": "model_not_found"}}, 404)  # fmt: skip
        if body.n > opts.max_images_per_request:
            raise FieldError("n", f"must be at most {opts.max_images_per_request}, got {body.n}")
        size = parse_size(body.size)
        width, height = size if size else (None, None)
        with telemetry.span("submit", incoming_trace(request), model=ingress.model_id, n=body.n):
            trace = telemetry.carrier() or None
        jobs = []
        try:
            for i in range(body.n):
                job, _ = await ingress.submit(
                    prompt=body.prompt,
                    width=width,
                    height=height,
                    seed=None if body.seed is None else (body.seed + i) % 2**63,
                    steps=body.steps,
                    guidance=body.guidance,
                    safety_tolerance=body.safety_tolerance,
                    output_format=body.output_format,
                    images=images,
                    fields=OPENAI_FIELDS,
                    key_id=key_id,
                    trace=trace,
                    stored_inputs=jobs[0].request.input_keys if jobs else None,  # stored once per request
                    sync=True,
                )
                jobs.append(job)
        except BaseException:
            # refused part-way (limits, overload) or the caller left: the jobs made must not run
            for job in jobs:
                await asyncio.shield(ingress.discard(job))
            raise
        b64 = body.response_format == "b64_json"

        async def run(job):
            if job.status.terminal:
                return None
            return await ingress.run(job, return_bytes=b64, fresh=True, shed=True)

        runs = [asyncio.ensure_future(run(job)) for job in jobs]
        try:
            results = await asyncio.wait_for(asyncio.gather(*runs), opts.sync_timeout_s)
        except BaseException as e:  # client gone, too slow, no room for one of them, or a failure
            for r in runs:  # none of the others may go on to be billed: each ends Cancelled unless done
                r.cancel()
            for job in jobs:
                await asyncio.shield(ingress.cancel(job.id))  # stages stop work on them
            await asyncio.shield(asyncio.gather(*runs, return_exceptions=True))
            for job in jobs:  # any whose run never began: ended here, unbilled, and no longer counted
                await asyncio.shield(ingress.discard(job))
            if not isinstance(e, TimeoutError):
                raise
            return JSONResponse(
                {"error": {"message": f"no result within {opts.sync_timeout_s:g} s; use the async API for long jobs",
                           "type": "timeout", "job_ids": [j.id for j in jobs]}}, status_code=504)  # fmt: skip
        failed = [j for j, r in zip(jobs, results, strict=True) if r is None]
        moderated = [j for j in failed if j.status in (Status.REQUEST_MODERATED, Status.CONTENT_MODERATED)]
        if moderated:
            return JSONResponse(
                {"error": {"message": f"{moderated[0].status.value}: {moderated[0].error}", "type": "invalid_request_error",
                           "code": "content_policy_violation", "job_ids": [j.id for j in moderated]}},
                status_code=400,
            )  # fmt: skip
        if failed:
            job = failed[0]
            return JSONResponse(
                {"error": {"message": f"job {job.id}: {job.status.value}: {job.error or ''}".strip(),
                           "type": "server_error", "code": job.status.value.lower().replace(" ", "_")}},
                status_code=500,
            )  # fmt: skip
        data = [
            ImageData(b64_json=base64.b64encode(r.data).decode())
            if b64
            else ImageData(url=sample_url(request, r.key))
            for r in results
        ]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=body.output_format,
            size=f"{results[0].width}x{results[0].height}",
            metering={
                "input_mp": sum(j.input_mp for j in jobs),
                "output_mp": sum(j.output_mp for j in jobs),
                "cost": round(sum(j.cost for j in jobs), 6),
                "job_ids": [j.id for j in jobs],
            },
        )

    @app.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=_documented(400, 401, 404, 413, 415, 429, 500, 503, 504))  # fmt: skip
    async def generations(body: ImagesRequest, request: Request, key_id: str = Depends(caller)):
        return await openai_images(request, body, [], key_id)

    @app.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=_documented(400, 401, 404, 413, 415, 422, 429, 500, 503, 504),
              openapi_extra=_edit_form_schema())  # fmt: skip
    async def edits(request: Request, key_id: str = Depends(caller)):
        form = await request.form()
        unknown = sorted(set(form.keys()) - EDIT_FORM_FIELDS)
        if unknown:
            raise FieldError(unknown[0], "unknown field")
        if "mask" in form:
            raise FieldError(
                "mask", "masks are not supported; FLUX.2 [klein] edits from the prompt and references"
            )
        uploads = form.getlist("image") + form.getlist("image[]")
        if not uploads:
            raise FieldError("image", "at least one image is required")
        images = []
        for upload in uploads:
            if isinstance(upload, str):
                raise FieldError("image", "must be a file upload")
            raw, image = await decode(await upload.read(), "image")
            images.append(("image", raw, image))
        try:
            body = ImagesRequest(**{k: v for k, v in form.items() if k not in ("image", "image[]")})
        except ValidationError as e:
            err = e.errors()[0]
            raise FieldError(".".join(map(str, err["loc"])), err["msg"]) from None
        return await openai_images(request, body, images, key_id)

    # --- result files (local storage backend) ---

    @app.get("/v1/files/{key:path}", include_in_schema=False)
    async def files(key: str, expires: int = Query(...), signature: str = Query(...)):
        storage = ingress.storage
        if not isinstance(storage, LocalStorage):
            return JSONResponse({"detail": "not found"}, status_code=404)
        try:
            check_key(key)
            if not storage.verify(key, expires, signature):
                return JSONResponse({"detail": "link expired or invalid"}, status_code=403)
            data = await storage.get(key)
        except ValueError:
            return JSONResponse({"detail": "not found"}, status_code=404)
        if data is None:
            return JSONResponse({"detail": "not found"}, status_code=404)
        media = FILE_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream")
        return Response(data, media_type=media)

    return app
