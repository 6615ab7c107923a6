"""Admission: this replica's cap on jobs it runs at once (503 beyond) and each key's cap on jobs in
flight across every replica (429 beyond).

Submissions are counted before anything is awaited: a check made across an await would let a burst
of submissions all pass before any of them counted."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from deployments.jobs.errors import Overloaded, TooManyJobs
from deployments.jobs.store import JobStore


class Admission:
    def __init__(self, store: JobStore, *, max_running_jobs: int, max_jobs_in_flight: int):
        self.store = store
        self.max_running_jobs, self.max_jobs_in_flight = max_running_jobs, max_jobs_in_flight
        self.admitted: set[str] = set()  # jobs submitted or run here: max_running_jobs counts them
        self.submitting: dict[str, set[str]] = {}  # per key: submissions here past its cap check
        self.running: Callable[[str], bool] = lambda job_id: False  # the runner's: a run here holds it

    @contextlib.contextmanager
    def admitting(self, job_id: str, key_id: str):
        """Count a submission against this replica's cap (Overloaded beyond it) for as long as it is
        submitted or run here; on the way out it no longer counts as one of its key's submissions.
        A failed submission stops counting (`release`)."""
        if len(self.admitted) >= self.max_running_jobs:
            raise Overloaded(f"this replica is running its maximum of {self.max_running_jobs} jobs")
        self.admitted.add(job_id)
        try:
            yield
        except BaseException:
            self.release(job_id)
            raise
        finally:
            if (submitting := self.submitting.get(key_id)) is not None:
                submitting.discard(job_id)
                if not submitting:
                    del self.submitting[key_id]

    async def check_key_cap(self, key_id: str, job_id: str) -> None:
        """TooManyJobs when the key has its maximum in flight: its jobs in storage (every replica's)
        and this replica's other submissions past this check on their way there, by id, so that
        one whose pending marker lands while the listing is taken counts once."""
        submitting = self.submitting.setdefault(key_id, set())
        before = set(submitting)
        listed = await self.store.in_flight_ids(key_id)
        if len(listed | before | submitting) >= self.max_jobs_in_flight:
            raise TooManyJobs(self.max_jobs_in_flight)
        submitting.add(job_id)

    def hold(self, job_id: str) -> None:
        """A run starts here (a job the reaper restarts counts from now)."""
        self.admitted.add(job_id)

    def drop(self, job_id: str) -> None:
        """A run here ended."""
        self.admitted.discard(job_id)

    def release(self, job_id: str) -> None:
        """A submission ends without running here: it no longer counts, unless a run here holds the
        same id (an Idempotency-Key twin's, or its own once started)."""
        if not self.running(job_id):
            self.admitted.discard(job_id)
