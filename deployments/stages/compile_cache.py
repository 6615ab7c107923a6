"""Compiled code shared through the service's storage, so that a replica started by the autoscaler
does not compile what an earlier replica compiled.

A stage compiled with inductor (`fast.compile`, see klein.fast) spends its warm-up generating and
building kernels. Torch can serialise everything that produced ("mega-cache":
`torch.compiler.save_cache_artifacts`, the FX graph and AOTAutograd caches, with the Triton kernels
on CUDA) and load it into another process, whose compilation then finds each graph's code instead
of generating it. Per stage, one object in storage holds it, at a key that fingerprints what the
code depends on: torch's version and build, Triton's, klein's model code, the device (GPU name and
capability, or the CPU's architecture and vector ISA), the dtype, the model's configuration and
the stage's compile options. A replica loads it before warming up; when its warm-up still had to
compile something, it writes what it holds afterwards, in the background (the replica does not wait
for the upload to report healthy), and only over the version it loaded, or where there was none: of
replicas that compiled at once, one writes and the others find it written. Torch's own cache keys
decide what is reused, so a stale or foreign object costs a download and nothing else; a missing,
unreadable or corrupt one, or storage failing, is logged and the warm-up compiles. What a replica
writes is what it used (torch records the entries it looked up, not all it loaded): the last
writer's warm-up set.

Loading runs code that was generated elsewhere, as importing a module does: whoever can write
`compile-cache/` in the service's storage can run code in its model replicas. It is off unless a
stage's `fast.share_compiled` turns it on, and wants that prefix writable by the service alone.
An object nobody rewrites (every replica found all it needed) ages; a lifecycle rule that expires
the prefix's objects after some days costs one replica's compile when it does.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deployments.storage import PreconditionFailed, StorageOptions, open_storage
from klein.fast import compiled_graph_counts

log = logging.getLogger(__name__)
PREFIX = "compile-cache"
RETRY_S = 10.0  # storage's retry budget for the load (it still waits out the call under way then)


@dataclass
class CacheUse:
    """What one stage's warm-up did with the shared compiled code, for its stats and log."""

    key: str
    loaded_bytes: int = 0
    hits: int = 0  # compiled graphs found in the cache during warm-up
    misses: int = 0  # compiled graphs generated during warm-up
    bypassed: int = 0  # compiled graphs torch cannot cache
    saved_bytes: int = 0  # being written in the background
    error: str | None = None

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded_bytes / 1e6:.1f} MB" if self.loaded_bytes else "nothing to load"]
        parts.append(f"{self.hits} graphs found, {self.misses} compiled")
        if self.bypassed:
            parts.append(f"{self.bypassed} not cacheable")
        if self.saved_bytes:
            parts.append(f"saving {self.saved_bytes / 1e6:.1f} MB")
        if self.error:
            parts.append(self.error)
        return f"compile cache {self.key}: " + "; ".join(parts)


def device_fingerprint(device: torch.device) -> dict:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"gpu": torch.cuda.get_device_name(index), "capability": torch.cuda.get_device_capability(index),
                "cuda": torch.version.cuda}  # fmt: skip
    return {"cpu": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()}


@functools.cache
def code_fingerprint() -> dict:
    """What compiled code depends on beyond its inputs: torch's build, Triton's, klein's source."""
    import klein

    source = hashlib.sha256()
    for path in sorted(Path(klein.__file__).parent.glob("*.py")):
        source.update(path.name.encode() + path.read_bytes())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "torch_git": torch.version.git_version, "triton": triton_version,
            "klein": source.hexdigest()}  # fmt: skip


class CompileCache:
    """The stages' handle on compiled code in storage. Picklable: its storage options travel, and
    the replica that unpickles it opens storage there."""

    def __init__(self, storage: StorageOptions):
        self.options = storage
        self.storage = open_storage(storage)
        self.uploads: list[threading.Thread] = []  # saves under way (joined by tests)

    def __getstate__(self):
        return {"options": self.options}

    def __setstate__(self, state):
        self.__init__(state["options"])

    @staticmethod
    def key(stage: str, device: torch.device, dtype: torch.dtype, what: dict) -> str:
        """The object of a stage's compiled code on this device, for `what` (the model's configuration
        and the compile options)."""
        what = code_fingerprint() | {"device": device_fingerprint(device), "dtype": str(dtype)} | what
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode()).hexdigest()[:32]
        return f"{PREFIX}/{stage}/{digest}.bin"

    def around(self, stage: str, device: torch.device, dtype: torch.dtype, what: dict, warm_up):
        """`warm_up()` with the stage's compiled code loaded first, and saved after it when it had to
        compile anything; -> (what warm_up returned, CacheUse). Blocking: run on the stage's worker
        thread, before the replica reports healthy; the save goes on in the background."""
        use, etag, keyed = CacheUse(key=f"{PREFIX}/{stage}/"), None, False
        try:
            use.key, keyed = self.key(stage, device, dtype, what), True
            found = self._run(self.storage.get_versioned(use.key, retry_s=RETRY_S))
            if found is not None:
                blob, etag = found
                if torch.compiler.load_cache_artifacts(blob) is None:  # (torch logs why)
                    raise ValueError(f"torch could not read the {len(blob)} bytes there")
                use.loaded_bytes = len(blob)
        except Exception as e:  # storage down, or an object torch cannot read: compile instead
            use.error = f"not loaded ({type(e).__name__}: {e})"
            log.warning("%s", use)
        before = compiled_graph_counts()
        warmed = warm_up()
        use.hits, use.misses, use.bypassed = (
            after - b for after, b in zip(compiled_graph_counts(), before, strict=True)
        )
        if use.misses and keyed:
            try:
                saved = torch.compiler.save_cache_artifacts()
            except Exception as e:
                saved, use.error = None, f"not saved ({type(e).__name__}: {e})"
                log.warning("%s", use)
            if saved is not None:
                use.saved_bytes = len(saved[0])
                upload = threading.Thread(
                    target=self._upload, args=(use, saved[0], etag), name="compile-cache"
                )
                upload.start()
                self.uploads.append(upload)
        return warmed, use

    def _upload(self, use: CacheUse, blob: bytes, etag: str | None) -> None:
        """Over the version loaded (or where there was none): a replica that wrote first stands."""
        start = time.monotonic()
        try:
            self._run(self.storage.put(use.key, blob, if_match=etag, if_none_match=etag is None))
            log.info("%s: saved in %.1f s", use.key, time.monotonic() - start)
        except PreconditionFailed:
            log.info("%s: another replica saved its compiled code first; kept", use.key)
        except Exception:  # the next replica compiles too; this one serves regardless
            log.warning("%s: compiled code not saved", use.key, exc_info=True)

    @staticmethod
    def _run(coro):
        """An async storage call from a thread of its own (no event loop runs there)."""
        return asyncio.run(coro)
