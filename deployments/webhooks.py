"""Webhook delivery: POST `{id, status, result}` to the job's URL, HMAC-SHA256 signed, retried
with exponential backoff in the background (never blocking the pipeline)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Klein-Signature"


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def is_private_target(url: str) -> bool:
    """True when the URL's host resolves to a loopback, private, link-local or reserved address."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return True  # unresolvable: refuse
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            return True
    return False


async def deliver(
    url: str,
    payload: dict,
    secret: str | None,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 10.0,
) -> bool:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for i in range(attempts):
            try:
                r = await client.post(url, content=body, headers=headers)
                if r.status_code < 300:
                    return True
                log.warning("webhook %s for job %s: HTTP %s", url, payload.get("id"), r.status_code)
            except httpx.HTTPError as e:
                log.warning("webhook %s for job %s: %s", url, payload.get("id"), e)
            if i + 1 < attempts:
                await asyncio.sleep(backoff_s * 2**i)
    log.error("webhook %s for job %s: gave up after %d attempts", url, payload.get("id"), attempts)
    return False
