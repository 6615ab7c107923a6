"""The BFL-compatible async API: submit, poll, cancel."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse

from deployments.api.auth import caller
from deployments.api.deps import base_url, images_of, sample_url, service_of, submit_trace
from deployments.api.errors import documented, json_error
from deployments.api.schemas import GenerateRequest, ResultResponse, SubmitResponse, lora_requests
from deployments.jobs.idempotency import IdempotencyClaim
from deployments.jobs.progress import Step, progress_of
from deployments.jobs.records import MAX_PREVIEWS, JobRecord, Status
from deployments.jobs.service import Submission, Webhook

router = APIRouter()


def result_body(request: Request, job: JobRecord, step: Step | None) -> ResultResponse:
    """What get_result answers for a job (and the event stream's last event)."""
    sample = sample_url(request, job.result.key) if job.status is Status.READY and job.result else None
    return ResultResponse(
        id=job.id,
        status=job.status.value,
        result=job.summary(sample),
        progress=progress_of(job, step),
        details={"error": job.error} if job.error else None,
        cost=job.charge,
        input_mp=job.input_mp,
        output_mp=job.output_mp,
    )


@router.get(
    "/v1/get_result",
    response_model=ResultResponse,
    response_model_exclude_none=True,
    responses=documented(401, 503),
)
async def get_result(request: Request, id: str = Query(..., max_length=64), key_id: str = Depends(caller)):
    service = service_of(request)
    job = await service.get(id, key_id)
    if job is None:  # another key's job does not exist for this caller
        return ResultResponse(id=id, status=Status.NOT_FOUND.value)
    return result_body(request, job, await service.step(job))


@router.delete("/v1/jobs/{job_id}", status_code=202, responses=documented(401, 404, 409, 503))
async def cancel(request: Request, job_id: str, key_id: str = Depends(caller)):
    service = service_of(request)
    job = await service.get(job_id, key_id)
    if job is None:
        return JSONResponse({"id": job_id, "status": Status.NOT_FOUND.value}, status_code=404)
    if job.status.terminal:
        return JSONResponse({"id": job_id, "status": job.status.value, "detail": "already finished"}, 409)
    await service.cancel(job_id)
    return JSONResponse({"id": job_id, "status": job.status.value, "cancel_requested": True}, status_code=202)


@router.post(
    "/v1/{model}", response_model=SubmitResponse, responses=documented(400, 401, 404, 409, 413, 415, 429, 503)
)
async def submit(
    model: str,
    body: GenerateRequest,
    request: Request,
    key_id: str = Depends(caller),
    idempotency_key: str | None = Header(None, max_length=255),
):
    service = service_of(request)
    if model != service.model_id:
        return json_error(404, f"unknown model {model!r}; this service runs {service.model_id}")
    claim = None
    if idempotency_key is not None:
        claim = IdempotencyClaim(
            idempotency_key, hashlib.sha256(f"{model}\n{body.model_dump_json()}".encode()).hexdigest()
        )
        # a retry is answered before its images are read again (a URL in it may have expired)
        if (existing := await service.replay(key_id, claim)) is not None:
            return _submitted(request, existing)
    images = [await images_of(request).read(field, data) for field, data in body.images()]
    mask = None
    if body.mask_image is not None:
        mask = await images_of(request).read_mask("mask_image", body.mask_image, transparent_repaints=False)
    webhook = None
    if body.webhook_url:
        webhook = Webhook(str(body.webhook_url), body.webhook_secret, base_url(request))
    submission = Submission(
        prompt=body.prompt,
        width=body.width,
        height=body.height,
        seed=body.seed,
        steps=body.steps,
        guidance=body.guidance,
        images=tuple(images),
        loras=lora_requests(body.loras),
        output_format=body.output_format,
        safety_tolerance=body.safety_tolerance,
        key_id=key_id,
        webhook=webhook,
        idempotency=claim,
        trace=submit_trace(request, model=model),
        field_names={"references": "input_image", "mask": "mask_image"},
        previews=MAX_PREVIEWS if body.preview else 0,
        mask=mask,
        strength=body.strength,
    )
    job, _ = await service.submit(submission, start=True)
    return _submitted(request, job)


def _submitted(request: Request, job: JobRecord) -> SubmitResponse:
    return SubmitResponse(
        id=job.id,
        polling_url=f"{base_url(request)}/v1/get_result?id={job.id}",
        cost=job.charge,
        input_mp=job.input_mp,
        output_mp=job.output_mp,
    )
