"""What every model stage shares: building its klein component on the right device, a single
worker thread for all tensor work (the replica's event loop stays free for health checks and
batching), and a health check that actually touches the device.

All of a stage's torch calls, loading included, run on that one thread: each thread that enters an
OpenMP parallel region gets its own team of threads, and two teams in one process contend for the
cores (measured: the tiny pipeline with 2 threads took 40-50 ms per image from one thread, 80-110 ms
from a second thread of a process whose first thread had used torch)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from deployments import metrics
from deployments.options import Options
from deployments.stages.compile_cache import CompileCache
from deployments.stages.payloads import JobCancelled
from klein import DTYPES, FastPath
from klein.fast import OptionConflict

log = logging.getLogger(__name__)


class Placement(Options):
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


SWITCHES = ("compile", "cuda_graphs")


class FastPathOptions(Options):
    """The fast path of a stage's model (klein.fast), set up and warmed up before the replica
    reports healthy; the stage logs what it compiled and how long warm-up took."""

    compile: bool = Field(False, description="torch.compile the model (regional), warmed up first")
    cuda_graphs: bool = Field(False, description="CUDA graphs for the transformer (CUDA only)")
    attention: Literal["auto", "default", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="transformer SDPA backend; auto: cuDNN, else flash, pinned on CUDA"
    )
    quantize: Literal["fp8"] | None = Field(
        None, description="transformer only: FP8 block linears (FP8 checkpoints stay FP8 anyway)"
    )
    dynamic: bool = Field(False, description="one compiled graph for every shape (else one per shape)")
    warmup_sizes: list[str] = Field(
        default_factory=list, description="WxH sizes compiled before serving, e.g. 1024x1024"
    )
    warmup_batch_sizes: list[int] = Field(default_factory=lambda: [1], description="per warm-up size")
    new_shapes: Literal["eager", "compile"] = Field(
        "eager", description="a shape that was not warmed up: run it eagerly, or compile it then"
    )
    max_shapes: int = Field(16, ge=1, description="compiled shapes per model; past it new ones run eagerly")
    backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend (aot_eager / eager trace without generating code)"
    )
    freeze: bool = Field(False, description="inductor freezing: weights as constants; not with LoRA")
    autotune: bool = Field(False, description="inductor max-autotune: GEMMs chosen by timing them")
    share_compiled: bool = Field(
        False,
        description="inductor's compiled code shared with the stage's other replicas through storage "
        "(compile-cache/: loading it runs its code, so that prefix must be writable by the service alone)",
    )

    @model_validator(mode="after")
    def _compiler_options(self):
        try:
            self.fast_path()
        except OptionConflict as e:
            # the switches it needs, as the config sets them
            raise ValueError(e.worded(lambda name: f"{name}: true" if name in SWITCHES else name)) from None
        return self

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            w, _, h = size.partition("x")
            if not (w.isdigit() and h.isdigit()) or int(w) % 16 or int(h) % 16:
                raise ValueError(f"warmup_sizes: {size!r} is not WxH with multiples of 16")
            if not all(64 <= int(v) <= 2048 for v in (w, h)):
                raise ValueError(f"warmup_sizes: {size!r}: each side must be between 64 and 2048")
        return sizes

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _batches(cls, sizes: list[int]) -> list[int]:
        if not sizes or any(not 1 <= b <= 64 for b in sizes):
            raise ValueError(f"warmup_batch_sizes: each must be between 1 and 64, got {sizes}")
        return sizes

    def fast_path(self) -> FastPath:
        sizes = tuple(tuple(int(v) for v in s.split("x")) for s in self.warmup_sizes)
        return FastPath(
            compile=self.compile,
            cuda_graphs=self.cuda_graphs,
            attention=self.attention,
            quantize=self.quantize,
            dynamic=self.dynamic,
            new_shapes=self.new_shapes,
            max_shapes=self.max_shapes,
            warmup_sizes=sizes,
            warmup_batches=tuple(self.warmup_batch_sizes),
            backend=self.backend,
            freeze=self.freeze,
            autotune=self.autotune,
        )


class StageOptions(Options):
    """What every model stage's options share; each adds its Serve defaults and batch bound."""

    placement: Placement = Field(default_factory=Placement)
    fast: FastPathOptions = Field(default_factory=FastPathOptions)
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="how long a batch waits to fill (0: take what queued while the last batch ran)"
    )


