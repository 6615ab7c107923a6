"""The job service: what the HTTP edge calls to create, run, read and cancel jobs.

A router turns its protocol's request into a `Submission` (no HTTP types); `JobService.submit`
validates it against the model, admits it under the caps, stores its inputs, its pending marker and
its record, and with `start` runs it here in the background at once (the async API: a caller
leaving before the answer does not leave the job to the reaper).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date

from PIL import Image

from deployments.jobs.admission import Admission
from deployments.jobs.errors import FieldError
from deployments.jobs.idempotency import IdempotencyClaim, IdempotencyIndex
from deployments.jobs.metering import Billing, Price, UsageRecord, cost, megapixels
from deployments.jobs.pipeline import Pipeline, StageHandles
from deployments.jobs.progress import EventFeed, Step, read_step
from deployments.jobs.reaper import Reaper
from deployments.jobs.records import (
    ANONYMOUS,
    JobRecord,
    JobRequest,
    Status,
    input_key,
    new_job_id,
    preview_steps,
)
from deployments.jobs.runner import JobRunner
from deployments.jobs.store import JobStore, Superseded
from deployments.jobs.webhooks import Webhooks
from deployments.netguard import TargetRefused, resolve
from deployments.options import IngressOptions
from deployments.stages.adapters import AdapterError, Adapters
from deployments.stages.payloads import FinishResult, tokens
from deployments.storage import Storage
from klein.config import ModelSpec
from klein.lora import LoraError
from klein.request import (
    MAX_LORAS,
    GenerationRequest,
    InvalidRequest,
    LoraRequest,
    reference_size,
    source_size,
    validate,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputImage:
    field: str  # the request field it came in (errors name it)
    data: bytes  # the file as sent
    image: Image.Image  # opened lazily: the header, for validation


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: str | None = None
    public_url: str | None = None  # the base URL the client reached us at: the result link it gets


@dataclass(frozen=True, kw_only=True)
class Submission:
    """One job to create, as a protocol's router understood the request."""

    prompt: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None  # None: drawn at random
    steps: int | None = None
    guidance: float | None = None
    images: tuple[InputImage, ...] = ()
    loras: tuple[LoraRequest, ...] = ()
    output_format: str = "jpeg"
    safety_tolerance: int = 2
    key_id: str = ANONYMOUS
    webhook: Webhook | None = None
    idempotency: IdempotencyClaim | None = None
    trace: dict[str, str] | None = None
    sync: bool = False  # its caller waits on its connection: the reaper ends it rather than re-run it
    shared_inputs: tuple[str, ...] = ()  # storage keys of these images, stored by a sibling (OpenAI n > 1)
    previews: int = 0  # previews of the image in progress the client will watch (evenly spread steps)
    mask: InputImage | None = None  # inpainting: white repaints images[0] (the rest are references)
    strength: float | None = None  # with a mask: how much of the schedule runs (default 0.8)
    field_names: Mapping[str, str] = field(default_factory=dict)  # klein's field -> the protocol's


