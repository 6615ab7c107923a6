"""The OpenAI-compatible images API: synchronous generations and edits (n images per request, each
its own job), and the model list."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from deployments.api.auth import caller
from deployments.api.deps import images_of, options_of, sample_url, service_of, submit_trace
from deployments.api.errors import documented, openai_error
from deployments.api.schemas import ImageData, ImagesRequest, ImagesResponse, lora_requests, parse_size
from deployments.jobs.errors import FieldError
from deployments.jobs.records import JobRecord, Status
from deployments.jobs.service import InputImage, JobService, Submission

router = APIRouter()
FIELD_NAMES = {"width": "size", "height": "size", "references": "image"}  # klein's field -> OpenAI's
EDIT_FORM_FIELDS = set(ImagesRequest.model_fields) | {"image", "image[]", "mask"}
MODERATED = (Status.REQUEST_MODERATED, Status.CONTENT_MODERATED)


@router.get("/v1/models")
async def models(request: Request, key_id: str = Depends(caller)):
    model = {
        "id": service_of(request).model_id,
        "object": "model",
        "created": 0,
        "owned_by": "black-forest-labs",
    }
    return {"object": "list", "data": [model]}


def _edit_form_schema() -> dict:
    """The multipart form of POST /v1/images/edits (read by hand, so FastAPI cannot infer it)."""
    form = ImagesRequest.model_json_schema()
    image = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "minItems": 1,
        "maxItems": 4,
        "description": "1-4 reference images (also accepted as image[])",
    }
    form["properties"] = {"image": image, **form["properties"]}
    form["required"] = ["image", *form.get("required", [])]
    form.pop("title", None)
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=documented(400, 401, 404, 413, 415, 429, 500, 503, 504),
)
async def generations(body: ImagesRequest, request: Request, key_id: str = Depends(caller)):
    return await images(request, body, [], key_id)


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=documented(400, 401, 404, 413, 415, 422, 429, 500, 503, 504),
    openapi_extra=_edit_form_schema(),
)
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
    files = []
    for upload in uploads:
        if isinstance(upload, str):
            raise FieldError("image", "must be a file upload")
        files.append(await images_of(request).read("image", await upload.read()))
    try:
        fields = {k: v for k, v in form.items() if k not in ("image", "image[]")}
        if "loras" in fields:  # a JSON list in a form field
            try:
                fields["loras"] = json.loads(fields["loras"])
            except ValueError:
                raise FieldError("loras", "must be a JSON list of {path, scale}") from None
        body = ImagesRequest.model_validate(fields, strict=False)  # a form's values are all text
    except ValidationError as e:
        err = e.errors()[0]
        raise FieldError(".".join(map(str, err["loc"])), err["msg"]) from None
    return await images(request, body, files, key_id)


async def images(request: Request, body: ImagesRequest, files: list[InputImage], key_id: str) -> Response:
    """n jobs, run here while the caller waits; the images (or links to them) in one answer."""
    service, options = service_of(request), options_of(request)
    if body.model is not None and body.model != service.model_id:
        return openai_error(
            404,
            f"model {body.model!r} not found",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )
    if body.n > options.max_images_per_request:
        raise FieldError("n", f"must be at most {options.max_images_per_request}, got {body.n}")
    jobs = await _submit_all(service, request, body, files, key_id)
    b64 = body.response_format == "b64_json"
    runs = [asyncio.ensure_future(_run(service, job, b64)) for job in jobs]
    try:
        results = await asyncio.wait_for(asyncio.gather(*runs), options.sync_timeout_s)
    except BaseException as e:  # client gone, too slow, no room for one of them, or a failure
        await _abandon(service, jobs, runs)
        if not isinstance(e, TimeoutError):
            raise
        return openai_error(
            504,
            f"no result within {options.sync_timeout_s:g} s; use the async API for long jobs",
            "timeout",
            job_ids=[j.id for j in jobs],
        )
    failed = [j for j, r in zip(jobs, results, strict=True) if r is None]
    if moderated := [j for j in failed if j.status in MODERATED]:
        message = f"{moderated[0].status.value}: {moderated[0].error}"
        return openai_error(
            400,
            message,
            "invalid_request_error",
            code="content_policy_violation",
            job_ids=[j.id for j in moderated],
        )
    if failed:
        job = failed[0]
        message = f"job {job.id}: {job.status.value}: {job.error or ''}".strip()
        return openai_error(500, message, "server_error", code=job.status.value.lower().replace(" ", "_"))
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


async def _submit_all(
    service: JobService, request: Request, body: ImagesRequest, files: list[InputImage], key_id: str
) -> list[JobRecord]:
    """One job per image (seeds seed, seed+1, ...); the input files are stored once, by the first.
    Refused part-way (limits, overload) or left by the caller, the jobs made are discarded."""
    size = parse_size(body.size)
    width, height = size if size else (None, None)
    trace = submit_trace(request, model=service.model_id, n=body.n)
    jobs: list[JobRecord] = []
    try:
        for i in range(body.n):
            submission = Submission(
                prompt=body.prompt,
                width=width,
                height=height,
                seed=None if body.seed is None else (body.seed + i) % 2**63,
                steps=body.steps,
                guidance=body.guidance,
                images=tuple(files),
                loras=lora_requests(body.loras),
                output_format=body.output_format,
                safety_tolerance=body.safety_tolerance,
                key_id=key_id,
                trace=trace,
                sync=True,
                shared_inputs=tuple(jobs[0].request.input_keys) if jobs else (),
                field_names=FIELD_NAMES,
            )
            jobs.append((await service.submit(submission))[0])
    except BaseException:
        for job in jobs:
            await asyncio.shield(service.discard(job))
        raise
    return jobs


async def _run(service: JobService, job: JobRecord, return_bytes: bool):
    if job.status.terminal:
        return None
    return await service.run(job, return_bytes=return_bytes, fresh=True, shed=True)


async def _abandon(service: JobService, jobs: list[JobRecord], runs: list[asyncio.Future]) -> None:
    """None of the jobs may go on to be billed: each ends Cancelled unless done."""
    for r in runs:
        r.cancel()
    for job in jobs:
        await asyncio.shield(service.cancel(job.id))  # the stages stop work on them
    await asyncio.shield(asyncio.gather(*runs, return_exceptions=True))
    for job in jobs:  # any whose run never began: ended here, unbilled, and no longer counted
        await asyncio.shield(service.discard(job))
