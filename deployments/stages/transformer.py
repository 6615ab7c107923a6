"""FlowTransformer stage: batched denoising.

A batch is capped by tokens (image + reference), not by count (`batch_size_fn`). Inside a batch,
requests are grouped by (size, steps, CFG, reference shapes) and each group runs as one batch of
the model; every request keeps its own seed and noise. Between steps the stage asks its cancel
check (handed to it: it knows nothing of where jobs live) and stops a group once all of its jobs
are cancelled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from pydantic import Field
from ray import serve
from torch import Tensor

from deployments import metrics, telemetry
from deployments.options import DeploymentOptions
from deployments.stages.adapters import Adapters
from deployments.stages.base import Stage, StageOptions, gated, isolating
from deployments.stages.payloads import CancelCheck, DenoiseParams, JobCancelled
from klein import ModelSource
from klein import fast as fastpath
from klein.lora import LoraBank, LoraSelection, split_for_bank
from klein.pipeline import References
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


@dataclass
class _Item:
    params: DenoiseParams
    ctx: Tensor
    neg: Tensor | None
    refs: References | None


def _step(steps):
    with torch.inference_mode():
        return next(steps)


def _tokens(items: list[_Item]) -> int:
    return sum(item.params.tokens for item in items)


class FlowTransformer(Stage):
    def __init__(
        self,
        source: ModelSource,
        options: FlowTransformerOptions,
        cancel: CancelCheck | None = None,
        adapters: Adapters | None = None,
        tracing=None,
    ):
        """`adapters`: where LoRA adapters come from (deployments.stages.adapters); None: no LoRA."""
        super().__init__(options.placement)
        telemetry.setup(tracing or telemetry.TelemetryOptions(), "FlowTransformer")
        self.spec = source.spec
        self.model = self.on_worker(source.load_transformer, self.device, self.dtype)
        self.cancel = cancel
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

    def _start(self, items: list[_Item], lora: LoraSelection | None = None):
        """The batch's sampling generator (its inputs stacked here, on the worker thread)."""
        p, refs = items[0].params, items[0].refs
        cfg = p.guidance is not None
        with torch.inference_mode():  # inference tensors, as the warm-up made (compiled code is specific)
            ctx = torch.stack([it.ctx for it in items])
            neg = torch.stack([it.neg for it in items]) if cfg else None
            has_refs = refs is not None and refs.tokens is not None
            ref = torch.cat([it.refs.tokens for it in items]) if has_refs else None
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
        steps = await self.attempt(self._start, items, lora)
        cancelled: set[str] = set()
        # checked before the first step too once a job has waited (queued here or upstream) that long
        last_check = min(it.params.since or time.time() for it in items)
        start = time.time_ns()
        img = None
        for _ in range(p.steps):
            if time.time() - last_check >= self.options.cancel_check_interval_s:
                last_check = time.time()
                cancelled = await self._cancelled(jobs)
                if len(cancelled) == len(items):
                    break
            img = await self.attempt(_step, steps)
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

    async def stats(self) -> dict:
        out = await super().stats()
        if self.bank is not None:
            out["lora"] = self.bank.stats() | self.adapters.stats()
        return out
