"""What the job service raises for a request it refuses; the HTTP edge maps each to a status
(deployments/api/errors.py)."""

from __future__ import annotations


class FieldError(ValueError):
    """A request field broke a bound: a 422 (or `status`) with `loc` pointing at the field."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


class TooManyJobs(Exception):
    """The calling key already has its maximum of jobs in flight (HTTP 429)."""

    def __init__(self, limit: int):
        super().__init__(f"at most {limit} jobs in flight per API key; retry when one finishes")
        self.limit = limit


class Overloaded(Exception):
    """This replica runs its maximum of jobs, or a stage's queue is full (HTTP 503 + Retry-After)."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body (HTTP 409)."""


def is_backpressure(e: BaseException) -> bool:
    """A stage refused the call because its queue is full (Serve's BackPressureError, possibly
    wrapped when it came through a chained response)."""
    from ray.serve.exceptions import BackPressureError

    while e is not None:
        if isinstance(e, BackPressureError) or type(e).__name__ == "BackPressureError":
            return True
        e = e.__cause__
    return False
