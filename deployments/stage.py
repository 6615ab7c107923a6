"""What every model stage shares: building its klein component on the right device, a single
worker thread for tensor work (the replica's event loop stays free for health checks and
batching), and a health check that actually touches the device."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from pydantic import BaseModel, Field

from klein import DTYPES

log = logging.getLogger(__name__)


class Placement(BaseModel):
    device: Literal["cpu", "cuda"] | None = Field(None, description="default: cuda when the replica sees one")
    dtype: Literal["bf16", "fp32"] | None = Field(None, description="default: bf16 on cuda, fp32 on cpu")
    torch_threads: int | None = Field(None, ge=1, description="intra-op CPU threads per replica")

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' configured but this replica sees no CUDA device")
        dtype = DTYPES[self.dtype or ("bf16" if device == "cuda" else "fp32")]
        return torch.device(device), dtype


class StageOptions(BaseModel):
    """What every model stage's options share; each adds its Serve defaults and batch bound."""

    placement: Placement = Field(default_factory=Placement)
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="how long a batch waits to fill (0: take what queued while the last batch ran)"
    )


class Stage:
    """Base of the model stages: `run` executes tensor work on the stage's worker thread."""

    def __init__(self, placement: Placement):
        self.device, self.dtype = placement.resolve()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=type(self).__name__)
        self._failures = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # requests per batch, most recent last

    async def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes)}

    async def run(self, fn, *args):
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)
        except Exception:
            self._failures += 1
            raise
        self._failures = 0
        return out

    async def check_health(self) -> None:
        """The device still computes, and the last batches did not all fail."""
        if self._failures >= 3:
            raise RuntimeError(f"{type(self).__name__}: the last {self._failures} batches failed")

        def probe():
            x = torch.ones(8, 8, device=self.device, dtype=self.dtype)
            if float((x @ x).sum()) != 512.0:
                raise RuntimeError(f"{type(self).__name__}: device {self.device} computes wrong results")

        await asyncio.get_running_loop().run_in_executor(self._worker, probe)


def _one_by_one(what: str, items: list, error: Exception) -> None:
    log.warning("%s: a batch of %d failed (%s: %s); running its requests one by one",
                what, len(items), type(error).__name__, error)  # fmt: skip


def isolated(run_batch, items: list, what: str) -> list:
    """`run_batch(items)` -> one result per item; when the batch fails as a whole, its items are
    run again one by one, so a poisoned request (or one that tips the batch out of memory) fails
    alone and its batch-mates still get their results. Failures come back as exception objects."""
    try:
        return list(run_batch(items))
    except Exception as e:
        if len(items) == 1:
            return [e]
        _one_by_one(what, items, e)
    out: list = []
    for item in items:
        try:
            out += run_batch([item])
        except Exception as e:
            out.append(e)
    return out


async def isolating(run_batch, items: list, what: str) -> list:
    """`isolated` for a coroutine `run_batch` (the transformer's steps interleave cancel checks)."""
    try:
        return list(await run_batch(items))
    except Exception as e:
        if len(items) == 1:
            return [e]
        _one_by_one(what, items, e)
    out: list = []
    for item in items:
        try:
            out += await run_batch([item])
        except Exception as e:
            out.append(e)
    return out