class LRU:
    """An in-replica cache bounded by bytes (`size_of(value)`), least recently used out first."""

    def __init__(self, budget_bytes: int, size_of):
        self.budget, self.size_of = budget_bytes, size_of
        self.entries: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, key):
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        size = self.size_of(value)
        if size > self.budget or key in self.entries:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= self.size_of(old)

    def stats(self) -> dict:
        return {
            "cache_entries": len(self.entries),
            "cache_bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


class Stage:
    """Base of the model stages: `run` (async) and `on_worker` (blocking, for constructors) execute
    tensor work on the stage's worker thread."""

    def __init__(self, placement: Placement):
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=type(self).__name__)
        self.device, self.dtype = self.on_worker(placement.resolve)
        self._failing: set = set()  # the requests that failed since the last success (`judge`)
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # requests per batch, most recent last
        self._between_batches = asyncio.Event()  # see `gated`
        self._between_batches.set()

    async def through(self, batch_fn, *args):
        """One request through a `gated` @serve.batch method: it waits while a batch runs (to enter
        the next one with everything that arrived meanwhile); its failure is raised here."""
        await self._between_batches.wait()
        out = await batch_fn(*args)
        if isinstance(out, BaseException):
            raise out
        return out

    async def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "fast_path": self._fast_path_stats()}

    def speed_up(
        self, model, setup, warm_up, gated: str, cache: CompileCache | None = None, spec=None, **warm_kw
    ) -> None:
        """Sets `model` up for speed (klein.fast `setup`) and warms it up, on the worker thread,
        from the stage's `fast` options; `gated` names the model's attribute that klein.fast
        guards by shape when it compiles (for the stats). With `cache`, code compiled by inductor
        is shared with the stage's other replicas through storage (keyed by `spec`, the model's
        configuration, among others: deployments.stages.compile_cache). Runs in the constructor:
        the replica reports healthy only once it is done."""
        fast = self.options.fast.fast_path()
        start = time.perf_counter()
        done = self.on_worker(lambda: setup(model, fast))
        self._fast = {"setup": str(done)}

        def warm():
            return warm_up(model, fast, **warm_kw)

        compiling = fast.compile or fast.cuda_graphs
        if (
            cache is not None
            and compiling
            and fast.backend == "inductor"
            and self.options.fast.share_compiled
        ):
            what = {"model": spec, "fast": self.options.fast.model_dump(exclude={"share_compiled"})}
            warmed, use = self.on_worker(
                cache.around, type(self).__name__, self.device, self.dtype, what, warm
            )
            self._fast |= {"warm_up": str(warmed), "compile_cache": str(use)}
        else:
            warmed = self.on_worker(warm)
            self._fast["warm_up"] = str(warmed)
        self._fast["seconds"] = round(time.perf_counter() - start, 2)
        self._gate = getattr(model, gated, None)
        if compiling:
            metrics.warmed_up(type(self).__name__, self._fast["seconds"])
        if hasattr(self._gate, "on_eager"):  # klein.fast.ShapeGate: count what runs uncompiled
            self._gate.on_eager = functools.partial(metrics.uncompiled_call, type(self).__name__)
        said = "; ".join(  # an empty warm-up report only repeats "nothing to do"
            v for k, v in self._fast.items() if k != "seconds" and not (k == "warm_up" and warmed.empty)
        )
        log.info("%s fast path: %s (%.1f s in all)", type(self).__name__, said, self._fast["seconds"])

    def _fast_path_stats(self) -> dict:
        out = dict(getattr(self, "_fast", {}))
        gate = getattr(self, "_gate", None)
        if gate is not None and hasattr(gate, "eager_calls"):
            out |= {"compiled_shapes": len(gate.shapes), "eager_calls": gate.eager_calls}
        return out

    def on_worker(self, fn, *args):
        return self._worker.submit(fn, *args).result()

    async def attempt(self, fn, *args):
        """`fn` on the worker thread, outside the health bookkeeping (see `judge`)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def run(self, fn, *args, job: str | None = None):
        """`fn` on the worker thread, its outcome judged as one request's (`judge`)."""
        try:
            out = await self.attempt(fn, *args)
        except Exception as e:
            self.judge([job], [e])
            raise
        self.judge([job], [out])
        return out

    def judge(self, jobs: list[str | None], outcomes: list) -> None:
        """Health bookkeeping, request by request: `jobs` name them (job ids, prompts, content
        hashes), `outcomes` are their results or exceptions (a cancelled job did not fail). The
        replica turns unhealthy once requests for three different jobs failed with no success
        between, so one poisoned request that the ingress retries (the same job failing again and
        again) is not taken for a broken device. A batch is judged per request, after `isolating`
        has run a failed batch's requests one by one."""
        for job, out in zip(jobs, outcomes, strict=True):
            if not isinstance(out, BaseException) or isinstance(out, JobCancelled):
                self._failing.clear()
            else:
                self._failing.add(job if job is not None else object())  # an unnamed failure counts alone

    async def check_health(self) -> None:
        """The device still computes, and requests for different jobs do not keep failing."""
        if len(self._failing) >= 3:
            raise RuntimeError(
                f"{type(self).__name__}: requests for {len(self._failing)} different jobs failed in a row"
            )

        def probe():
            x = torch.ones(8, 8, device=self.device, dtype=self.dtype)
            if float((x @ x).sum()) != 512.0:
                raise RuntimeError(f"{type(self).__name__}: device {self.device} computes wrong results")

        await self.attempt(probe)


def gated(batch_fn):
    """Marks a stage's @serve.batch method (put it under the decorator) as running a batch: while
    it runs, `through` holds new arrivals, which then enter together as the next batch.

    Ray Serve (2.60) forms a batch as soon as its queue has an item and the wait timeout passed,
    before the batch may start (one runs at a time): with no wait, a busy stage queued batches of
    one behind each other and never batched. Waiting instead (batch_wait_timeout_s) would add its
    delay to every request at low load. Gated, a stage runs one request at once when idle and
    everything that arrived meanwhile when busy."""

    @functools.wraps(batch_fn)
    async def run_batch(self, *args):
        self._between_batches.clear()
        try:
            return await batch_fn(self, *args)
        finally:
            self._between_batches.set()

    return run_batch


def _one_by_one(what: str, items: list, error: Exception) -> None:
    log.warning(
        "%s: a batch of %d failed (%s: %s); running its requests one by one",
        what,
        len(items),
        type(error).__name__,
        error,
    )


async def isolating(run_batch, items: list, what: str) -> list:
    """`await run_batch(items)` -> one result per item; when the batch fails as a whole, its items
    are run again one by one, so a poisoned request (or one that tips the batch out of memory) fails
    alone and its batch-mates still get their results. Failures come back as exception objects."""
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
