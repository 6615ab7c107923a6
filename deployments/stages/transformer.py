"""FlowTransformer stage: batched denoising.

A batch is capped by tokens (image + reference), not by count (`batch_size_fn`). Inside a batch,
requests are grouped by (size, steps, CFG, reference shapes) and each group runs as one batch of
the model; every request keeps its own seed and noise. Between steps the stage asks its cancel
check (handed to it: it knows nothing of where jobs live) and stops a group once all of its jobs
are cancelled, reports the steps done to its progress sink, and sends the previews requests asked
for (the step's predicted clean latent) to the Codec, which renders and stores them: the worker
thread only copies the latent out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch
from pydantic import Field
from ray import serve
from torch import Tensor

from deployments import metrics, telemetry
from deployments.options import DeploymentOptions
from deployments.stages.adapters import Adapters
from deployments.stages.base import Stage, StageOptions, gated, isolating
from deployments.stages.compile_cache import CompileCache
from deployments.stages.payloads import (
    CancelCheck,
    DenoiseParams,
    JobCancelled,
    PreviewParams,
    ProgressSink,
    StepDone,
)
from klein import ModelSource
from klein import fast as fastpath
from klein.lora import LoraBank, LoraSelection, split_for_bank
from klein.pipeline import References, inpainting
from klein.preview import predicted_x0
from klein.sampler import sample, unpack

log = logging.getLogger(__name__)


class FlowTransformerOptions(StageOptions):
    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=16))
    max_batch_tokens: int = Field(
        32768, ge=1, description="image + reference tokens per batch (1 MP = 4096); at least one full request"
    )
    cancel_check_interval_s: float = Field(
        1.0, ge=0, description="how often running jobs are checked for cancel"
    )
    progress_interval_s: float = Field(
        0.25, ge=0, description="how often a running batch reports its step (first and last always)"
    )


@dataclass
class _Item:
    params: DenoiseParams
    ctx: Tensor
    neg: Tensor | None
    refs: References | None


def _step(steps):
    with torch.inference_mode():
        return next(steps)


@dataclass
class _Previews:
    """The step hook of a batch whose requests asked for previews: on the worker thread it copies
    the predicted clean latent of the rows due at that step to the CPU; the loop sends them on."""

    items: list[_Item]
    ready: list[tuple[int, Tensor]] = field(default_factory=list)  # (row, latent (L, C))

    def __call__(self, step: int, x_t: Tensor, velocity: Tensor, sigma: float) -> None:
        rows = [i for i, it in enumerate(self.items) if it.params.preview and step in it.params.preview.steps]
        if rows:
            index = torch.tensor(rows, device=x_t.device)
            x0 = predicted_x0(x_t[index], velocity[index], sigma).to(x_t.dtype).cpu()
            self.ready += zip(rows, x0.unbind(0), strict=True)

    def take(self) -> list[tuple[int, Tensor]]:
        out, self.ready = self.ready, []
        return out


@dataclass
class _Reported:
    """A batch's last progress report: when, and its write."""

    at: float = 0.0
    task: asyncio.Task | None = None


def _tokens(items: list[_Item]) -> int:
    return sum(item.params.tokens for item in items)


