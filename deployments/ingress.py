"""Ingress: validation, job records, and orchestration of the stages.

Each job chains `DeploymentResponse`s (embed -> [encode refs] -> denoise -> finish), so embeddings
and latents travel replica to replica; the ingress only ever holds the small final result. Job
records live in storage, so any replica answers any poll, and a reaper loop re-runs jobs whose
lease expired (their ingress died) with the same output keys.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from pydantic import BaseModel, Field

from deployments.api import FieldError
from deployments.jobs import JobRecord, JobRequest, JobResult, JobStore, Status, new_job_id
from deployments.metering import Price, cost, megapixels
from deployments.options import ActorOptions, DeploymentOptions
from deployments.payloads import DenoiseParams, FinishParams, FinishResult, JobCancelled
from deployments.storage import StorageOptions, open_storage
from deployments.webhooks import deliver, is_private_target
from klein.config import ModelSpec
from klein.request import GenerationRequest, InvalidRequest, reference_size, validate

log = logging.getLogger(__name__)


class IngressOptions(BaseModel):
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            max_ongoing_requests=256, ray_actor=ActorOptions(num_cpus=0.5)
        )
    )
    public_url: str | None = Field(None, description="base URL clients reach us at; default: the request's")
    max_body_mb: int = Field(64, ge=1, description="largest request body accepted (413 beyond)")
    max_input_image_mb: int = Field(20, ge=1, description="largest input image file")
    max_input_image_pixels: int = Field(
        40_000_000, ge=4096, description="largest input image before resizing"
    )
    max_images_per_request: int = Field(4, ge=1, le=16, description="OpenAI `n` upper bound")
    job_lease_s: float = Field(600.0, gt=0, description="a Pending job older than this is run again")
    max_attempts: int = Field(3, ge=1, description="runs of a job before it ends in Error")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each attempt")
    reaper_interval_s: float = Field(15.0, gt=0, description="how often abandoned jobs are looked for")
    sync_timeout_s: float = Field(300.0, gt=0, description="OpenAI-style requests give up after this")
    webhook_attempts: int = Field(5, ge=1)
    webhook_allow_private: bool = Field(False, description="allow webhooks to private/loopback addresses")


REFERENCE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")


class Ingress:
    def __init__(
        self,
        embedder,
        transformer,
        codec,
        spec: ModelSpec,
        model_id: str,
        options: IngressOptions,
        storage: StorageOptions,
        price: Price,
    ):
        self.embedder, self.transformer, self.codec = embedder, transformer, codec
        self.spec, self.model_id, self.options, self.price = spec, model_id, options, price
        self.storage_options = storage
        self.storage = open_storage(storage)
        self.jobs = JobStore(self.storage)
        self._running: dict[str, asyncio.Task] = {}
        self._reaper: asyncio.Task | None = None

    def __serve_build_asgi_app__(self):
        from deployments.routes import build_api

        return build_api(self)

    # --- submission ---

    async def submit(
        self,
        *,
        prompt: str,
        width: int | None,
        height: int | None,
        seed: int | None,
        steps: int | None,
        guidance: float | None,
        safety_tolerance: int,
        output_format: str,
        images: list[tuple[str, bytes, object]],
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> JobRecord:
        """Validate against the model, store inputs and the job record. `images` are
        (field, file bytes, PIL image); `fields` renames klein's fields for error messages."""
        fields = fields or {}
        if webhook_url and not self.options.webhook_allow_private and is_private_target(webhook_url):
            raise FieldError("webhook_url", "must not point to a private, loopback or link-local address")
        seed = secrets.randbelow(2**32) if seed is None else seed
        try:
            req = validate(
                self.spec,
                GenerationRequest(
                    prompt, width, height, seed, steps, guidance, tuple(im for _, _, im in images)
                ),
            )
        except InvalidRequest as e:
            name = e.field
            if name.startswith("references["):
                name = images[int(name[11:-1])][0]
            raise FieldError(fields.get(name, name), e.message) from None
        m = self.spec.multiple
        sizes = [reference_size(*im.size, self.spec.reference_max_pixels, m) for _, _, im in images]
        job = JobRecord(
            id=new_job_id(),
            model=self.model_id,
            request=JobRequest(
                prompt=req.prompt,
                width=req.width,
                height=req.height,
                seed=req.seed,
                steps=req.steps,
                guidance=req.guidance if self.spec.sampling.cfg else None,
                safety_tolerance=safety_tolerance,
                output_format=output_format,
                webhook_url=webhook_url,
                webhook_secret=webhook_secret,
                ref_shapes=[(h // m, w // m) for w, h in sizes],
            ),  # fmt: skip
            input_mp=megapixels(sum(w * h for w, h in sizes)),
            output_mp=megapixels(req.width * req.height),
            lease_until=time.time() + self.options.job_lease_s,
        )
        job.cost = cost(self.price, job.output_mp, job.input_mp)
        for k, (_, data, _) in enumerate(images):
            key = f"inputs/{job.id}/{k}"
            await self.storage.put(key, data)
            job.request.input_keys.append(key)
        await self.jobs.create(job)
        self.ensure_reaper()
        return job

    def start(self, job: JobRecord, fresh: bool = False) -> asyncio.Task:
        """Run a job in the background of this replica (the async API)."""
        task = asyncio.create_task(self.run(job, fresh=fresh))
        self._running[job.id] = task
        task.add_done_callback(lambda _: self._running.pop(job.id, None))
        return task

    # --- running ---

    async def run(
        self, job: JobRecord, return_bytes: bool = False, fresh: bool = False
    ) -> FinishResult | None:
        """Run a job to a terminal status (retrying stage failures) and record it. A `fresh` job
        was just created here with its lease: its first attempt skips one write and one read."""
        result = None
        while True:
            job.attempts += 1
            job.status, job.started_at = Status.PENDING, job.started_at or time.time()
            if not (fresh and job.attempts == 1):
                job.lease_until = time.time() + self.options.job_lease_s
                await self.jobs.save(job)
            try:
                pipeline = self._pipeline(job, return_bytes, check_cancel=not (fresh and job.attempts == 1))
                result = await asyncio.wait_for(pipeline, self.options.job_lease_s)
            except JobCancelled:
                job.status, job.error = Status.CANCELLED, "cancelled by the client"
            except Exception as e:  # a stage died, timed out or failed: retry, then give up
                log.warning("job %s attempt %d failed: %s: %s", job.id, job.attempts, type(e).__name__, e)
                if job.attempts < self.options.max_attempts and not await self.jobs.cancel_requested(job.id):
                    await asyncio.sleep(self.options.retry_backoff_s * 2 ** (job.attempts - 1))
                    continue
                job.status, job.error = Status.ERROR, f"generation failed after {job.attempts} attempts"
            else:
                job.status = Status.READY
                job.result = JobResult(
                    key=result.key, width=result.width, height=result.height,
                    content_type=result.content_type, size_bytes=result.size_bytes,
                )  # fmt: skip
            break
        job.finished_at = time.time()
        await self.jobs.finish(job)
        self._notify(job)
        return result if job.status is Status.READY else None

    async def _pipeline(self, job: JobRecord, return_bytes: bool, check_cancel: bool = True) -> FinishResult:
        if check_cancel and await self.jobs.cancel_requested(job.id):  # the transformer checks between steps
            raise JobCancelled(job.id)
        r = job.request
        images = [await self.storage.get(k) for k in r.input_keys]
        if any(b is None for b in images):
            raise RuntimeError(f"job {job.id}: an input image is missing from storage")
        cfg = r.guidance is not None and r.guidance > 1.0
        params = DenoiseParams(
            job.id,
            r.width,
            r.height,
            r.seed,
            r.steps,
            r.guidance if cfg else None,
            tuple(map(tuple, r.ref_shapes)),
        )
        ctx = self.embedder.embed.remote(r.prompt)
        neg = self.embedder.embed.remote("") if cfg else None
        refs = self.codec.encode.remote(images) if images else None
        latents = self.transformer.denoise.remote(params, ctx, neg, refs)
        finish = FinishParams(
            job.id, job.output_key, r.output_format, r.prompt, job.model, r.seed, return_bytes
        )
        return await self.codec.finish.remote(latents, finish)

    def _notify(self, job: JobRecord) -> None:
        r = job.request
        if not r.webhook_url:
            return
        payload = {"id": job.id, "status": job.status.value, "result": self.result_payload(job, sample=None)}
        asyncio.create_task(deliver(r.webhook_url, payload, r.webhook_secret, self.options.webhook_attempts))

    def result_payload(self, job: JobRecord, sample: str | None) -> dict | None:
        if job.status is not Status.READY or job.result is None:
            return None
        return {
            "sample": sample or job.result.key,
            "prompt": job.request.prompt,
            "seed": job.request.seed,
            "width": job.result.width,
            "height": job.result.height,
            "output_format": job.request.output_format,
            "start_time": job.started_at,
            "end_time": job.finished_at,
            "duration": (job.finished_at or 0) - (job.started_at or 0),
        }

    async def cancel(self, job_id: str) -> None:
        await self.jobs.request_cancel(job_id)

    # --- the reaper: jobs never vanish ---

    def ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.reaper_interval_s)
            try:
                await self.reap()
            except Exception:
                log.exception("reaper pass failed")

    async def reap(self) -> int:
        """Re-run Pending jobs whose lease expired; returns how many were restarted."""
        restarted = 0
        for job_id in await self.jobs.pending_ids():
            if job_id in self._running:
                continue
            job = await self.jobs.get(job_id)
            if job is None:
                continue
            if job.status.terminal:
                await self.storage.delete(f"pending/{job_id}")
            elif job.lease_until < time.time():
                if job.attempts >= self.options.max_attempts:
                    job.status, job.error = Status.ERROR, f"abandoned after {job.attempts} attempts"
                    job.finished_at = time.time()
                    await self.jobs.finish(job)
                    self._notify(job)
                else:
                    log.warning(
                        "job %s: lease expired after attempt %d; running it again", job_id, job.attempts
                    )
                    self.start(job)
                    restarted += 1
        return restarted

    async def check_health(self) -> None:
        self.ensure_reaper()
        await asyncio.to_thread(self.storage.check)
