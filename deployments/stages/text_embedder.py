"""TextEmbedder stage: batched Qwen3 prompt embedding with an in-replica LRU cache by prompt."""

from __future__ import annotations

import time

from pydantic import Field
from ray import serve
from torch import Tensor

from deployments import metrics, telemetry
from deployments.options import DeploymentOptions
from deployments.stages.base import LRU, Stage, StageOptions, gated, isolating
from deployments.stages.compile_cache import CompileCache
from klein import ModelSource
from klein import fast as fastpath


class TextEmbedderOptions(StageOptions):
    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=32))
    max_batch_size: int = Field(8, ge=1, description="prompts per forward")
    cache_mb: int = Field(256, ge=0, description="LRU cache of embeddings by prompt, in MB (0: off)")


class TextEmbedder(Stage):
    def __init__(
        self,
        source: ModelSource,
        options: TextEmbedderOptions,
        tracing=None,
        compile_cache: CompileCache | None = None,
    ):
        super().__init__(options.placement)
        telemetry.setup(tracing or telemetry.TelemetryOptions(), "TextEmbedder")
        self.embedder = self.on_worker(source.load_text_embedder, self.device, self.dtype)
        self.options = options
        self.speed_up(self.embedder, fastpath.setup_text_embedder, fastpath.warm_up_text_embedder, "encode",
                      cache=compile_cache, spec=source.spec)  # fmt: skip
        self.cache = LRU(options.cache_mb * 2**20, lambda t: t.numel() * t.element_size())
        self._embed_batch.set_max_batch_size(options.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    def embed_now(self, prompts: list[str]) -> list[Tensor]:
        """Embeddings (512, context_dim) on the CPU, from the cache or one forward for the rest."""
        out = {p: emb for p in dict.fromkeys(prompts) if (emb := self.cache.get(p)) is not None}
        todo = [p for p in dict.fromkeys(prompts) if p not in out]
        if todo:
            for p, emb in zip(todo, self.embedder(todo).cpu().unbind(0), strict=True):
                out[p] = emb.clone()
                self.cache.put(p, out[p])
        return [out[p] for p in prompts]

    async def embed(self, prompt: str, trace: dict | None = None) -> Tensor:
        """One prompt's embedding; calls are batched across requests."""
        return await self.through(self._embed_batch, prompt, trace)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    @gated
    async def _embed_batch(
        self, prompts: list[str], traces: list[dict | None]
    ) -> list[Tensor | BaseException]:
        self.batch_sizes.append(len(prompts))
        start = time.time_ns()

        out = await isolating(lambda batch: self.attempt(self.embed_now, batch), prompts, "embed")
        self.judge(prompts, out)  # per prompt: a poisoned one counts once, however often retried
        telemetry.record("embed", traces, start, batch_size=len(prompts))
        metrics.stage_batch("embed", len(prompts), (time.time_ns() - start) / 1e9)
        return out

    async def stats(self) -> dict:
        return await super().stats() | self.cache.stats()
