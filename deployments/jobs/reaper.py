"""The reaper: jobs never vanish. Every ingress replica looks, every `reaper_interval_s`, for this
model's Pending jobs whose lease expired (their ingress died) and runs them again with the same
output keys; of racing reapers one takes a job (its claim is a compare-and-swap on the record). A
listed job that has ended gets its end settled (an unbilled job's usage withdrawn) and is unlisted,
and a usage write announced as late is withdrawn once it has landed unless its job is Ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from deployments.jobs.records import JobRecord, Status, usage_key
from deployments.jobs.runner import JobRunner
from deployments.jobs.store import JobStore, Superseded
from deployments.options import IngressOptions
from deployments.storage import StorageError

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, *, store: JobStore, runner: JobRunner, options: IngressOptions, model_id: str):
        self.store, self.runner, self.options, self.model_id = store, runner, options, model_id
        self._task: asyncio.Task | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._forever())

    async def _forever(self) -> None:
        with contextlib.suppress(StorageError):  # probed early: a server without them is warned of
            await asyncio.to_thread(self.store.storage.supports_conditional_writes)
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
        for key_id, job_id in await self.store.pending():
            if job_id in self.runner.running:
                continue
            try:
                restarted += await self.reap_one(key_id, job_id)
            except Exception:
                log.exception("reaper: job %s", job_id, extra={"klein_job_id": job_id})
        await self._settle_late_charges()
        return restarted

    async def _settle_late_charges(self) -> None:
        """Every late-charge notice whose write can no longer land (see `_settle_late_charge`)."""
        for _, job_id, until, notice in await self.store.late_charges():
            if until > time.time():
                continue  # the write may still land
            try:
                await self._settle_late_charge(job_id, until, notice)
            except Exception:
                log.exception("reaper: late charge of job %s", job_id, extra={"klein_job_id": job_id})
                if time.time() - until > self.options.job_lease_s:  # (a record that stays unreadable)
                    log.error("reaper: gave up on the late charge of job %s; %s dropped", job_id, notice,
                              extra={"klein_job_id": job_id})  # fmt: skip
                    await self.store.storage.delete(notice)

    async def _settle_late_charge(self, job_id: str, until: float, notice: str) -> None:
        """A usage write announced as possibly late has landed (or never will) by now: withdrawn
        unless the job is Ready. A job still running settles its own end; a failed withdrawal keeps
        the notice for the next pass (see `_withdraw`)."""
        job = await self.store.get(job_id)
        if job is not None and job.status.terminal and job.status is not Status.READY:
            await self._withdraw(job, since=until)
        await self.store.storage.delete(notice)

    async def reap_one(self, key_id: str, job_id: str) -> int:
        job = await self.store.get(job_id)
        if job is None:
            await self._drop_stale_marker(key_id, job_id)
            return 0
        if job.status.terminal:  # finished, but its marker was left behind, or its end not settled
            if job.status is not Status.READY:
                await self._withdraw(job)  # its usage record, if one is left: not billed
            await self.store.unmark(key_id, job_id)
            return 0
        if job.model != self.model_id or job.lease_until >= time.time():
            return 0  # leased, or another model's: deployments of several models may share a bucket
        try:  # every write below is over the version judged expired: of racing reapers, one acts
            if job.sync:  # its caller's connection died with its replica: a re-run would bill an unseen image
                await self.runner.end(
                    job, Status.ERROR, "the replica running this request stopped; not run again"
                )
                return 0
            if job.attempts >= self.options.max_attempts:
                await self.runner.end(job, Status.ERROR, f"abandoned after {job.attempts} attempts")
                return 0
            job.lease_until = time.time() + self.options.job_lease_s  # claim it
            await self.store.save(job)
        except Superseded:
            return 0  # another reaper, or the job's own runner, wrote it first
        why = f"lease expired after attempt {job.attempts}; running it again"
        log.warning("job %s: %s", job_id, why, extra={"klein_job_id": job_id})
        self.runner.start(job)
        return 1

    async def _withdraw(self, job: JobRecord, since: float = 0.0) -> None:
        """Withdraw an ended job's usage record; a failure is retried on later passes (the job stays
        listed, counted among its key's jobs in flight) until the job has been over (and the record
        could land: `since`) for a lease, then the job is unlisted with an error in the log: its
        charge stays until someone deletes it."""
        try:
            await self.runner.billing.withdraw(job)
        except StorageError:
            over_s = time.time() - max(job.finished_at or job.updated_at, since)
            if over_s < self.options.job_lease_s:
                raise
            log.error("job %s ended %s %.0f s ago and its usage record cannot be withdrawn; given up, "
                      "still billed until %s is deleted", job.id, job.status.value, over_s,
                      usage_key(job.key_id, job.day, job.id), extra={"klein_job_id": job.id}, exc_info=True)  # fmt: skip

    async def _drop_stale_marker(self, key_id: str, job_id: str) -> None:
        """A marker without a record: a submission that failed between the two, or is between them.
        Stale once older than its own write and then the record's can take (its time is taken before
        its write), and a lease; the record is read again after judging the marker old."""
        marked = await self.store.marked_at(key_id, job_id)
        limit = self.options.job_lease_s + 2 * self.store.storage.longest_op_s
        if marked is not None and marked < time.time() - limit and await self.store.get(job_id) is None:
            log.warning(
                "job %s: pending marker without a record; dropped", job_id, extra={"klein_job_id": job_id}
            )
            await self.store.unmark(key_id, job_id)
