"""Ingress: validation, job records, and orchestration of the stages.

Each job chains `DeploymentResponse`s (embed -> [encode refs] -> denoise -> finish), so embeddings
and latents travel replica to replica; the ingress only ever holds the small final result. Job
records live in storage, so any replica answers any poll, and a reaper loop re-runs jobs whose
lease expired (their ingress died) with the same output keys. Records are written by
compare-and-swap (deployments/jobs.py): two reapers cannot both take one job, and a runner whose
job was taken over stops instead of overwriting the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from datetime import date, timedelta

from pydantic import BaseModel, Field

from deployments import metrics, telemetry
from deployments.api import FieldError
from deployments.auth import ANONYMOUS, KeyRing
from deployments.jobs import JobRecord, JobRequest, JobResult, JobStore, Status, Superseded, new_job_id
from deployments.metering import Price, UsageRecord, cost, megapixels, usage_key, usage_prefix
from deployments.netguard import is_private_target
from deployments.options import ActorOptions, DeploymentOptions
from deployments.payloads import (
    ContentModerated,
    DenoiseParams,
    FinishParams,
    FinishResult,
    JobCancelled,
    RequestModerated,
    tokens,
)
from deployments.postprocess import SafetyOptions
from deployments.storage import StorageError, StorageOptions, open_storage
from deployments.webhooks import deliver
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
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed to call from browsers (CORS); none by default"
    )
    max_input_image_mb: int = Field(20, ge=1, description="largest input image file")
    max_input_image_pixels: int = Field(
        40_000_000, ge=4096, description="largest input image before resizing"
    )
    max_images_per_request: int = Field(4, ge=1, le=16, description="OpenAI `n` upper bound")
    max_jobs_in_flight: int = Field(24, ge=1, description="per API key, like BFL; 429 beyond")
    max_running_jobs: int = Field(
        256, ge=1, description="jobs one ingress replica runs at once (async and sync); 503 beyond"
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 429 and 503")
    job_lease_s: float = Field(600.0, gt=0, description="a Pending job older than this is run again")
    job_deadline_s: float = Field(
        3600.0, gt=0, description="a job not finished this long after submission ends in Error"
    )
    request_storage_retry_s: float = Field(
        5.0, ge=0, description="storage retries while a client waits (polls); 503 + Retry-After after"
    )
    max_attempts: int = Field(3, ge=1, description="runs of a job before it ends in Error")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each attempt")
    reaper_interval_s: float = Field(15.0, gt=0, description="how often abandoned jobs are looked for")
    sync_timeout_s: float = Field(300.0, gt=0, description="OpenAI-style requests give up after this")
    webhook_attempts: int = Field(5, ge=1)
    webhook_allow_private: bool = Field(False, description="allow webhooks to private/loopback addresses")
    fetch_input_urls: bool = Field(False, description="accept http(s) URLs as input images (fetched here)")
    fetch_allow_private: bool = Field(
        False, description="allow input-image URLs on private/loopback addresses"
    )
    fetch_timeout_s: float = Field(10.0, gt=0, le=120, description="time cap for fetching one input image")


class TooManyJobs(Exception):
    """The calling key already has its maximum of jobs in flight (HTTP 429)."""

    def __init__(self, limit: int):
        super().__init__(f"at most {limit} jobs in flight per API key; retry when one finishes")
        self.limit = limit


class Overloaded(Exception):
    """This replica runs its maximum of jobs, or a stage's queue is full (HTTP 503 + Retry-After)."""


