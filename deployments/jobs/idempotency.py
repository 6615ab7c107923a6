"""Idempotency-Key: the same key and body give the same job, once.

A job's id is derived from (API key, Idempotency-Key), so even racing duplicates name one job (one
run's outputs, one usage record); a record in storage says which body it was made from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from deployments.jobs.errors import IdempotencyConflict
from deployments.jobs.records import JobRecord, idempotency_key
from deployments.jobs.store import JobStore
from deployments.storage import Storage


@dataclass(frozen=True)
class IdempotencyClaim:
    token: str  # the Idempotency-Key header
    body_sha256: str  # of the request it came with


class IdempotencyIndex:
    def __init__(self, storage: Storage, store: JobStore):
        self.storage, self.store = storage, store

    @staticmethod
    def job_id(key_id: str, claim: IdempotencyClaim) -> str:
        return hashlib.sha256(f"{key_id}:{claim.token}".encode()).hexdigest()[:32]

    async def lookup(self, key_id: str, claim: IdempotencyClaim) -> JobRecord | None:
        """The job the key already stands for; IdempotencyConflict if it came with another body."""
        raw = await self.storage.get(idempotency_key(key_id, claim.token))
        if raw is None:
            return None
        record = json.loads(raw)
        if record["body_sha256"] != claim.body_sha256:
            raise IdempotencyConflict(claim.token)
        return await self.store.get(record["job_id"])

    async def record(self, job: JobRecord, claim: IdempotencyClaim) -> None:
        record = {"job_id": job.id, "body_sha256": claim.body_sha256, "created_at": job.created_at}
        await self.storage.put(idempotency_key(job.key_id, claim.token), json.dumps(record).encode())

    async def twin(self, job: JobRecord, claim: IdempotencyClaim | None) -> JobRecord:
        """The job a racing submission with the same key created first (only twins can collide on
        a derived id); IdempotencyConflict if it was made from another body."""
        twin = await self.store.get(job.id)
        if twin is not None and twin.status.terminal:  # the marker this submission wrote must not outlive it
            await self.store.unmark(twin.key_id, twin.id)
        if twin is None or twin.body_sha256 != job.body_sha256:
            raise IdempotencyConflict(claim.token if claim else None)
        if not twin.status.terminal:  # listed, even if the reaper dropped its marker as stale
            await self.store.mark_pending(twin)
        return twin
