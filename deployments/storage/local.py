"""The local-directory backend: objects as files, conditional writes under a lock file, and
HMAC-signed result links the ingress serves."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from deployments.storage.base import PreconditionFailed, Storage, StorageError, _etag, check_key


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
        except OSError as e:  # EIO, EMFILE, EACCES, ESTALE...: the backend failing, retried as such
            raise StorageError(f"local get {key} failed: {e}") from e
        return data, _etag(data)

    def _delete(self, key):
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"local delete {key} failed: {e}") from e

    def _list(self, prefix):
        base = self._path(prefix.rstrip("/"))
        try:
            if not base.is_dir():
                return []
            return sorted(
                p.relative_to(self.root).as_posix()
                for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".")
            )
        except OSError as e:
            raise StorageError(f"local list {prefix} failed: {e}") from e

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
