"""Object storage: the source of truth for jobs, images and usage (docs/architecture.md §6).

Two backends behind one interface: S3-compatible (boto3) and a local directory (the embedded
default, whose "presigned" URLs are HMAC-signed links served by the ingress). Keys are relative,
'/'-separated and validated, so no key can leave its backend's root or bucket prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

from pydantic import BaseModel, Field, SecretStr

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


class StorageError(RuntimeError):
    """The backend failed (network, permissions, missing bucket); retryable by the caller."""


class PreconditionFailed(Exception):
    """A conditional write found the object not as expected: changed since it was read (`if_match`)
    or already there (`if_none_match`). Not retried: the caller re-reads and decides."""


class StorageOptions(BaseModel):
    backend: Literal["local", "s3"] = Field("local", description="'local' directory or 's3'-compatible")
    root: Path = Field(Path("klein-data"), description="local backend: the directory holding every object")
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
                log.warning("storage %s(%s) failed, retrying in %.1f s: %s", fn.__name__.strip("_"),
                            args[0], delay, e)  # fmt: skip
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


class LocalStorage(Storage):
    def __init__(self, root: Path, signing_key: bytes | None = None):
        self.root = Path(root).resolve()
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)  # for conditional writes (`_locked`)
        self._given_key = signing_key

    @functools.cached_property
    def _signing_key(self) -> bytes:
        """The configured key, else one per storage root shared by every replica that mounts it:
        made on first use (only the ingress signs links), and whoever links it first wins."""
        if self._given_key:
            return self._given_key
        path = self.root / ".signing-key"
        if not path.exists():
            tmp = path.with_name(f".signing-key.{os.getpid()}.{secrets.token_hex(4)}")
            tmp.write_bytes(secrets.token_bytes(32))
            try:
                os.link(tmp, path)  # atomic, and fails if another replica got there first
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_bytes()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"invalid storage key {key!r}")
        return path

    _thread_locks = [threading.Lock() for _ in range(64)]

    @contextlib.contextmanager
    def _locked(self, key: str):
        """An exclusive lock for a key's conditional writes: one of 64 stripes chosen by the key's
        hash, held by a thread lock within this process and flock across the processes of one host
        (the local backend is a single host's: on NFS, flock's emulation is not to be relied on)."""
        stripe = hashlib.sha256(key.encode()).digest()[0] % 64
        with self._thread_locks[stripe], open(self.root / ".locks" / f"{stripe:02d}", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _put(self, key, data, content_type, if_match=None, if_none_match=False):
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            if if_none_match:
                os.link(tmp, path)  # atomic, and fails if the object exists
            elif if_match is not None:
                with self._locked(key):  # conditional writes of one key exclude each other
                    current = self._get(key)
                    if current is None or current[1] != if_match:
                        raise PreconditionFailed(f"{key} is not version {if_match}")
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)  # atomic: readers see the old or the new object, never half of one
        except FileExistsError:
            raise PreconditionFailed(f"{key} exists") from None
        except OSError as e:
            raise StorageError(f"local put {key} failed: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
        return _etag(data)

    def _get(self, key):
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, _etag(data)

    def _delete(self, key):
        self._path(key).unlink(missing_ok=True)

    def _list(self, prefix):
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self._signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(self.signature(key, expires), signature)

    def url(self, key, base_url, expires_s):
        expires = int(time.time()) + expires_s
        query = urlencode({"expires": expires, "signature": self.signature(check_key(key), expires)})
        return f"{base_url.rstrip('/')}/v1/files/{key}?{query}"

    def check(self):
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage root {self.root} is not writable")


class S3Storage(Storage):
    def __init__(self, o: StorageOptions):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = o.bucket, o.prefix
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        creds = {}
        if o.access_key_id and o.secret_access_key:
            creds = {
                "aws_access_key_id": o.access_key_id.get_secret_value(),
                "aws_secret_access_key": o.secret_access_key.get_secret_value(),
            }
        config = Config(
            s3={"addressing_style": "path" if o.path_style else "virtual"},
            signature_version="s3v4",
            retries={"max_attempts": 2, "mode": "standard"},  # one quick retry; outages: Storage._retrying
            connect_timeout=5,
            read_timeout=30,
        )
        self.client = boto3.client(
            "s3", endpoint_url=o.endpoint_url, region_name=o.region, config=config, **creds
        )
        self.call_timeout_s = 2 * (5 + 30)  # botocore's two attempts, each its connect and read timeout
        self._conditions: str | None = None  # "enforced", "ignored" or "rejected": probed on first use
        self._probe_lock = threading.Lock()
        if o.create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self):
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def _call(self, fn, missing_ok: bool = True, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            conditional = "IfMatch" in kw or "IfNoneMatch" in kw
            if conditional and code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                raise PreconditionFailed(f"s3 {kw['Key']}: {code}") from None  # (409: a retryable race)
            if missing_ok and code in ("NoSuchKey", "404"):
                return None
            raise StorageError(f"s3 {fn.__name__} failed: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"s3 {fn.__name__} failed: {e}") from e

    def _put(self, key, data, content_type, if_match=None, if_none_match=False):
        condition = {"IfMatch": if_match} if if_match is not None else {}
        if if_none_match:
            condition["IfNoneMatch"] = "*"
        if condition and self._probe() == "rejected":
            condition = {}  # the server refuses the headers: write as before conditions existed
        r = self._call(self.client.put_object, Key=self.prefix + key, Body=data, ContentType=content_type,
                       **condition)  # fmt: skip
        return r["ETag"]

    def _get(self, key):
        def get_object(**kw):  # the body is read inside: a failed read is a StorageError, retried alike
            r = self.client.get_object(**kw)
            return r["Body"].read(), r["ETag"]

        return self._call(get_object, Key=self.prefix + key)

    def _delete(self, key):
        self._call(self.client.delete_object, Key=self.prefix + key)

    def _list(self, prefix):
        keys, token = [], None
        while True:
            kw = {"Prefix": self.prefix + prefix, **({"ContinuationToken": token} if token else {})}
            r = self._call(self.client.list_objects_v2, **kw) or {}
            keys += [o["Key"][len(self.prefix) :] for o in r.get("Contents", [])]
            token = r.get("NextContinuationToken")
            if not token:
                return keys

    def url(self, key, base_url, expires_s):
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + check_key(key)},
            ExpiresIn=expires_s,
        )

    def check(self):
        self._call(self.client.head_bucket, missing_ok=False)

    def supports_conditional_writes(self):
        return self._probe() == "enforced"

    def _probe(self) -> str:
        """S3 has conditional writes (If-Match / If-None-Match on PUT, since 2024); some S3-compatible
        servers ignore the headers (rclone's does) and a few may refuse them. Probed once, on first
        use: over an existing object, a create-only write and a write over a wrong version must both
        be refused. A StorageError (server down) leaves it for the next call."""
        if self._conditions is not None:  # decided: every conditional write asks, no lock needed
            return self._conditions
        with self._probe_lock:
            if self._conditions is None:
                self._conditions = self._try_conditions()
                if self._conditions != "enforced":
                    log.warning("the S3 server %s conditional writes%s: one job can get two runners (racing "
                                "reapers or Idempotency-Key twins), though it is billed once", self._conditions,
                                ", so they are sent without" if self._conditions == "rejected" else "")  # fmt: skip
            return self._conditions

    def _try_conditions(self) -> str:
        key = f"{self.prefix}probe/conditional-writes-{secrets.token_hex(8)}"
        put = functools.partial(self._call, self.client.put_object, Key=key, ContentType="text/plain")
        verdicts = set()
        try:
            put(Body=b"1")
            for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0"'}):
                try:
                    put(Body=b"2", **condition)
                    verdicts.add("ignored")
                except PreconditionFailed:
                    verdicts.add("enforced")
                except StorageError as e:  # a 4xx or 501 answer refuses the header; others are outages
                    response = getattr(e.__cause__, "response", {})
                    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if not (400 <= status < 500 or status == 501):
                        raise
                    verdicts.add("rejected")
        finally:
            with contextlib.suppress(StorageError):
                self._call(self.client.delete_object, Key=key)
        return next(v for v in ("rejected", "ignored", "enforced") if v in verdicts)


def open_storage(o: StorageOptions) -> Storage:
    if o.backend == "s3":
        storage = S3Storage(o)
    else:
        storage = LocalStorage(o.root, o.signing_key.get_secret_value().encode() if o.signing_key else None)
    storage.retry_s = o.retry_s
    return storage
