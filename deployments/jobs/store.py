"""The job store: records with compare-and-swap writes, pending markers, cancel flags."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from deployments.jobs.records import (
    LATE,
    PENDING,
    JobRecord,
    cancel_key,
    job_key,
    late_charge_key,
    marker_key,
    marker_prefix,
)
from deployments.storage import PreconditionFailed, Storage, StorageError, StorageOptions, open_storage

log = logging.getLogger(__name__)
Settle = Callable[[], Awaitable[None]]


class Superseded(Exception):
    """A job record was not the version this copy of it came from: another runner has taken the job
    over (or, for a record being created, one with its id exists). This copy must not be written."""


class JobStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    async def create(self, job: JobRecord) -> None:
        """The pending marker, then the record: a failure between the two leaves a
        marker without a record (dropped by the reaper once no write of the record can still be under
        way), never a record the reaper cannot see."""
        await self.mark_pending(job)
        await self.save(job)

    async def mark_pending(self, job: JobRecord) -> None:
        """List the job for the reaper (and in its key's count of jobs in flight)."""
        marker = json.dumps({"marked_at": time.time()}).encode()
        await self.storage.put(marker_key(job.key_id, job.id), marker, "application/json")

    async def marked_at(self, key_id: str, job_id: str) -> float | None:
        """When a job's pending marker was written; None without one, 0 if it does not say."""
        raw = await self.storage.get(marker_key(key_id, job_id))
        if raw is None:
            return None
        try:
            return float(json.loads(raw)["marked_at"])
        except (ValueError, KeyError, TypeError):
            return 0.0

    async def announce_late_charge(self, job: JobRecord, until: float) -> None:
        """Before a usage write that may land after the job's lease (when another replica may have
        ended the job and settled it already): a notice, apart from the pending marker (which
        whoever ends the job drops), that the reaper acts on once `until` has passed."""
        await self.storage.put(late_charge_key(job.key_id, job.id, until), b"", "text/plain")

    async def late_charges(self) -> list[tuple[str, str, float, str]]:
        """(key_id, job_id, until, notice key) of every late-charge notice."""
        out = []
        for key in await self.storage.list(LATE):
            parts = key.split("/")
            if len(parts) == 4 and parts[3].isascii() and parts[3].isdigit():  # (not a foreign key)
                out.append((parts[1], parts[2], float(parts[3]), key))
        return out

    async def unmark(self, key_id: str, job_id: str) -> None:
        await self.storage.delete(marker_key(key_id, job_id))

    async def save(self, job: JobRecord) -> None:
        """Write the record over the version `job` was read or last written as; a record never stored
        is created, only if none with its id exists. Else Superseded, and nothing is written."""
        job.updated_at = time.time()
        data = job.model_dump_json().encode()
        try:
            job._etag = await self.storage.put(
                job_key(job.id), data, "application/json", if_match=job._etag, if_none_match=job._etag is None
            )
        except PreconditionFailed:
            raise Superseded(job.id) from None

    async def get(self, job_id: str, retry_s: float | None = None) -> JobRecord | None:
        if not (job_id.isascii() and job_id.isalnum()) or len(job_id) > 64:  # ids are ASCII hex
            return None
        for attempt in range(6):
            found = await self.storage.get_versioned(job_key(job_id), retry_s=retry_s)
            if found is None:
                return None
            try:
                job = JobRecord.model_validate_json(found[0])
                job._etag = found[1]
                return job
            except ValueError:  # a non-atomic S3-compatible server served a half-written object
                if attempt == 5:
                    raise StorageError(f"job record {job_id} is unreadable") from None
                await asyncio.sleep(0.05 * 2**attempt)

    async def finish(self, job: JobRecord, settle: Settle | None = None) -> None:
        """Save a terminal record, then `settle` what its end undoes (the runner withdraws an unbilled
        job's usage record), then drop the pending marker. In this order a job is never lost, and
        one whose settling failed stays listed: the reaper settles it again (Reaper.reap_one)."""
        assert job.status.terminal
        await self.save(job)
        await self._settle_and_unmark(job, settle)

    async def settle_ended(self, job: JobRecord, settle: Settle) -> None:
        """Settle a job that ended elsewhere (its record is not this copy's to write), listed again
        meanwhile, so that a failure leaves it to the reaper as `finish` does."""
        assert job.status.terminal
        await self.mark_pending(job)
        await self._settle_and_unmark(job, settle)

    async def _settle_and_unmark(self, job: JobRecord, settle: Settle | None) -> None:
        if settle is not None:
            try:
                await settle()
            except StorageError as e:  # the end stands; the job stays listed until it is settled
                log.warning("job %s ended %s but is not settled yet (%s); the reaper will retry",
                            job.id, job.status.value, e, extra={"klein_job_id": job.id})  # fmt: skip
                return
        try:
            await self.unmark(job.key_id, job.id)
        except StorageError as e:  # the end stands; the reaper drops a terminal job's marker
            log.warning("job %s ended %s; its pending marker stays for the reaper (%s)",
                        job.id, job.status.value, e, extra={"klein_job_id": job.id})  # fmt: skip

    async def pending(self) -> list[tuple[str, str]]:
        """(key_id, job_id) of every job not yet terminal."""
        return [tuple(k.split("/")[1:3]) for k in await self.storage.list(PENDING) if k.count("/") == 2]

    async def in_flight_ids(self, key_id: str) -> set[str]:
        """Ids of the key's jobs not yet terminal."""
        return {key.rsplit("/", 1)[1] for key in await self.storage.list(marker_prefix(key_id))}

    async def in_flight(self, key_id: str) -> int:
        return len(await self.in_flight_ids(key_id))

    async def request_cancel(self, job_id: str, retry_s: float | None = None) -> None:
        await self.storage.put(cancel_key(job_id), b"", "text/plain", retry_s=retry_s)

    async def cancel_requested(self, job_id: str) -> bool:
        return await self.storage.get(cancel_key(job_id)) is not None


class CancelFlags:
    """The FlowTransformer's cancel check (stages.payloads.CancelCheck) over the job store: picklable
    (its storage options travel; the replica that unpickles it opens storage there, at start-up)."""

    def __init__(self, storage: StorageOptions):
        self.options = storage
        self._jobs = JobStore(open_storage(storage))

    def __getstate__(self):
        return {"options": self.options}

    def __setstate__(self, state):
        self.__init__(state["options"])

    async def __call__(self, job_ids: list[str]) -> set[str]:
        flags = await asyncio.gather(*(self._jobs.cancel_requested(j) for j in job_ids))
        return {j for j, flag in zip(job_ids, flags, strict=True) if flag}
