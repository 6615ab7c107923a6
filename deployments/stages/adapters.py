"""LoRA adapters for the served model: where they come from, how replicas name them, and each
replica's cache of parsed ones.

A request names an adapter by `path`: a file of the operator's registry (`lora.root`: a local
folder, or `storage:PREFIX` for a prefix in the service's own storage), or, where the operator
allows it, an http(s) URL, fetched through the SSRF guard with a size cap and stored once under
`loras/url/<sha256>.safetensors` so every replica reads the same bytes. Between replicas an adapter
travels as a key with its version (`file:/abs/path@mtime`, `storage:key@etag`): the ingress resolves
and validates it before any GPU work, the FlowTransformer loads it into its slot bank.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from pathlib import Path

from pydantic import Field, model_validator

from deployments import netguard
from deployments.options import Options
from deployments.storage import StorageOptions, open_storage
from klein.config import TransformerConfig
from klein.hub import explain
from klein.lora import LoraAdapter, LoraError, parse_lora, read_lora_bytes
from klein.request import LORA_PLACES_LIMIT, MAX_LORAS

log = logging.getLogger(__name__)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*")


class LoraSettings(Options):
    root: str | None = Field(
        None,
        description="adapter registry: a local folder, or storage:PREFIX for a prefix of the service's "
        "storage; a request's loras[].path names a file in it (.safetensors may be left out)",
    )
    allow_urls: bool = Field(False, description="accept http(s) URLs as loras[].path (fetched, SSRF-guarded)")
    allow_private: bool = Field(False, description="allow adapter URLs on private/loopback addresses")
    max_mb: int = Field(512, ge=1, description="largest adapter file")
    fetch_timeout_s: float = Field(60.0, gt=0, le=600, description="time cap for fetching one adapter")
    cache_mb: int = Field(1024, ge=0, description="parsed adapters kept per replica, by bytes")
    slots: int = Field(
        8, ge=2, le=256, description="adapters resident in the transformer at once, plus one empty"
    )
    max_rank: int = Field(64, ge=1, le=1024, description="highest adapter rank (the slots' padded rank)")
    max_loras: int = Field(MAX_LORAS, ge=1, le=LORA_PLACES_LIMIT, description="adapters one request may name")

    @model_validator(mode="after")
    def _one_request_fits(self):
        if self.slots < self.max_loras + 1:
            raise ValueError(
                f"lora.slots must be at least lora.max_loras + 1 = {self.max_loras + 1} (one slot stays "
                f"empty; one request's adapters must be resident together), got {self.slots}"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.root is not None or self.allow_urls


class AdapterError(ValueError):
    """A request's adapter cannot be used; the message says why (the caller names the field)."""


HUB_FILE = re.compile(r"(?:hf://)?([\w.-]+/[\w.-]+)/((?:[\w.-]+/)*[\w.-]+\.safetensors)(?:@([\w./-]+))?")


def _hub_file(path: str) -> tuple[str, str, str | None] | None:
    """org/name/file.safetensors[@revision] (optionally hf://) -> (repo, filename, revision); None
    unless the repository id is valid by the hub's rules and the file path has no `.` / `..` part."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    m = HUB_FILE.fullmatch(path)
    if m is None or {".", ".."} & set(m[2].split("/")):
        return None
    try:
        validate_repo_id(m[1])
    except HFValidationError:
        return None
    return m[1], m[2], m[3]


def _hub_download(repo: str, filename: str, revision: str | None, max_bytes: int, max_mb: int) -> bytes:
    """The file's bytes, its size checked before the download (a file of unknown size is refused);
    downloaded into a temporary folder, not the replica's hub cache, so requests cannot fill it."""
    import tempfile

    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    where = f"{repo}/{filename}" + (f"@{revision}" if revision else "")
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision))
        if meta.size is None or meta.size > max_bytes:
            raise AdapterError(f"{where} is over the {max_mb} MB cap (or of unknown size)")
        with tempfile.TemporaryDirectory(prefix="klein-lora-") as folder:
            data = Path(hf_hub_download(repo, filename, revision=revision, local_dir=folder)).read_bytes()
        if len(data) > max_bytes:
            raise AdapterError(f"{where} is over the {max_mb} MB cap")
        return data
    except AdapterError:
        raise
    except Exception as e:  # the hub's answers, unreachable, a bad name: the request's adapter, not a 500
        reason = explain(e, repo, revision) or f"the hub could not be read ({type(e).__name__})"
        raise AdapterError(f"{where}: {reason}") from None


