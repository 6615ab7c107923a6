"""Compiled code shared through the service's storage, so that a replica started by the autoscaler
does not compile what an earlier replica compiled.

A stage compiled with inductor (`fast.compile`, see klein.fast) spends its warm-up generating and
building kernels. Torch can serialise everything that produced ("mega-cache":
`torch.compiler.save_cache_artifacts`, the FX graph and AOTAutograd caches, with the Triton kernels
on CUDA) and load it into another process, whose compilation then finds each graph's code instead
of generating it. Per stage, one object in storage holds it, at a key that fingerprints what the
code depends on: torch's version, the device (GPU name and capability, or the CPU's architecture
and vector ISA), the dtype, the model's configuration and the stage's fast-path options. A replica
loads it before warming up and, when its warm-up still had to compile something, writes what it
holds afterwards. Torch's own cache keys decide what is reused, so a stale or foreign object costs a
download and nothing else; a missing, unreadable or corrupt one is logged and warm-up compiles.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import platform
from dataclasses import dataclass

import torch

from deployments.storage import StorageOptions, open_storage

log = logging.getLogger(__name__)
PREFIX = "compile-cache"
RETRY_S = 10.0  # a storage outage delays a replica's start by this much, then it compiles instead


@dataclass
class CacheUse:
    """What one stage's warm-up did with the shared compiled code, for its stats and log."""

    key: str
    loaded_bytes: int = 0
    hits: int = 0  # compiled graphs found in the cache during warm-up
    misses: int = 0  # compiled graphs generated during warm-up
    saved_bytes: int = 0
    error: str | None = None

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded_bytes / 1e6:.1f} MB" if self.loaded_bytes else "nothing to load"]
        parts.append(f"{self.hits} graphs found, {self.misses} compiled")
        if self.saved_bytes:
            parts.append(f"saved {self.saved_bytes / 1e6:.1f} MB")
        if self.error:
            parts.append(self.error)
        return f"compile cache {self.key}: " + "; ".join(parts)


def device_fingerprint(device: torch.device) -> dict:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"gpu": torch.cuda.get_device_name(index), "capability": torch.cuda.get_device_capability(index),
                "cuda": torch.version.cuda}  # fmt: skip
    return {"cpu": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()}


def _graph_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


class CompileCache:
    """The stages' handle on compiled code in storage. Picklable: its storage options travel, and
    the replica that unpickles it opens storage there."""

    def __init__(self, storage: StorageOptions):
        self.options = storage
        self.storage = open_storage(storage)

    def __getstate__(self):
        return {"options": self.options}

    def __setstate__(self, state):
        self.__init__(state["options"])

    @staticmethod
    def key(stage: str, device: torch.device, dtype: torch.dtype, model: object, fast: dict) -> str:
        what = {"torch": torch.__version__, "device": device_fingerprint(device), "dtype": str(dtype),
                "model": repr(model), "fast": fast}  # fmt: skip
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]
        return f"{PREFIX}/{stage}/{digest}.bin"

    def around(self, key: str, warm_up):
        """`warm_up()` with the compiled code at `key` loaded first, and saved after it when it had to
        compile anything; -> (what warm_up returned, CacheUse). Blocking: run on the stage's worker
        thread, before the replica reports healthy."""
        use = CacheUse(key)
        try:
            blob = self._run(self.storage.get(key, retry_s=RETRY_S))
            if blob is not None:
                if torch.compiler.load_cache_artifacts(blob) is None:  # (torch logs why)
                    raise ValueError(f"torch could not read the {len(blob)} bytes there")
                use.loaded_bytes = len(blob)
        except Exception as e:  # storage down, or an object torch cannot read: compile instead
            use.error = f"not loaded ({type(e).__name__}: {e})"
            log.warning("%s", use)
        hits, misses = _graph_counts()
        warmed = warm_up()
        use.hits, use.misses = _graph_counts()[0] - hits, _graph_counts()[1] - misses
        if use.misses:
            try:
                saved = torch.compiler.save_cache_artifacts()
                if saved is not None:
                    self._run(self.storage.put(key, saved[0], retry_s=RETRY_S))
                    use.saved_bytes = len(saved[0])
            except Exception as e:  # the next replica compiles too; this one serves regardless
                use.error = f"not saved ({type(e).__name__}: {e})"
                log.warning("%s", use)
        return warmed, use

    @staticmethod
    def _run(coro):
        """An async storage call from the worker thread (no event loop runs there)."""
        return asyncio.run(coro)
