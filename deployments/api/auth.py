"""API keys: accepted as `x-key` (BFL) or `Authorization: Bearer` (OpenAI), kept only as SHA-256
hashes in memory, never logged. A key's public id (a hash prefix) names it in storage and logs."""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from fastapi import HTTPException, Request

from deployments.jobs.records import ANONYMOUS

log = logging.getLogger(__name__)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_keys(text: str) -> list[str]:
    """Comma- or newline-separated keys; blanks and '#' comment lines ignored."""
    out = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        out += [k.strip() for k in line.split(",") if k.strip()]
    return out


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Holds digests only: a KeyRing can be pickled into a deployment without carrying keys."""

    def __init__(self, digests: dict[str, str] | None = None, file: Path | None = None):
        self._static = dict(digests or {})  # sha256 hex -> key id
        self._file = Path(file) if file else None
        self._mtime: float | None = None
        self._hashes: dict[str, str] = {}
        self._load()

    @classmethod
    def from_keys(cls, keys: list[str], file: Path | None = None) -> KeyRing:
        short = [key_id(k) for k in keys if len(k) < 16]
        if short:
            raise ValueError(f"API keys must be at least 16 characters (key ids {', '.join(short)})")
        return cls({_digest(k): key_id(k) for k in keys}, file)

    def _load(self) -> None:
        hashes = dict(self._static)
        if self._file is not None:
            keys = parse_keys(self._file.read_text())
            self._mtime = self._file.stat().st_mtime
            hashes.update(KeyRing.from_keys(keys)._static)
        self._hashes = hashes

    def _refresh(self) -> None:
        """A mounted secret can be rotated in place: reload when the file changes."""
        if self._file is not None:
            try:
                if self._file.stat().st_mtime != self._mtime:
                    self._load()
                    log.info("API keys reloaded from %s (%d keys)", self._file, len(self._hashes))
            except OSError:
                log.exception("cannot re-read API keys file %s; keeping the previous keys", self._file)

    @property
    def enabled(self) -> bool:
        return bool(self._hashes) or self._file is not None

    def identify(self, presented: str | None) -> str | None:
        """The key id of a presented key, or None if it is not one of ours."""
        if not presented:
            return None
        self._refresh()
        digest = _digest(presented)
        for known, kid in self._hashes.items():
            if hmac.compare_digest(known, digest):
                return kid
        return None


def presented_key(headers) -> str | None:
    if key := headers.get("x-key"):
        return key
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def caller(request: Request) -> str:
    """FastAPI dependency: the calling API key's id; 401 without a known key (when keys are set)."""
    keys: KeyRing = request.app.state.keys
    if not keys.enabled:
        return ANONYMOUS
    kid = keys.identify(presented_key(request.headers))
    if kid is None:
        raise HTTPException(
            401,
            "missing or unknown API key: send it as `x-key` or `Authorization: Bearer`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return kid