class JobService:
    def __init__(
        self,
        *,
        spec: ModelSpec,
        model_id: str,
        options: IngressOptions,
        storage: Storage,
        presign_expiry_s: int,
        price: Price,
        stages: StageHandles,
        prompt_filter,
        moderate_inputs: bool,
        max_request_tokens: int | None = None,
        adapters: Adapters | None = None,
    ):
        """`adapters`: where requests' LoRA adapters come from; None: this deployment serves none."""
        self.spec, self.model_id, self.options, self.price = spec, model_id, options, price
        self.storage, self.presign_expiry_s = storage, presign_expiry_s
        self.prompt_filter, self.max_request_tokens = prompt_filter, max_request_tokens
        self.stages, self.adapters = stages, adapters
        self.store = JobStore(storage)
        self.admission = Admission(
            self.store,
            max_running_jobs=options.max_running_jobs,
            max_jobs_in_flight=options.max_jobs_in_flight,
        )
        self.idempotency = IdempotencyIndex(storage, self.store)
        self.billing = Billing(storage)
        self.runner = JobRunner(
            options=options,
            store=self.store,
            pipeline=Pipeline(
                stages=stages, store=self.store, storage=storage, moderate_inputs=moderate_inputs
            ),
            admission=self.admission,
            billing=self.billing,
            webhooks=Webhooks(options.webhook_attempts, options.webhook_allow_private, self.link),
        )
        self.reaper = Reaper(store=self.store, runner=self.runner, options=options, model_id=model_id)

    def link(self, key: str, base_url: str) -> str:
        """A URL a client can fetch a stored object at, valid for presign_expiry_s."""
        return self.storage.url(key, base_url, self.presign_expiry_s)

    # --- submission ---

    async def submit(self, s: Submission, *, start: bool = False) -> tuple[JobRecord, bool]:
        """Create the job; returns (job, replayed): replayed when an Idempotency-Key named an
        existing one."""
        job_id = new_job_id()
        if s.idempotency is not None:
            job_id = self.idempotency.job_id(s.key_id, s.idempotency)
            if (existing := await self.idempotency.lookup(s.key_id, s.idempotency)) is not None:
                return existing, True
        with self.admission.admitting(job_id, s.key_id):
            await self.admission.check_key_cap(s.key_id, job_id)
            await self._check_webhook(s.webhook)
            job = self._new_record(job_id, s)
            await self._check_adapters(job)
            if (term := self.prompt_filter.match(job.request.prompt)) is not None:
                return await self._moderated(job, term, s)
            shared = await self._store_inputs(job, s)
            return await self._create(job, s, shared, start)

    async def replay(self, key_id: str, claim: IdempotencyClaim) -> JobRecord | None:
        """The job an Idempotency-Key already made for this key (IdempotencyConflict for another
        body), or None."""
        return await self.idempotency.lookup(key_id, claim)

    async def _check_webhook(self, webhook: Webhook | None) -> None:
        if webhook is None or self.options.webhook_allow_private:
            return
        try:
            await asyncio.to_thread(resolve, webhook.url)  # DNS off the event loop
        except TargetRefused as e:  # private, or a host that does not resolve: says which
            if e.transient:  # DNS did not answer now: delivery checks again (and retries) at the end
                log.warning("webhook_url %s not checked at submission: %s", webhook.url, e)
                return
            raise FieldError("webhook_url", str(e)) from None

    def _new_record(self, job_id: str, s: Submission) -> JobRecord:
        """Validated against the model (FieldError naming the protocol's field), priced, leased."""
        seed = secrets.randbelow(2**32) if s.seed is None else s.seed
        images = tuple(im.image for im in s.images)
        mask = s.mask.image if s.mask is not None else None
        request = GenerationRequest(
            s.prompt, s.width, s.height, seed, s.steps, s.guidance, images, s.loras, mask, s.strength
        )
        try:
            max_loras = self.adapters.settings.max_loras if self.adapters else MAX_LORAS
            req = validate(self.spec, request, max_loras)
        except InvalidRequest as e:
            reference = e.index is not None and e.field.startswith("references")
            name = s.images[e.index].field if reference else e.field
            raise FieldError(s.field_names.get(name, name), e.message) from None
        m = self.spec.multiple
        sizes = [reference_size(*im.size, self.spec.reference_max_pixels, m) for im in images]
        if mask is not None:  # the source is resized to its own size, not cropped
            sizes[0] = source_size(*images[0].size, m)
        ref_shapes = [(h // m, w // m) for w, h in sizes]
        n = tokens(req.width, req.height, ref_shapes)
        if self.max_request_tokens is not None and n > self.max_request_tokens:  # never batchable
            where = "references" if images else "width"
            raise FieldError(
                s.field_names.get(where, where),
                f"the image and its references come to {n} tokens (one per 16x16 pixels), "
                f"over this deployment's limit of {self.max_request_tokens}",
            )
        webhook = s.webhook or Webhook("")
        job = JobRecord(
            id=job_id,
            model=self.model_id,
            key_id=s.key_id,
            request=JobRequest(
                prompt=req.prompt,
                width=req.width,
                height=req.height,
                seed=req.seed,
                steps=req.steps,
                guidance=req.guidance if self.spec.sampling.cfg else None,
                safety_tolerance=s.safety_tolerance,
                output_format=s.output_format,
                webhook_url=webhook.url or None,
                public_url=webhook.public_url if webhook.url else None,
                webhook_secret=webhook.secret,
                ref_shapes=ref_shapes,
                loras=[{"path": lora.path, "scale": lora.scale} for lora in req.loras],
                previews=preview_steps(req.run_steps, s.previews),
                strength=req.strength,
            ),
            input_mp=megapixels(sum(w * h for w, h in sizes)),
            output_mp=megapixels(req.width * req.height),
            lease_until=time.time() + self.options.job_lease_s,
            trace=s.trace,
            sync=s.sync,
            body_sha256=s.idempotency.body_sha256 if s.idempotency else None,
        )
        job.cost = cost(self.price, job.output_mp, job.input_mp, len(req.loras))
        return job

    async def _check_adapters(self, job: JobRecord) -> None:
        """Each adapter found, read and fitted to the model before any GPU work (422 naming it);
        the record keeps the versioned key the transformer loads."""
        loras = job.request.loras
        if loras and self.adapters is None:
            raise FieldError("loras", "this deployment serves no LoRA adapters")
        for i, lora in enumerate(loras):
            try:
                lora["key"] = await self.adapters.resolve(lora["path"])
                await self.adapters.load(lora["key"])
            except (AdapterError, LoraError) as e:
                raise FieldError(f"loras[{i}].path", str(e)) from None

    async def _moderated(self, job: JobRecord, term: str, s: Submission) -> tuple[JobRecord, bool]:
        """A blocked prompt: the job is recorded Request Moderated, never run, never billed."""
        log.info("job %s: prompt blocked by term %r", job.id, term, extra={"klein_job_id": job.id})
        try:
            await self.runner.end(job, Status.REQUEST_MODERATED, "the prompt contains a blocked term")
        except Superseded:  # a racing submission with the same Idempotency-Key was first
            return await self.idempotency.twin(job, s.idempotency), True
        finally:
            self.admission.release(job.id)
        return job, False

    async def _store_inputs(self, job: JobRecord, s: Submission) -> bool:
        """The input files under the job (kept so it can be run again); True when a sibling job of
        the same request stored them already."""
        n = len(s.images)
        if s.shared_inputs and len(s.shared_inputs) == n + (s.mask is not None):
            job.request.input_keys = list(s.shared_inputs[:n])
            job.request.mask_key = s.shared_inputs[n] if s.mask is not None else None
            return True
        nonce = secrets.token_hex(4)  # a racing twin's inputs (same job id) never overwrite these
        for k, im in enumerate(s.images):
            key = input_key(job.id, nonce, k)
            await self.storage.put(key, im.data)
            job.request.input_keys.append(key)
        if s.mask is not None:
            job.request.mask_key = input_key(job.id, nonce, n)
            await self.storage.put(job.request.mask_key, s.mask.data)
        return False

    async def _create(
        self, job: JobRecord, s: Submission, shared: bool, start: bool
    ) -> tuple[JobRecord, bool]:
        files = [im.data for im in s.images] + ([s.mask.data] if s.mask is not None else [])  # mask last
        creating = asyncio.ensure_future(self._store_and_start(job, files, start))
        creating.add_done_callback(_log_failure)
        try:  # shielded: a caller leaving now must not part the record from its marker, or its start
            await asyncio.shield(creating)
        except Superseded:  # a racing submission with the same Idempotency-Key was first
            self.admission.release(job.id)
            if not shared:
                await asyncio.gather(*map(self.storage.delete, job.request.input_files))
            return await self.idempotency.twin(job, s.idempotency), True
        if files and not start:  # kept for the run the caller makes next: no read-back
            self.runner.inputs[job.id] = files
        if s.idempotency is not None:
            await self.idempotency.record(job, s.idempotency)
        self.reaper.ensure_running()
        return job, False

    async def _store_and_start(self, job: JobRecord, files: list[bytes], start: bool) -> None:
        """The pending marker and the record; with `start`, the job runs here at once."""
        await self.store.create(job)
        if start:
            if files:
                self.runner.inputs[job.id] = files
            self.runner.start(job, fresh=True)

    # --- the rest of a job's life ---

    async def run(
        self, job: JobRecord, return_bytes: bool = False, fresh: bool = False, shed: bool = False
    ) -> FinishResult | None:
        return await self.runner.run(job, return_bytes, fresh, shed)

    async def discard(self, job: JobRecord) -> None:
        await self.runner.discard(job)

    async def get(self, job_id: str, key_id: str) -> JobRecord | None:
        """The caller's job; None for one that does not exist or belongs to another key."""
        job = await self.store.get(job_id, retry_s=self.options.request_storage_retry_s)
        return job if job is not None and job.key_id == key_id else None

    async def cancel(self, job_id: str) -> None:
        await self.store.request_cancel(job_id, retry_s=self.options.request_storage_retry_s)

    async def step(self, job: JobRecord) -> Step | None:
        """The running attempt's last reported denoising step (None before the first). A poll's
        read: it waits out storage for `request_storage_retry_s`, as reading the record does."""
        if job.status.terminal:
            return None
        return await read_step(self.storage, job.id, retry_s=self.options.request_storage_retry_s)

    def running_here(self, job_id: str) -> asyncio.Task | None:
        """The job's run, when this replica runs it (a stream can wake when it ends)."""
        return self.runner.running.get(job_id)

    def feed(self, job: JobRecord, **kw) -> EventFeed:
        """The job's events (jobs.progress.EventFeed: `after`, `describe`, `reread`)."""
        return EventFeed(self.store, job, **kw)

    async def usage(self, key_id: str, first: date, last: date) -> list[UsageRecord]:
        return await self.billing.usage(key_id, first, last)


def _log_failure(task: asyncio.Task) -> None:
    """A background task's failure, logged even when nobody awaits it any more (its caller left)."""
    if not task.cancelled() and (e := task.exception()) is not None and not isinstance(e, Superseded):
        log.error("%s failed: %s: %s", task.get_coro().__qualname__, type(e).__name__, e)
