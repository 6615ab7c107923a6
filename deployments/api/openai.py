"""The OpenAI-compatible images API: synchronous generations and edits (n images per request, each
its own job; run and streamed by `sync_runs`), and the model list with the model's bounds."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from deployments.api import sync_runs
from deployments.api.auth import caller
from deployments.api.deps import images_of, options_of, sample_url, service_of, submit_trace
from deployments.api.errors import documented, openai_error
from deployments.api.events import STREAM_HEADERS, streamed
from deployments.api.schemas import ImageData, ImagesRequest, ImagesResponse, lora_requests, parse_size
from deployments.jobs.errors import FieldError
from deployments.jobs.records import JobRecord
from deployments.jobs.service import InputImage, JobService, Submission
from klein.image import EXTENSIONS
from klein.request import LORA_SCALE

router = APIRouter()
FIELD_NAMES = {"width": "size", "height": "size", "references": "image"}  # klein's field -> OpenAI's
EDIT_FORM_FIELDS = set(ImagesRequest.model_fields) | {"image", "image[]", "mask"}
MODERATED = sync_runs.MODERATED
STREAMED = streamed("the images (JSON), or with `stream: true` their events")


@router.get("/v1/models")
async def models(request: Request, key_id: str = Depends(caller)):
    service = service_of(request)
    model = {
        "id": service.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "black-forest-labs",
        "klein": capabilities(service),  # an extension: what requests to this model may ask for
    }
    return {"object": "list", "data": [model]}


def capabilities(service: JobService) -> dict:
    """The model's bounds, as the API checks them (the playground builds its form from these)."""
    spec, sampling = service.spec, service.spec.sampling
    guidance = None
    if sampling.cfg:
        guidance = {"default": sampling.guidance, "min": sampling.min_guidance, "max": sampling.max_guidance}
    lora = None
    if service.adapters is not None:
        lora = {"max_loras": service.adapters.settings.max_loras, "max_scale": LORA_SCALE}
    return {
        "cfg": sampling.cfg,
        "steps": {"default": sampling.steps, "max": sampling.max_steps},
        "guidance": guidance,
        "size": {
            "default": spec.default_size,
            "min": spec.min_side,
            "max": spec.max_side,
            "multiple": spec.multiple,
            "max_pixels": spec.max_pixels,
        },
        "max_references": spec.max_references,
        "output_formats": list(EXTENSIONS),
        "lora": lora,
        "price": service.price.model_dump(),  # credits per megapixel (docs: metering)
    }


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
    mask = {
        "type": "string",
        "format": "binary",
        "description": "inpainting: a PNG the size of the first image; its transparent pixels are repainted",
    }
    form["properties"] = {"image": image, "mask": mask, **form["properties"]}
    form["required"] = ["image", *form.get("required", [])]
    form.pop("title", None)
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=documented(400, 401, 404, 413, 415, 429, 500, 503, 504) | STREAMED,
)
async def generations(body: ImagesRequest, request: Request, key_id: str = Depends(caller)):
    return await images(request, body, [], key_id, "image_generation")


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=documented(400, 401, 404, 413, 415, 422, 429, 500, 503, 504) | STREAMED,
    openapi_extra=_edit_form_schema(),
)
async def edits(request: Request, key_id: str = Depends(caller)):
    form = await request.form()
    unknown = sorted(set(form.keys()) - EDIT_FORM_FIELDS)
    if unknown:
        raise FieldError(unknown[0], "unknown field")
    mask = None
    if "mask" in form:  # inpainting: the first image is repainted where the mask is transparent
        upload = form["mask"]
        if isinstance(upload, str):
            raise FieldError("mask", "must be a file upload (a PNG with alpha)")
        mask = await images_of(request).read_mask("mask", await upload.read(), transparent_repaints=True)
    uploads = form.getlist("image") + form.getlist("image[]")
    if not uploads:
        raise FieldError("image", "at least one image is required")
    files = []
    for upload in uploads:
        if isinstance(upload, str):
            raise FieldError("image", "must be a file upload")
        files.append(await images_of(request).read("image", await upload.read()))
    try:
        fields = {k: v for k, v in form.items() if k not in ("image", "image[]", "mask")}
        if files_sent := sorted(k for k, v in fields.items() if not isinstance(v, str)):
            raise FieldError(files_sent[0], "must be a text field, not a file upload")
        if "loras" in fields:  # a JSON list in a form field
            try:
                fields["loras"] = json.loads(fields["loras"])
            except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
                raise FieldError("loras", "must be a JSON list of {path, scale}") from None
        body = ImagesRequest.model_validate(fields, strict=False)  # a form's values are all text
    except ValidationError as e:
        err = e.errors()[0]
        raise FieldError(".".join(map(str, err["loc"])), err["msg"]) from None
    return await images(request, body, files, key_id, "image_edit", mask)