def is_backpressure(e: BaseException) -> bool:
    """A stage refused the call because its queue is full (Serve's BackPressureError, possibly
    wrapped when it came through a chained response)."""
    from ray.serve.exceptions import BackPressureError

    while e is not None:
        if isinstance(e, BackPressureError) or type(e).__name__ == "BackPressureError":
            return True
        e = e.__cause__
    return False


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body (HTTP 409)."""


def _log_failure(task: asyncio.Task) -> None:
    """A background task's failure, logged even when nobody awaits it any more (its caller left)."""
    if not task.cancelled() and (e := task.exception()) is not None and not isinstance(e, Superseded):
        log.error("%s failed: %s: %s", task.get_coro().__qualname__, type(e).__name__, e)


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
        keys: KeyRing | None = None,
        tracing: telemetry.TelemetryOptions | None = None,
        safety: SafetyOptions | None = None,
        max_request_tokens: int | None = None,
    ):
        telemetry.setup(tracing or telemetry.TelemetryOptions(), "Ingress")
        self.embedder, self.transformer, self.codec = embedder, transformer, codec
        self.keys = keys or KeyRing()
        self.safety = safety or SafetyOptions()
        self.prompt_filter = self.safety.prompt_filter()
        self.spec, self.model_id, self.options, self.price = spec, model_id, options, price
        self.max_request_tokens = max_request_tokens  # the FlowTransformer's max_batch_tokens
        self.storage_options = storage
        self.storage = open_storage(storage)
        self.jobs = JobStore(self.storage)
        self._running: dict[str, asyncio.Task] = {}
        self._admitted: set[str] = set()  # jobs submitted or being run here: max_running_jobs counts them
        # per key: this replica's submissions under way past the key's cap check
        self._submitting: dict[str, set[str]] = {}
        self._inputs: dict[str, list[bytes]] = {}  # input images of jobs submitted here: no read-back
        self._deliveries: set[asyncio.Task] = set()  # webhook tasks, referenced until done
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
        key_id: str = ANONYMOUS,
        idempotency_key: str | None = None,
        body_hash: str = "",
        trace: dict[str, str] | None = None,
        stored_inputs: list[str] | None = None,
        sync: bool = False,
        public_url: str | None = None,
        start: bool = False,
    ) -> tuple[JobRecord, bool]:
        """Validate against the model, store inputs and the job record. `images` are
        (field, file bytes, PIL image); `fields` renames klein's fields for error messages;
        `stored_inputs` are the storage keys of these same images when a sibling job of one request
        (OpenAI n > 1) already stored them; `sync` marks a job whose caller waits for it on its
        connection (the reaper ends such a job instead of running it again); `public_url` is the base
        URL the client reached us at, for the result link in its webhook; `start` runs the job in the
        background here as soon as it is stored (the async API), even if the caller leaves before
        the answer. Returns (job, replayed): replayed when an Idempotency-Key named an existing job."""
        fields = fields or {}
        job_id = new_job_id()
        if idempotency_key is not None:
            job_id, existing = await self.idempotent_job(key_id, idempotency_key, body_hash)
            if existing is not None:
                return existing, True
        with self._admitting(job_id, key_id):
            # the key's jobs in storage (every replica's) and this replica's others past this check on
            # their way there, by id: one whose marker lands while the listing is taken counts once
            submitting = self._submitting.setdefault(key_id, set())
            before = set(submitting)
            listed = await self.jobs.in_flight_ids(key_id)
            if len(listed | before | submitting) >= self.options.max_jobs_in_flight:
                raise TooManyJobs(self.options.max_jobs_in_flight)
            submitting.add(job_id)
            if (
                webhook_url
                and not self.options.webhook_allow_private
                and await asyncio.to_thread(is_private_target, webhook_url)
            ):  # DNS off the event loop
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
            ref_shapes = [(h // m, w // m) for w, h in sizes]
            limit, n = self.max_request_tokens, tokens(req.width, req.height, ref_shapes)
            if limit is not None and n > limit:  # the transformer could never batch it: refused now
                field = fields.get("references", "references") if images else "width"
                raise FieldError(field, f"the image and its references come to {n} tokens (one per 16x16 "
                                        f"pixels), over this deployment's limit of {limit}")  # fmt: skip
            job = JobRecord(
                id=job_id,
                model=self.model_id,
                key_id=key_id,
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
                    public_url=public_url if webhook_url else None,
                    webhook_secret=webhook_secret,
                    ref_shapes=ref_shapes,
                ),  # fmt: skip
                input_mp=megapixels(sum(w * h for w, h in sizes)),
                output_mp=megapixels(req.width * req.height),
                lease_until=time.time() + self.options.job_lease_s,
                trace=trace,
                sync=sync,
                body_sha256=body_hash or None,
            )
            job.cost = cost(self.price, job.output_mp, job.input_mp)
            if (term := self.prompt_filter.match(req.prompt)) is not None:  # moderated: recorded, never run
                log.info("job %s: prompt blocked by term %r", job.id, term, extra={"job_id": job.id})
                try:
                    await self._end(job, Status.REQUEST_MODERATED, "the prompt contains a blocked term")
                except Superseded:  # a racing submission with the same Idempotency-Key was first
                    return await self._twin(job, idempotency_key), True
                finally:
                    self._release(job.id)
                return job, False
            shared = bool(stored_inputs) and len(stored_inputs) == len(images)
            if shared:
                job.request.input_keys = list(stored_inputs)
            else:
                nonce = secrets.token_hex(4)  # a racing twin's inputs (same job id) never overwrite these
                for k, (_, data, _) in enumerate(images):
                    key = f"inputs/{job.id}/{nonce}-{k}"
                    await self.storage.put(key, data)
                    job.request.input_keys.append(key)
            inputs = [data for _, data, _ in images]
            creating = asyncio.ensure_future(self._create(job, inputs, start))
            creating.add_done_callback(_log_failure)
            try:  # shielded: a caller leaving now must not part the record from its marker, or its start
                await asyncio.shield(creating)
            except Superseded:  # a racing submission with the same Idempotency-Key was first
                self._release(job.id)
                if not shared:
                    await asyncio.gather(*map(self.storage.delete, job.request.input_keys))
                return await self._twin(job, idempotency_key), True
            if inputs and not start:  # kept for the run the caller makes next: no read-back
                self._inputs[job.id] = inputs
            if idempotency_key is not None:
                record = {"job_id": job.id, "body_sha256": body_hash, "created_at": job.created_at}
                await self.storage.put(
                    self._idempotency_key(key_id, idempotency_key), json.dumps(record).encode()
                )
            self.ensure_reaper()
            return job, False

    async def _create(self, job: JobRecord, inputs: list[bytes], start: bool) -> None:
        """Store the pending marker and the record; with `start`, run the job here at once."""
        await self.jobs.create(job)
        if start:
            if inputs:
                self._inputs[job.id] = inputs
            self.start(job, fresh=True)

    def _release(self, job_id: str) -> None:
        """A submission ends without running here: it no longer counts against max_running_jobs,
        unless a run here holds the same id (an Idempotency-Key twin's, or its own once started)."""
        if job_id not in self._running:
            self._admitted.discard(job_id)

    @contextlib.contextmanager
    def _admitting(self, job_id: str, key_id: str):
        """Count a submission against this replica's caps before anything is awaited (checks made
        across an await would let a burst of submissions all pass before any of them counted): in
        `_admitted` until its run ends, and once past the key's cap in `_submitting` until the
        submission ends."""
        if len(self._admitted) >= self.options.max_running_jobs:
            raise Overloaded(f"this replica is running its maximum of {self.options.max_running_jobs} jobs")
        self._admitted.add(job_id)
        try:
            yield
        except BaseException:
            self._release(job_id)
            raise
        finally:
            if (submitting := self._submitting.get(key_id)) is not None:
                submitting.discard(job_id)
                if not submitting:
                    del self._submitting[key_id]

    async def _twin(self, job: JobRecord, idempotency_key: str | None) -> JobRecord:
        """The job a racing submission with the same Idempotency-Key created first (job ids are
        derived from the key, so only twins can collide); 409 if it was made from another body."""
        twin = await self.jobs.get(job.id)
        if twin is not None and twin.status.terminal:  # the marker this submission wrote must not outlive it
            await self.jobs.unmark(twin.key_id, twin.id)
        if twin is None or twin.body_sha256 != job.body_sha256:
            raise IdempotencyConflict(idempotency_key)
        if not twin.status.terminal:  # listed, even if the reaper dropped its marker as stale
            await self.jobs.mark_pending(twin)
        return twin

    @staticmethod
    def _idempotency_key(key_id: str, idempotency_key: str) -> str:
        return f"idempotency/{key_id}/{hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]}.json"

    async def idempotent_job(
        self, key_id: str, idempotency_key: str, body_hash: str
    ) -> tuple[str, JobRecord | None]:
        """The job an Idempotency-Key stands for: its id is derived from (API key, idempotency key),
        so even racing duplicates name one job (one run's outputs, one usage record)."""
        job_id = hashlib.sha256(f"{key_id}:{idempotency_key}".encode()).hexdigest()[:32]
        raw = await self.storage.get(self._idempotency_key(key_id, idempotency_key))
        if raw is None:
            return job_id, None
        record = json.loads(raw)
        if record["body_sha256"] != body_hash:
            raise IdempotencyConflict(idempotency_key)
        return job_id, await self.jobs.get(record["job_id"])

    def start(self, job: JobRecord, fresh: bool = False) -> asyncio.Task:
        """Run a job in the background of this replica (the async API)."""
        self._admitted.add(job.id)  # already, when submitted here; a job the reaper restarts counts now
        task = asyncio.create_task(self._run(job, False, fresh, False))
        self._running[job.id] = task

        def done(_):
            self._running.pop(job.id, None)
            self._admitted.discard(job.id)

        task.add_done_callback(done)
        return task

    # --- running ---

    async def run(
        self, job: JobRecord, return_bytes: bool = False, fresh: bool = False, shed: bool = False
    ) -> FinishResult | None:
        """Run a job to a terminal status (retrying stage failures) and record it. A `fresh` job
        was just created here with its lease: its first attempt skips one write and one read.
        A full stage queue is waited out (an accepted async job is never dropped for load) unless
        `shed`: then the job ends without charge and Overloaded is raised for the waiting caller."""
        self._admitted.add(job.id)
        try:
            return await self._run(job, return_bytes, fresh, shed)
        finally:
            self._admitted.discard(job.id)

    async def _run(self, job: JobRecord, return_bytes: bool, fresh: bool, shed: bool) -> FinishResult | None:
        try:
            return await self._attempts(job, return_bytes, fresh, shed)
        except asyncio.CancelledError:  # a sync caller went away or timed out: end the job, don't leave it
            if not job.status.terminal:  # Pending for the reaper (and the key's in-flight count)
                try:
                    await self._end(job, Status.CANCELLED, "the caller went away")
                except Superseded:
                    await asyncio.shield(self._taken_over(job))
            raise
        except Superseded:  # renewing its lease found the job taken over: the other runner has it
            await self._taken_over(job)
            return None
        finally:
            self._inputs.pop(job.id, None)

    async def discard(self, job: JobRecord) -> None:
        """End a job that was submitted but will not be run (its request failed after submitting it):
        Cancelled, unbilled, and no longer pending for the reaper to pick up."""
        self._admitted.discard(job.id)
        if job.status.terminal:
            return
        self._inputs.pop(job.id, None)
        try:
            await self._end(job, Status.CANCELLED, "not run: the request was refused")
        except Superseded:  # another runner has it
            await self._taken_over(job)

    async def _end(self, job: JobRecord, status: Status | None = None, error: str | None = None) -> None:
        """Record a job's terminal status (shielded: a caller going away now must not undo the
        record), then log, meter and notify. With `status`, the job ends now with it and `error`."""
        if status is not None:
            job.status, job.error, job.finished_at = status, error, time.time()
        await asyncio.shield(self._finish(job))
        self._finished(job)

    async def _finish(self, job: JobRecord) -> None:
        await self.jobs.finish(job)  # Superseded unless this run still owns the job
        if job.status is not Status.READY and job.attempts:  # no charge without an image: a usage record
            await self._unbill(job)  # written just before the end (a caller leaving then) is withdrawn

    async def _attempts(
        self, job: JobRecord, return_bytes: bool, fresh: bool, shed: bool
    ) -> FinishResult | None:
        result, waits, overloaded = None, 0, False
        while True:
            job.attempts += 1
            job.status, job.started_at = Status.PENDING, job.started_at or time.time()
            first = fresh and job.attempts == 1 and waits == 0  # the record was just written with its lease
            if not first:  # renew the lease (also while waiting for room: no reaper may take the job)
                job.lease_until = time.time() + self.options.job_lease_s
                await self.jobs.save(job)
            try:
                with telemetry.span("job", job.trace, job_id=job.id, attempt=job.attempts, model=job.model):
                    pipeline = self._pipeline(job, return_bytes, check_cancel=not first)
                    result = await asyncio.wait_for(pipeline, self._run_time_left(job))
                job.finished_at = time.time()
                await self._record_usage(job)  # no Ready without its usage record
            except JobCancelled:
                job.status, job.error = Status.CANCELLED, "cancelled by the client"
            except RequestModerated:
                job.status, job.error = (
                    Status.REQUEST_MODERATED,
                    "an input image was flagged by the safety filter",
                )
                for key in job.request.input_keys:
                    await self.storage.delete(key)
            except ContentModerated:
                job.status, job.error = (
                    Status.CONTENT_MODERATED,
                    "the generated image was flagged by the safety filter",
                )
            except Exception as e:  # a stage died, timed out or failed, or storage did: retry, then give up
                late = time.time() - job.created_at > self.options.job_deadline_s
                if is_backpressure(e) and not late:
                    if shed:
                        job.status, job.error = Status.ERROR, "the service is overloaded; retry later"
                        overloaded = True
                        break
                    job.attempts -= 1  # not the job's fault: wait for room without using up an attempt
                    waits += 1
                    await asyncio.sleep(min(self.options.retry_backoff_s * 2**waits, 5.0))
                    continue
                log.warning("job %s attempt %d failed: %s: %s", job.id, job.attempts, type(e).__name__, e,
                            extra={"job_id": job.id})  # fmt: skip
                if late:
                    job.status, job.error = (
                        Status.ERROR,
                        f"not finished within {self.options.job_deadline_s:g} s",
                    )
                    break
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
        if job.status is not Status.READY:
            job.finished_at = time.time()
        try:
            await self._end(job)
        except Superseded:  # the record changed while this attempt ran: what is stored stands
            await self._taken_over(job)
        if overloaded:
            raise Overloaded("a stage's queue is full")
        return result if job.status is Status.READY else None

    async def _taken_over(self, job: JobRecord) -> None:
        """This runner's copy of the record is stale (another runner took the job over, or the reaper
        ended it): adopt the stored record, which the caller is then answered from."""
        log.warning("job %s: its record changed under this run (taken over elsewhere); this run stops",
                    job.id, extra={"job_id": job.id})  # fmt: skip
        stored = await self.jobs.get(job.id)
        if stored is not None:
            for name in JobRecord.model_fields:
                setattr(job, name, getattr(stored, name))
            job._etag = stored._etag
            if job.status.terminal and job.status is not Status.READY:
                await self._unbill(job)  # this run may have written one after the job had ended

    @staticmethod
    def _usage_key(job: JobRecord) -> str:
        return usage_key(job.key_id, job.day, job.id)

    async def _unbill(self, job: JobRecord) -> None:
        await self.storage.delete(self._usage_key(job))

    def _run_time_left(self, job: JobRecord) -> float:
        """How long this attempt may run: until shortly before its lease ends, so that its failure is
        handled and the lease renewed before any reaper may take the job (the lease started when the
        record was written, before the inputs were stored, on a first attempt)."""
        margin = min(30.0, self.options.job_lease_s / 10)
        return max(job.lease_until - margin - time.time(), 0.0)

    async def _pipeline(self, job: JobRecord, return_bytes: bool, check_cancel: bool = True) -> FinishResult:
        since = time.time()
        if check_cancel and await self.jobs.cancel_requested(job.id):  # the transformer checks between steps
            raise JobCancelled(job.id)
        r = job.request
        images = self._inputs.get(job.id) or list(await asyncio.gather(*map(self.storage.get, r.input_keys)))
        if any(b is None for b in images):
            raise RuntimeError(f"job {job.id}: an input image is missing from storage")
        moderate_inputs = images and self.safety.classifier is not None and self.safety.check_inputs
        if moderate_inputs and any(await self.codec.moderate.remote(images, r.safety_tolerance)):
            raise RequestModerated(job.id)  # before any generation
        cfg = r.guidance is not None and r.guidance > 1.0
        trace = telemetry.carrier() or None  # the job span's context, for every stage
        refs_shape = tuple(map(tuple, r.ref_shapes))
        params = DenoiseParams(
            job.id, r.width, r.height, r.seed, r.steps, r.guidance if cfg else None, refs_shape, trace, since
        )
        ctx = self.embedder.embed.remote(r.prompt, trace)
        neg = self.embedder.embed.remote("", None) if cfg else None
        refs = self.codec.encode.remote(images, trace) if images else None
        latents = self.transformer.denoise.remote(params, ctx, neg, refs)
        finish = FinishParams(
            job.id, job.output_key, r.output_format, r.prompt, job.model, r.seed, return_bytes, trace,
            r.safety_tolerance, tuple(r.input_keys),
        )  # fmt: skip
        return await self.codec.finish.remote(latents, finish)

    async def _record_usage(self, job: JobRecord) -> None:
        record = UsageRecord(
            job_id=job.id, key_id=job.key_id, model=job.model, day=job.day, input_mp=job.input_mp,
            output_mp=job.output_mp, cost=job.cost, finished_at=job.finished_at or time.time(),
        )  # fmt: skip
        write = asyncio.ensure_future(
            self.storage.put(self._usage_key(job), record.model_dump_json().encode(), "application/json")
        )  # fmt: skip
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])  # the caller left: the write lands, then the job's end withdraws it
            raise

    async def usage(self, key_id: str, start: str, end: str) -> list[UsageRecord]:
        """The key's usage records for jobs submitted on days start..end (inclusive, UTC)."""
        first, last = date.fromisoformat(start), date.fromisoformat(end)
        days = [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
        listed = await asyncio.gather(*(self.storage.list(usage_prefix(key_id, day)) for day in days))
        raws = await asyncio.gather(*(self.storage.get(k) for keys in listed for k in keys))
        return [UsageRecord.model_validate_json(r) for r in raws if r is not None]

    def _finished(self, job: JobRecord) -> None:
        log.info("job %s %s after %d attempts", job.id, job.status.value, job.attempts,
                 extra={"job_id": job.id, "status": job.status.value, "key_id": job.key_id})  # fmt: skip
        seconds = (job.finished_at or time.time()) - job.created_at
        metrics.job_finished(job.model, job.status.value, seconds, job.input_mp, job.output_mp)
        self._notify(job)

    def _notify(self, job: JobRecord) -> None:
        r = job.request
        if not r.webhook_url:
            return
        sample = None
        if job.status is Status.READY and job.result is not None:  # a link the receiver can fetch
            base = r.public_url or self.options.public_url or ""
            sample = self.storage.url(job.result.key, base, self.storage_options.presign_expiry_s)
        payload = {"id": job.id, "status": job.status.value, "result": self.result_payload(job, sample)}
        task = asyncio.create_task(
            deliver(r.webhook_url, payload, r.webhook_secret, self.options.webhook_attempts,
                    allow_private=self.options.webhook_allow_private)
        )  # fmt: skip
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

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
        with contextlib.suppress(StorageError):  # probed early; an S3 server without them is warned of
            await asyncio.to_thread(self.storage.supports_conditional_writes)
        while True:
            await asyncio.sleep(self.options.reaper_interval_s)
            try:
                await self.reap()
            except Exception:
                log.exception("reaper pass failed")

    async def reap(self) -> int:
        """Re-run this model's Pending jobs whose lease expired; returns how many were restarted.
        One job's failure (an unreadable record) is logged and the pass goes on."""
        restarted = 0
        for key_id, job_id in await self.jobs.pending():
            if job_id in self._running:
                continue
            try:
                restarted += await self._reap(key_id, job_id)
            except Exception:
                log.exception("reaper: job %s", job_id, extra={"job_id": job_id})
        return restarted

    async def _reap(self, key_id: str, job_id: str) -> int:
        job = await self.jobs.get(job_id)
        if job is None:  # a submission that failed between its marker and its record, or is between them
            # stale: older than its own write and then the record's can take (its time is taken
            # before its write), and a lease
            marked = await self.jobs.marked_at(key_id, job_id)
            limit = self.options.job_lease_s + 2 * self.storage.longest_op_s
            stale = marked is not None and marked < time.time() - limit
            if stale and await self.jobs.get(job_id) is None:  # read again after judging the marker old
                log.warning(
                    "job %s: pending marker without a record; dropped", job_id, extra={"job_id": job_id}
                )
                await self.jobs.unmark(key_id, job_id)
            return 0
        if job.status.terminal:  # finished, but its pending marker was left behind
            await self.jobs.unmark(key_id, job_id)
            return 0
        if job.model != self.model_id or job.lease_until >= time.time():
            return 0  # leased, or another model's: deployments of several models may share a bucket
        try:  # every write below is over the version judged expired: of racing reapers, one acts
            if job.sync:  # its caller's connection died with its replica: a re-run would bill an unseen image
                await self._end(job, Status.ERROR, "the replica running this request stopped; not run again")
                return 0
            if job.attempts >= self.options.max_attempts:
                await self._end(job, Status.ERROR, f"abandoned after {job.attempts} attempts")
                return 0
            job.lease_until = time.time() + self.options.job_lease_s  # claim it
            await self.jobs.save(job)
        except Superseded:
            return 0  # another reaper, or the job's own runner, wrote it first
        log.warning("job %s: lease expired after attempt %d; running it again", job_id, job.attempts,
                    extra={"job_id": job_id})  # fmt: skip
        self.start(job)
        return 1

    async def check_health(self) -> None:
        """Healthy while the event loop answers. Storage is checked and complained about, not
        failed on: a restart cannot fix an unreachable bucket, and would drop the jobs in flight."""
        self.ensure_reaper()
        try:
            await asyncio.to_thread(self.storage.check)
        except Exception as e:
            log.warning("storage is unreachable: %s", e)