class FlowTransformer(Stage):
    def __init__(
        self,
        source: ModelSource,
        options: FlowTransformerOptions,
        cancel: CancelCheck | None = None,
        adapters: Adapters | None = None,
        progress: ProgressSink | None = None,
        previewer=None,
        tracing=None,
        compile_cache: CompileCache | None = None,
    ):
        """`adapters`: where LoRA adapters come from (deployments.stages.adapters); None: no LoRA.
        `progress`: where steps done are reported; `previewer`: a handle to the Codec (its
        `previews`), which renders requests' previews; without it none are made. `compile_cache`:
        where compiled code is shared with the other replicas (deployments.stages.compile_cache)."""
        super().__init__(options.placement)
        telemetry.setup(tracing or telemetry.TelemetryOptions(), "FlowTransformer")
        self.spec = source.spec
        quantize = options.fast.fast_path().quantize  # FP8 block linears as they are read
        self.model = self.on_worker(
            lambda: source.load_transformer(self.device, self.dtype, quantize=quantize)
        )
        self.cancel, self.progress, self.previewer = cancel, progress, previewer
        self._background: set[asyncio.Task] = set()  # progress writes and previews under way
        self.options = options
        self.adapters, self.bank = adapters, None
        if adapters is not None:  # before the fast path: warm-up covers the adapter path
            s = adapters.settings
            self.bank = self.on_worker(lambda: LoraBank(self.model, s.slots, s.max_rank, places=s.max_loras))
        self.speed_up(
            self.model,
            fastpath.setup_transformer,
            fastpath.warm_up_transformer,
            "forward",
            cache=compile_cache,
            spec=(
                self.spec,
                adapters
                and (adapters.settings.slots, adapters.settings.max_rank, adapters.settings.max_loras),
            ),  # the LoRA bank is in the graphs
            cfg=self.spec.sampling.cfg,
            multiple=self.spec.multiple,
        )
        self._batched.set_max_batch_size(options.max_batch_tokens)
        self._batched.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    async def denoise(
        self, params: DenoiseParams, ctx: Tensor, neg: Tensor | None = None, refs: References | None = None
    ) -> Tensor:
        """-> normalised packed latents (C, h, w) on the CPU, in the model dtype."""
        if params.tokens > self.options.max_batch_tokens:
            raise ValueError(
                f"request has {params.tokens} tokens, over max_batch_tokens {self.options.max_batch_tokens}"
            )
        return await self.through(self._batched, _Item(params, ctx, neg, refs))

    @serve.batch(max_batch_size=32768, batch_wait_timeout_s=0.0, batch_size_fn=_tokens)
    @gated
    async def _batched(self, items: list[_Item]) -> list[Tensor | BaseException]:
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.params.group, []).append(i)
        results: list[Tensor | BaseException | None] = [None] * len(items)
        for idx in (part for group in groups.values() for part in self._fit_bank(group, items)):
            # a failing group fails alone, and within it only the culprit
            outs = await isolating(self._run_group, [items[i] for i in idx], "denoise")
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
            self.judge([items[i].params.job_id for i in idx], outs)
        return results

    def _fit_bank(self, group: list[int], items: list[_Item]) -> list[list[int]]:
        """A group cut where its requests need more adapters at once than the bank holds."""
        if self.bank is None:
            return [group]
        keys = [{key for key, _ in items[i].params.loras} for i in group]
        return [[group[j] for j in part] for part in split_for_bank(keys, self.bank.capacity)]

    async def _selection(self, items: list[_Item]) -> LoraSelection | None:
        """The requests' adapters in the bank, loading those not resident (their bytes read here,
        parsed and written into slots on the worker thread)."""
        wanted = [list(it.params.loras) for it in items]
        if not any(wanted):
            return None
        if self.bank is None:
            raise ValueError("this deployment serves no LoRA adapters")
        start, loaded = time.time_ns(), {}
        used = {k for adapters in wanted for k, _ in adapters}
        for key in used - set(self.bank.resident):
            loaded[key] = await self.adapters.load(key)
        selection = await self.attempt(self.bank.selection, wanted, loaded.__getitem__)
        metrics.lora_adapters(len(loaded), len(used) - len(loaded), (time.time_ns() - start) / 1e9)
        traces = [it.params.trace for it in items if it.params.loras]
        telemetry.record("lora", traces, start, adapters=len(used), loaded=len(loaded))
        return selection

    def _start(self, items: list[_Item], lora: LoraSelection | None = None, hook: _Previews | None = None):
        """The batch's sampling generator (its inputs stacked here, on the worker thread)."""
        p, refs = items[0].params, items[0].refs
        cfg = p.guidance is not None
        with torch.inference_mode():  # inference tensors, as the warm-up made (compiled code is specific)
            ctx = torch.stack([it.ctx for it in items])
            neg = torch.stack([it.neg for it in items]) if cfg else None
            has_refs = refs is not None and refs.tokens is not None
            ref = torch.cat([it.refs.tokens for it in items]) if has_refs else None
            inpaint = (
                inpainting([it.refs for it in items], p.steps, p.strength) if p.strength is not None else None
            )
        return sample(
            self.model,
            ctx,
            [it.params.seed for it in items],
            p.height,
            p.width,
            p.steps,
            neg_ctx=neg,
            guidance=torch.tensor([it.params.guidance for it in items]) if cfg else None,
            ref=ref,
            ref_shapes=refs.shapes if refs is not None else (),
            pixels_per_token=self.spec.multiple,
            lora=lora,
            hook=hook,
            inpaint=inpaint,
        )

    async def _cancelled(self, jobs: list[str]) -> set[str]:
        """The jobs cancelled by their clients; a failed check (storage unreachable) counts as none:
        it must not fail the batch."""
        if self.cancel is None:
            return set()
        try:
            return await self.cancel(jobs)
        except Exception as e:
            log.warning("denoise: cancel check failed (%s: %s); going on", type(e).__name__, e)
            return set()

    def _latents(self, img: Tensor, p: DenoiseParams) -> list[Tensor]:
        m = self.spec.multiple
        return [z.clone() for z in unpack(img, p.height // m, p.width // m).cpu().unbind(0)]

    async def _run_group(self, items: list[_Item]) -> list[Tensor | BaseException]:
        p = items[0].params
        jobs = [it.params.job_id for it in items]
        self.batch_sizes.append(len(items))
        lora = await self._selection(items)
        previews = _Previews(items) if self.previewer and any(it.params.preview for it in items) else None
        steps = await self.attempt(self._start, items, lora, previews)
        cancelled: set[str] = set()
        # checked before the first step too once a job has waited (queued here or upstream) that long
        last_check = min(it.params.since or time.time() for it in items)
        start = time.time_ns()
        img, reported = None, _Reported()
        for step in range(1, p.run_steps + 1):
            if time.time() - last_check >= self.options.cancel_check_interval_s:
                last_check = time.time()
                cancelled = await self._cancelled(jobs)
                if len(cancelled) == len(items):
                    break
            img = await self.attempt(_step, steps)
            if previews is not None and (ready := previews.take()):
                self._send_previews([items[row].params for row, _ in ready], step, [x0 for _, x0 in ready])
            self._report(items, step, reported)
        if img is None:  # every job was cancelled before its first step
            return [JobCancelled(it.params.job_id) for it in items]
        latents = await self.attempt(self._latents, img, p)
        telemetry.record(
            "denoise", [it.params.trace for it in items], start, batch_size=len(items), steps=p.steps
        )
        metrics.stage_batch("denoise", len(items), (time.time_ns() - start) / 1e9)
        return [
            JobCancelled(it.params.job_id) if it.params.job_id in cancelled else z
            for z, it in zip(latents, items, strict=True)
        ]

    def _report(self, items: list[_Item], step: int, reported: _Reported) -> None:
        """Tell the progress sink the batch's step, in the background: the first and last steps,
        and others once `progress_interval_s` has passed and the last report is written."""
        if self.progress is None:
            return
        last = step == items[0].params.run_steps
        busy = reported.task is not None and not reported.task.done()
        if not (
            step == 1 or last or (time.time() - reported.at >= self.options.progress_interval_s and not busy)
        ):
            return
        done = [StepDone(it.params.job_id, it.params.attempt, step, it.params.run_steps) for it in items]
        reported.at, reported.task = time.time(), self._spawn(self._write_progress(reported.task, done))

    async def _write_progress(self, before: asyncio.Task | None, done: list[StepDone]) -> None:
        if before is not None:  # in order: a late write must not overwrite a later step
            await asyncio.wait([before])
        try:
            await self.progress(done)
        except Exception as e:  # progress is for watchers: a failed write must not fail the batch
            log.warning("progress report failed (%s: %s)", type(e).__name__, e)

    def _send_previews(self, requests: list[DenoiseParams], step: int, latents: list[Tensor]) -> None:
        """One call to the Codec for the step's previews, in the background."""
        m = self.spec.multiple
        params = [
            PreviewParams(
                p.job_id, p.preview.key(step), (p.height // m, p.width // m), p.preview.safety_tolerance
            )
            for p in requests
        ]

        async def send():
            try:
                await self.previewer.previews.remote(latents, params)
            except Exception as e:  # previews are for watchers: the batch goes on
                log.warning("previews at step %d failed (%s: %s)", step, type(e).__name__, e)

        self._spawn(send())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def stats(self) -> dict:
        out = await super().stats()
        if self.bank is not None:
            out["lora"] = self.bank.stats() | self.adapters.stats()
        return out
