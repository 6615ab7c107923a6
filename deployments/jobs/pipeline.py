"""One attempt at a job: the chain of stage calls.

Each call returns a `DeploymentResponse` that is passed straight to the next stage, so embeddings
and latents travel replica to replica through the object store; the ingress only ever holds the small
final result (or the image bytes, for a sync caller who asked for them).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from deployments import telemetry
from deployments.jobs.records import JobRecord, preview_key
from deployments.jobs.store import JobStore
from deployments.stages.payloads import (
    DenoiseParams,
    FinishParams,
    FinishResult,
    JobCancelled,
    PreviewPlan,
    RequestModerated,
)
from deployments.storage import Storage


@dataclass(frozen=True)
class StageHandles:
    """Handles of the model stages (Serve `DeploymentHandle`s, or fakes in tests)."""

    embedder: Any
    transformer: Any
    codec: Any


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    stages: StageHandles
    store: JobStore
    storage: Storage
    moderate_inputs: bool  # input images go through the safety classifier before any generation

    async def __call__(
        self, job: JobRecord, inputs: list[bytes] | None, return_bytes: bool, check_cancel: bool
    ) -> FinishResult:
        """embed -> [encode references] -> denoise -> finish (decode, safety, provenance, upload).
        `inputs`: the job's input files (images, then the mask) when this replica still holds them,
        else read back."""
        since = time.time()
        if check_cancel and await self.store.cancel_requested(job.id):  # the transformer checks between steps
            raise JobCancelled(job.id)
        r = job.request
        files = inputs or list(await asyncio.gather(*map(self.storage.get, r.input_files)))
        if any(b is None for b in files):
            raise RuntimeError(f"job {job.id}: an input image is missing from storage")
        images, mask = (files[:-1], files[-1]) if r.mask_key else (files, None)
        codec, embedder = self.stages.codec, self.stages.embedder
        if images and self.moderate_inputs and any(await codec.moderate.remote(images, r.safety_tolerance)):
            raise RequestModerated(job.id)
        cfg = r.guidance is not None and r.guidance > 1.0
        trace = telemetry.carrier() or None  # the job span's context, for every stage
        denoise = DenoiseParams(
            job_id=job.id,
            width=r.width,
            height=r.height,
            seed=r.seed,
            steps=r.steps,
            guidance=r.guidance if cfg else None,
            ref_shapes=tuple(map(tuple, r.ref_shapes)),
            trace=trace,
            since=since,
            loras=tuple((lora["key"], lora["scale"]) for lora in r.loras),
            attempt=job.attempts,
            preview=_preview_plan(job),
            strength=r.strength,
        )
        ctx = embedder.embed.remote(r.prompt, trace)
        neg = embedder.embed.remote("", None) if cfg else None
        refs = codec.encode.remote(images, trace, mask) if images else None
        latents = self.stages.transformer.denoise.remote(denoise, ctx, neg, refs)
        finish = FinishParams(
            job_id=job.id,
            key=job.output_key,
            output_format=r.output_format,
            prompt=r.prompt,
            model=job.model,
            seed=r.seed,
            return_bytes=return_bytes,
            trace=trace,
            safety_tolerance=r.safety_tolerance,
            input_keys=tuple(r.input_keys),
        )
        return await codec.finish.remote(latents, finish)


def _preview_plan(job: JobRecord) -> PreviewPlan | None:
    r = job.request
    if not r.previews:
        return None
    keys = tuple(preview_key(job.id, job.attempts, step) for step in r.previews)
    return PreviewPlan(tuple(r.previews), keys, r.safety_tolerance)
