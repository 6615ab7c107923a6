"""Running jobs: attempts with retries and lease renewal, and ending them (record, meter, announce).

A job ends exactly once in a terminal status. Stage failures are retried (`max_attempts`, backoff
doubling); a full stage queue is waited out without using an attempt (an accepted async job is never
dropped for load) unless the caller sheds load; an attempt ends shortly before the lease does, so
its failure is handled and the lease renewed before any reaper may take the job. A run whose record
changed under it (`Superseded`: taken over elsewhere) stops and adopts the stored record.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from deployments import metrics, telemetry
from deployments.jobs.admission import Admission
from deployments.jobs.errors import Overloaded, is_backpressure
from deployments.jobs.metering import Billing
from deployments.jobs.pipeline import Pipeline
from deployments.jobs.progress import read_step
from deployments.jobs.records import JobRecord, JobResult, Status, preview_prefix
from deployments.jobs.store import JobStore, Superseded
from deployments.jobs.webhooks import Webhooks
from deployments.options import IngressOptions
from deployments.stages.payloads import ContentModerated, FinishResult, JobCancelled, RequestModerated
from deployments.storage import StorageError

log = logging.getLogger(__name__)
CLOCK_SKEW_S = 30.0  # how far apart two replicas' clocks may be (leases and notices compare them)

# How a stage's refusal ends a job (not failures: never retried, never billed)
_ENDINGS = {
    JobCancelled: (Status.CANCELLED, "cancelled by the client"),
    RequestModerated: (Status.REQUEST_MODERATED, "an input image was flagged by the safety filter"),
    ContentModerated: (Status.CONTENT_MODERATED, "the generated image was flagged by the safety filter"),
}


class JobRunner:
    def __init__(
        self,
        *,
        options: IngressOptions,
        store: JobStore,
        pipeline: Pipeline,
        admission: Admission,
        billing: Billing,
        webhooks: Webhooks,
    ):
        self.options, self.store, self.pipeline = options, store, pipeline
        self.admission, self.billing, self.webhooks = admission, billing, webhooks
        self.running: dict[str, asyncio.Task] = {}  # background runs (the async API and the reaper's)
        self.inputs: dict[str, list[bytes]] = {}  # input files of jobs submitted here: no read-back
        admission.running = self.running.__contains__

    def start(self, job: JobRecord, fresh: bool = False) -> asyncio.Task:
        """Run a job in the background of this replica (the async API, and the reaper's restarts)."""
        self.admission.hold(job.id)
        task = asyncio.create_task(self._run(job, False, fresh, False))
        self.running[job.id] = task

        def done(_):
            self.running.pop(job.id, None)
            self.admission.drop(job.id)

        task.add_done_callback(done)
        return task

    async def run(
        self, job: JobRecord, return_bytes: bool = False, fresh: bool = False, shed: bool = False
    ) -> FinishResult | None:
        """Run a job to a terminal status and record it (a sync caller waits on this). A `fresh` job
        was just created here with its lease: its first attempt skips one write and one read. With
        `shed`, a full stage queue ends the job unbilled and raises Overloaded for the caller."""
        self.admission.hold(job.id)
        try:
            return await self._run(job, return_bytes, fresh, shed)
        finally:
            self.admission.drop(job.id)

    async def _run(self, job: JobRecord, return_bytes: bool, fresh: bool, shed: bool) -> FinishResult | None:
        try:
            return await self._attempts(job, return_bytes, fresh, shed)
        except asyncio.CancelledError:  # a sync caller went away or timed out: end the job, don't leave it
            if not job.status.terminal:
                try:
                    await self.end(job, Status.CANCELLED, "the caller went away")
                except Superseded:
                    await asyncio.shield(self._taken_over(job))
            raise
        except Superseded:  # renewing its lease found the job taken over: the other runner has it
            await self._taken_over(job)
            return None
        finally:
            self.inputs.pop(job.id, None)

    async def discard(self, job: JobRecord) -> None:
        """End a job that was submitted but will not be run (its request failed after submitting it):
        Cancelled, unbilled, and no longer pending for the reaper to pick up."""
        self.admission.drop(job.id)
        if job.status.terminal:
            return
        self.inputs.pop(job.id, None)
        try:
            await self.end(job, Status.CANCELLED, "not run: the request was refused")
        except Superseded:  # another runner has it
            await self._taken_over(job)

    async def end(self, job: JobRecord, status: Status | None = None, error: str | None = None) -> None:
        """Record a job's terminal status (shielded: a caller going away now must not undo the
        record), then log, meter and announce it. With `status`, the job ends now with it."""
        if status is not None:
            job.status, job.error, job.finished_at = status, error, time.time()
        write = asyncio.ensure_future(self._write_end(job))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:  # the caller went away meanwhile: the end lands all the same,
            await asyncio.wait([write])  # and is announced, before the caller is told it was cancelled
            if not write.cancelled() and write.exception() is None:
                self._announce(job)
            raise
        self._announce(job)

    async def _write_end(self, job: JobRecord) -> None:
        """Superseded unless this run still owns the job. No charge without an image: a usage record
        written before a non-Ready end (a caller leaving, a run the reaper ended) is withdrawn while
        the job is still listed, so a failed withdrawal is retried by the reaper."""
        settle = None if job.status is Status.READY else functools.partial(self.billing.withdraw, job)
        await self.store.finish(job, settle)

    def _announce(self, job: JobRecord) -> None:
        extra = {"klein_job_id": job.id, "status": job.status.value, "key_id": job.key_id}
        log.info("job %s %s after %d attempts", job.id, job.status.value, job.attempts, extra=extra)
        seconds = (job.finished_at or time.time()) - job.created_at
        metrics.job_finished(job.model, job.status.value, seconds, job.input_mp, job.output_mp)
        self.webhooks.announce(job, self.options.public_url)

    async def _attempts(
        self, job: JobRecord, return_bytes: bool, fresh: bool, shed: bool
    ) -> FinishResult | None:
        result, waits, overloaded = None, 0, False
        if not fresh:  # a run before this one (a first attempt does not rewrite the record) may have
            job.attempts = max(job.attempts, await self._reported_attempt(job))  # got further
        while True:
            job.attempts += 1
            job.status, job.started_at = Status.PENDING, job.started_at or time.time()
            first = fresh and job.attempts == 1 and waits == 0  # the record was just written with its lease
            if not first:  # renew the lease (also while waiting for room: no reaper may take the job)
                job.lease_until = time.time() + self.options.job_lease_s
                await self.store.save(job)
            try:
                result = await self._attempt(job, return_bytes, check_cancel=not first)
            except tuple(_ENDINGS) as e:  # by isinstance: through Ray, a RayTaskError(...) subclass arrives
                job.status, job.error = next(end for kind, end in _ENDINGS.items() if isinstance(e, kind))
                if isinstance(e, RequestModerated):
                    await self._drop(job, "inputs", job.request.input_files)
                if isinstance(e, ContentModerated):  # its previews showed what the image was to be
                    await self._drop(job, "previews")
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
                if await self._retry(job, e, late):
                    continue
            else:
                job.status = Status.READY
                job.result = JobResult.of(result)
            break
        if job.status is not Status.READY:
            job.finished_at = time.time()
        try:
            await self.end(job)
        except Superseded:  # the record changed while this attempt ran: what is stored stands
            await self._taken_over(job)
        if overloaded:
            raise Overloaded("a stage's queue is full")
        return result if job.status is Status.READY else None

    async def _attempt(self, job: JobRecord, return_bytes: bool, check_cancel: bool) -> FinishResult:
        """One run of the stage chain, within the time the lease leaves; its usage record is written
        before the job may turn Ready. A write that may land after the lease (when another replica
        may have ended and settled the job) is announced first, with the time by which it has
        landed: whatever becomes of this runner, the reaper withdraws it then unless the job is
        Ready."""
        with telemetry.span("job", job.trace, job_id=job.id, attempt=job.attempts, model=job.model):
            run = self.pipeline(job, self.inputs.get(job.id), return_bytes, check_cancel)
            result = await asyncio.wait_for(run, self._run_time_left(job))
        job.finished_at = time.time()
        op = self.store.storage.longest_op_s  # the most one write can take, retries included
        if time.time() + op + CLOCK_SKEW_S >= job.lease_until:  # another replica may end the job meanwhile
            await self.store.announce_late_charge(job, until=time.time() + 2 * op + CLOCK_SKEW_S)
        await self.billing.record(job)
        return result

    async def _reported_attempt(self, job: JobRecord) -> int:
        """The attempt the job's last progress report names (0: none, or unreadable)."""
        try:
            step = await read_step(self.store.storage, job.id)
        except Exception:
            return 0
        return step.attempt if step is not None else 0

    async def _drop(self, job: JobRecord, what: str, keys: list[str] | None = None) -> None:
        """Delete a moderated job's objects: `keys`, or (None) its previews. A failure is logged:
        the job's end stands."""
        storage = self.pipeline.storage
        try:
            keys = await storage.list(preview_prefix(job.id)) if keys is None else keys
            await asyncio.gather(*map(storage.delete, keys))
        except Exception as e:
            log.warning("job %s: its %s were not deleted (%s: %s)", job.id, what, type(e).__name__, e)

    async def _retry(self, job: JobRecord, error: Exception, late: bool) -> bool:
        """After a failed attempt: True to try again (after a backoff), else the job's end is set."""
        what = f"{type(error).__name__}: {error}"
        log.warning(
            "job %s attempt %d failed: %s", job.id, job.attempts, what, extra={"klein_job_id": job.id}
        )
        if late:
            job.status, job.error = Status.ERROR, f"not finished within {self.options.job_deadline_s:g} s"
            return False
        if job.attempts < self.options.max_attempts and not await self._cancel_requested(job):
            await asyncio.sleep(self.options.retry_backoff_s * 2 ** (job.attempts - 1))
            return True
        job.status, job.error = Status.ERROR, f"generation failed after {job.attempts} attempts"
        return False

    async def _cancel_requested(self, job: JobRecord) -> bool:
        """Whether a cancel was asked for; unknown (storage failing) counts as no: the next attempt
        checks again, and the stages check between steps."""
        try:
            return await self.store.cancel_requested(job.id)
        except StorageError as e:
            log.warning("job %s: its cancel flag is unreadable (%s); trying again", job.id, e)
            return False

    async def _taken_over(self, job: JobRecord) -> None:
        """This runner's copy of the record is stale (another runner took the job over, or the reaper
        ended it): adopt the stored record, which the caller is then answered from."""
        why = "its record changed under this run (taken over elsewhere); this run stops"
        log.warning("job %s: %s", job.id, why, extra={"klein_job_id": job.id})
        stored = await self.store.get(job.id)
        if stored is not None:
            job.adopt(stored)
            if job.status.terminal and job.status is not Status.READY:
                # this run may have written a usage record after the job had ended
                await self.store.settle_ended(job, functools.partial(self.billing.withdraw, job))

    def _run_time_left(self, job: JobRecord) -> float:
        """Until shortly before the lease ends (the lease started when the record was written)."""
        margin = min(30.0, self.options.job_lease_s / 10)
        return max(job.lease_until - margin - time.time(), 0.0)
