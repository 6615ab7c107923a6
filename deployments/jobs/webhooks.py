"""Webhook delivery: POST `{id, status, result}` to the job's URL, HMAC-SHA256 signed, retried
with exponential backoff in the background (never blocking the pipeline)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Callable

import httpx

from deployments.jobs.records import JobRecord, Status
from deployments.netguard import TargetRefused, pinned

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Klein-Signature"


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def deliver(
    url: str,
    payload: dict,
    secret: str | None,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 10.0,
    allow_private: bool = False,
) -> bool:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for i in range(attempts):
            try:
                address, host, extensions = await asyncio.to_thread(pinned, url, allow_private)  # each time
                r = await client.post(address, content=body, headers=headers | host, extensions=extensions)
                if r.status_code < 300:
                    return True
                log.warning("webhook %s for job %s: HTTP %s", url, payload.get("id"), r.status_code)
            except TargetRefused as e:
                log.warning("webhook %s for job %s: refused: %s", url, payload.get("id"), e)
                if not e.transient:
                    return False
            except httpx.HTTPError as e:
                log.warning("webhook %s for job %s: %s", url, payload.get("id"), e)
            if i + 1 < attempts:
                await asyncio.sleep(backoff_s * 2**i)
    log.error("webhook %s for job %s: gave up after %d attempts", url, payload.get("id"), attempts)
    return False


class Webhooks:
    """Sends a job's webhook when it ends, in the background; the tasks are referenced until done
    (a task nobody references may be collected mid-flight)."""

    def __init__(self, attempts: int, allow_private: bool, link: Callable[[str, str], str]):
        """`link(key, base_url)`: a URL the receiver can fetch a result object at."""
        self.attempts, self.allow_private, self.link = attempts, allow_private, link
        self.tasks: set[asyncio.Task] = set()

    def announce(self, job: JobRecord, default_base_url: str | None) -> None:
        r = job.request
        if not r.webhook_url:
            return
        sample = None
        if job.status is Status.READY and job.result is not None:
            sample = self.link(job.result.key, r.public_url or default_base_url or "")
        payload = {"id": job.id, "status": job.status.value, "result": job.summary(sample)}
        task = asyncio.create_task(
            deliver(r.webhook_url, payload, r.webhook_secret, self.attempts, allow_private=self.allow_private)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