class Adapters:
    """Resolves `path`s to versioned keys, reads and parses adapters (cached, least recently used
    out by bytes). Picklable: a replica that unpickles it opens storage there."""

    def __init__(self, settings: LoraSettings, storage: StorageOptions, config: TransformerConfig):
        self.settings, self.storage_options, self.config = settings, storage, config
        self.storage = open_storage(storage)
        self.cache: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.cache_bytes = self.hits = self.loads = 0
        self.load_seconds = 0.0
        root = settings.root
        if root is not None and not root.startswith("storage:") and not Path(root).is_dir():
            log.warning("lora.root %s is not a folder here: every registry adapter will be unknown", root)

    def __getstate__(self):
        return {"settings": self.settings, "storage": self.storage_options, "config": self.config}

    def __setstate__(self, state):
        self.__init__(state["settings"], state["storage"], state["config"])

    @property
    def max_bytes(self) -> int:
        return self.settings.max_mb * 2**20

    async def resolve(self, path: str) -> str:
        """The versioned key of the adapter `path` names; AdapterError saying why not."""
        s = self.settings
        if path.startswith(("http://", "https://")):
            if not s.allow_urls:
                raise AdapterError(
                    "URLs are not accepted here (lora.allow_urls is off); name a registry adapter"
                )
            return await self._fetch(path)
        # a hub file: hf://org/name/file.safetensors, or without hf:// where there is no registry
        if path.startswith("hf://") or (s.root is None and s.allow_urls and path.count("/") >= 2):
            if not s.allow_urls:
                raise AdapterError("hub files are not accepted here (lora.allow_urls is off)")
            hub = _hub_file(path)
            if hub is None:
                raise AdapterError("a hub file is hf://org/name/file.safetensors[@revision]")
            return await self._fetch_hub(*hub)
        if "://" in path:
            raise AdapterError("must name a registry adapter, a hub file or be an http(s) URL")
        if s.root is None:
            raise AdapterError("this deployment has no adapter registry (lora.root); name an http(s) URL")
        return await self._registry(path)

    async def _registry(self, path: str) -> str:
        s = self.settings
        name = path if path.endswith(".safetensors") else f"{path}.safetensors"
        if len(name) > 256 or not NAME.fullmatch(name) or ".." in name.split("/"):
            raise AdapterError("must be a relative name of letters, digits, '.', '_', '-' and '/'")
        if s.root.startswith("storage:"):
            key = f"{s.root.removeprefix('storage:').strip('/')}/{name}".lstrip("/")
            found = await self.storage.get_versioned(key)
            if found is None:
                raise AdapterError(f"no adapter named {path!r}")
            return f"storage:{key}@{found[1]}"
        file = Path(s.root) / name
        try:
            stat = await asyncio.to_thread(file.stat)
        except OSError:
            raise AdapterError(f"no adapter named {path!r}") from None
        return f"file:{file}@{stat.st_mtime_ns}"

    async def _fetch_hub(self, repo: str, filename: str, revision: str | None) -> str:
        """A LoRA file from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN), size-capped before it is
        downloaded, kept in storage by digest like a URL's."""
        data = await asyncio.to_thread(
            _hub_download, repo, filename, revision, self.max_bytes, self.settings.max_mb
        )
        read_lora_bytes(data, filename)  # a safetensors file, before it is kept
        key = f"loras/url/{hashlib.sha256(data).hexdigest()}.safetensors"
        etag = await self.storage.put(key, data)
        return f"storage:{key}@{etag}"

    async def _fetch(self, url: str) -> str:
        s = self.settings
        try:
            data = await netguard.fetch(url, self.max_bytes, s.fetch_timeout_s, s.allow_private)
        except netguard.TargetRefused as e:
            if e.too_large:
                raise AdapterError(f"the file is over the {s.max_mb} MB cap") from None
            raise AdapterError(f"cannot use this URL: {e}") from None
        read_lora_bytes(data, url.rsplit("/", 1)[-1])  # a safetensors file, before it is kept
        key = f"loras/url/{hashlib.sha256(data).hexdigest()}.safetensors"
        etag = await self.storage.put(key, data)
        return f"storage:{key}@{etag}"

    async def read(self, key: str) -> bytes:
        kind, _, rest = key.partition(":")
        where = rest.rsplit("@", 1)[0]
        if kind == "file":
            size = (await asyncio.to_thread(Path(where).stat)).st_size
            if size > self.max_bytes:
                raise AdapterError(f"the file is over the {self.settings.max_mb} MB cap")
            return await asyncio.to_thread(Path(where).read_bytes)
        data = await self.storage.get(where)
        if data is None:
            raise AdapterError("the adapter is gone from storage")
        if len(data) > self.max_bytes:
            raise AdapterError(f"the file is over the {self.settings.max_mb} MB cap")
        return data

    async def load(self, key: str) -> LoraAdapter:
        """The adapter behind a key, parsed and checked against the model (cached)."""
        if (adapter := self.cache.get(key)) is not None:
            self.cache.move_to_end(key)
            self.hits += 1
            return adapter
        start = time.perf_counter()
        data = await self.read(key)
        name = Path(key.partition(":")[2].rsplit("@", 1)[0]).name
        adapter = await asyncio.to_thread(self._parse, data, name)
        self.loads += 1
        self.load_seconds += time.perf_counter() - start
        self._keep(key, adapter)
        return adapter

    def _parse(self, data: bytes, name: str) -> LoraAdapter:
        tensors, metadata = read_lora_bytes(data, name)
        adapter = parse_lora(tensors, metadata, self.config, name)
        if adapter.rank > self.settings.max_rank:
            raise LoraError(
                f"{name}: rank {adapter.rank}, over this deployment's max_rank {self.settings.max_rank}"
            )
        return adapter

    def _keep(self, key: str, adapter: LoraAdapter) -> None:
        budget = self.settings.cache_mb * 2**20
        if adapter.nbytes > budget:
            return
        self.cache[key] = adapter
        self.cache_bytes += adapter.nbytes
        while self.cache_bytes > budget:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old.nbytes

    def stats(self) -> dict:
        return {
            "adapters_cached": len(self.cache),
            "adapter_cache_bytes": self.cache_bytes,
            "adapter_hits": self.hits,
            "adapter_loads": self.loads,
            "adapter_load_seconds": round(self.load_seconds, 3),
        }