async def images(
    request: Request,
    body: ImagesRequest,
    files: list[InputImage],
    key_id: str,
    kind: str,
    mask: InputImage | None = None,
) -> Response:
    """n jobs, run here while the caller waits; the images (or links to them) in one answer, or
    streamed (`kind` names the events: image_generation or image_edit)."""
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
    if body.stream and body.n != 1:
        raise FieldError("n", f"must be 1 when stream is true, got {body.n}")
    if body.partial_images and not body.stream:
        raise FieldError("partial_images", "needs stream: true")
    jobs = await _submit_all(service, request, body, files, key_id, mask)
    if body.stream:
        return sync_runs.JobStream(
            service,
            jobs[0],
            sync_runs.stream(request, body, jobs[0], kind),
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
        )
    outcomes = await sync_runs.run_all(
        service, jobs, body.response_format == "b64_json", options.sync_timeout_s
    )
    if not any(o.result is not None for o in outcomes):
        if refused := [o.error for o in outcomes if o.error is not None]:
            raise refused[0]  # answered by its own handler (an overloaded stage: 503, Retry-After)
        if any(o.stopped is not None for o in outcomes):  # stopped by the time, nothing having failed
            return openai_error(
                504,
                f"no result within {options.sync_timeout_s:g} s; use the async API for long jobs",
                "timeout",
                job_ids=[j.id for j in jobs],
            )
    return _answer(request, body, outcomes)


def _answer(request: Request, body: ImagesRequest, outcomes: list[sync_runs.Outcome]) -> Response:
    """The request's jobs as OpenAI's answer: the images that were made, billed and metered alone,
    with the others named under `metering.failed` (moderated, failed after their retries, refused
    by a full stage, or out of time); when none was made, the first failure as the error."""
    jobs = [o.job for o in outcomes]
    made = [(o.job, o.result) for o in outcomes if o.result is not None]
    failed = [o for o in outcomes if o.result is None]
    if not made and (moderated := [o.job for o in failed if o.job.status in MODERATED]):
        message = f"{moderated[0].status.value}: {moderated[0].error}"
        return openai_error(
            400,
            message,
            "invalid_request_error",
            code="content_policy_violation",
            job_ids=[j.id for j in jobs],
        )
    if not made:
        job = failed[0].job
        message = f"job {job.id}: {job.status.value}: {job.error or ''}".strip()
        code = job.status.value.lower().replace(" ", "_")
        return openai_error(500, message, "server_error", code=code, job_ids=[j.id for j in jobs])
    data = [
        ImageData(b64_json=base64.b64encode(r.data).decode())
        if body.response_format == "b64_json"
        else ImageData(url=sample_url(request, r.key))
        for _, r in made
    ]
    billed = [j for j, _ in made]
    metering = {
        "input_mp": sum(j.input_mp for j in billed),
        "output_mp": sum(j.output_mp for j in billed),
        "cost": round(sum(j.cost for j in billed), 6),
        "job_ids": [j.id for j in billed],
    }
    if failed:
        metering["failed"] = [
            {"job_id": o.job.id, "status": o.job.status.value, "error": o.why} for o in failed
        ]
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=body.output_format,
        size=f"{made[0][1].width}x{made[0][1].height}",
        metering=metering,
    )


async def _submit_all(
    service: JobService,
    request: Request,
    body: ImagesRequest,
    files: list[InputImage],
    key_id: str,
    mask: InputImage | None = None,
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
                shared_inputs=tuple(jobs[0].request.input_files) if jobs else (),  # the mask last
                field_names=FIELD_NAMES,
                previews=body.partial_images,
                mask=mask,
                strength=body.strength,
            )
            jobs.append((await service.submit(submission))[0])
    except BaseException:
        for job in jobs:
            await asyncio.shield(service.discard(job))
        raise
    return jobs
