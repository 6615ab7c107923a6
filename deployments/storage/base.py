"""The storage interface: options, errors, key checks, and the `Storage` base class.

Two backends behind one interface (`Storage`): S3-compatible (`storage.s3`, boto3) and a local
directory (`storage.local`, the embedded default, whose "presigned" URLs are HMAC-signed links served
by the ingress). Keys are relative, '/'-separated and validated, so no key can leave its backend's
root or bucket prefix.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from deployments.options import Options

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


class StorageError(RuntimeError):
    """The backend failed (network, permissions, missing bucket); retryable by the caller."""


class PreconditionFailed(Exception):
    """A conditional write found the object not as expected: changed since it was read (`if_match`)
    or already there (`if_none_match`). Not retried: the caller re-reads and decides."""


def default_root() -> Path:
    """The local backend's directory unless configured: under the user's data directory, so an
    installed `klein serve` run from anywhere keeps its results in one place."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "klein-serve"


class StorageOptions(Options):
    backend: Literal["local", "s3"] = Field("local", description="'local' directory or 's3'-compatible")
    root: Path = Field(
        default_factory=lambda: default_root(),
        description="local backend: the directory holding every object (default: the user's data "
        "directory, $XDG_DATA_HOME/klein-serve or ~/.local/share/klein-serve)",
    )
    bucket: str = Field("klein", description="s3 backend: bucket name")
    prefix: str = Field("", description="s3 backend: key prefix inside the bucket (e.g. 'prod/')")
    endpoint_url: str | None = Field(None, description="s3 backend: endpoint of an S3-compatible server")
    region: str = Field("us-east-1", description="s3 backend: region used for signing")
    path_style: bool = Field(
        True, description="s3 backend: path-style addressing (most S3-compatible servers)"
    )
    access_key_id: SecretStr | None = Field(
        None, description="s3 backend: else the standard AWS credential chain"
    )
    secret_access_key: SecretStr | None = Field(
        None, description="s3 backend: else the standard AWS credential chain"
    )
    create_bucket: bool = Field(False, description="s3 backend: create the bucket at start-up if missing")
    presign_expiry_s: int = Field(
        600, ge=1, le=7 * 24 * 3600, description="lifetime of result URLs (BFL: 10 min)"
    )
    signing_key: SecretStr | None = Field(
        None, description="local backend: HMAC key for result links; default: one kept in the root directory"
    )
    retry_s: float = Field(
        60.0, ge=0, description="how long a failing operation is retried (backoff 0.2 s doubling to 5 s)"
    )


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def check_key(key: str) -> str:
    if not isinstance(key, str) or len(key) > 512 or not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(ABC):
    """Async facade; implementations run blocking I/O in a thread. Backend failures are retried
    with exponential backoff for up to `retry_s` (an S3 outage stalls work instead of failing it);
    a caller on a request path can ask for a shorter budget."""

    retry_s: float = 60.0
    call_timeout_s: float = 10.0  # the longest one backend call may take

    @property
    def longest_op_s(self) -> float:
        """How long one operation (with its retries) can take at most: the retry budget, and the call
        that was under way when the budget ran out."""
        return self.retry_s + self.call_timeout_s

    @abstractmethod
    def _put(
        self, key: str, data: bytes, content_type: str, if_match: str | None, if_none_match: bool
    ) -> str:
        """Write; return the new version's ETag. `if_match`: only over that version; `if_none_match`:
        only where no object is (else PreconditionFailed)."""

    @abstractmethod
    def _get(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, ETag), or None where no object is."""

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def url(self, key: str, base_url: str, expires_s: int) -> str:
        """A time-limited URL that fetches the object without other credentials."""

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError if the backend cannot be reached."""

    async def _retrying(self, retry_s: float | None, fn, *args):
        budget = self.retry_s if retry_s is None else retry_s
        deadline, delay = time.monotonic() + budget, 0.2
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except StorageError as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "storage %s(%s) failed, retrying in %.1f s: %s", fn.__name__.strip("_"), args[0], delay, e
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        retry_s: float | None = None,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Write an object; returns its ETag. With `if_match` (an ETag from `get_versioned` or an
        earlier put) the write happens only if the object is still that version; with
        `if_none_match` only if there is none. Otherwise PreconditionFailed."""
        tries = 0

        def _put(*args):
            nonlocal tries
            tries += 1
            return self._put(*args)

        try:
            return await self._retrying(
                retry_s, _put, check_key(key), data, content_type, if_match, if_none_match
            )
        except PreconditionFailed:
            # A retry of a write whose earlier try landed (its answer lost) fails its own condition:
            # the object holding exactly these bytes is that write.
            current = await self._retrying(retry_s, self._get, key) if tries > 1 else None
            if current is not None and current[0] == data:
                return current[1]
            raise

    async def get(self, key: str, retry_s: float | None = None) -> bytes | None:
        found = await self.get_versioned(key, retry_s)
        return None if found is None else found[0]

    async def get_versioned(self, key: str, retry_s: float | None = None) -> tuple[bytes, str] | None:
        """(bytes, ETag) of an object, or None: the ETag makes a later `put(if_match=)` a
        compare-and-swap."""
        return await self._retrying(retry_s, self._get, check_key(key))

    def supports_conditional_writes(self) -> bool:
        """Whether this backend enforces `if_match` / `if_none_match` (blocking; may raise StorageError)."""
        return True

    async def delete(self, key: str, retry_s: float | None = None) -> None:
        await self._retrying(retry_s, self._delete, check_key(key))

    async def list(self, prefix: str, retry_s: float | None = None) -> list[str]:
        return await self._retrying(retry_s, self._list, check_key(prefix.rstrip("/")) + "/")
