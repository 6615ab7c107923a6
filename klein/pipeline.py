"""All stages in one process: text embedding, reference encoding, denoising, decoding.

Used by `klein generate`, by the tests, and as the baseline the served DAG is measured against.
Requests that share a shape (size, steps, guidance, reference shapes) run as one batch; each keeps
its own seed and noise, so an image never depends on what it was batched with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from klein.image import prepare_reference, to_pil
from klein.loader import ModelSource
from klein.request import GenerationRequest, validate
from klein.sampler import (
    denoise,
    denoise_cfg,
    get_schedule,
    grid_ids,
    initial_noise,
    pack,
    reference_ids,
    text_ids,
    unpack,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class References:
    """Encoded reference images of one request: packed tokens and their RoPE ids."""

    tokens: Tensor  # (1, L_ref, C)
    ids: Tensor  # (L_ref, 4)
    shapes: tuple[tuple[int, int], ...]  # token grid (h, w) of each reference
    pixels: int  # sum of processed reference pixels (metering: input megapixels)


class Pipeline:
    def __init__(self, source: ModelSource, device: str | torch.device = "cpu", dtype=torch.float32):
        self.source = source
        self.spec = source.spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_embedder = source.load_text_embedder(device, dtype)
        self.transformer = source.load_transformer(device, dtype)
        self.vae = source.load_vae(device, dtype)
        self._negative: Tensor | None = None

    def embed(self, prompts: list[str]) -> Tensor:
        """(B, 512, context_dim)."""
        return self.text_embedder(prompts)

    def negative_embedding(self) -> Tensor:
        """The empty prompt's embedding (CFG's unconditional branch), computed once."""
        if self._negative is None:
            self._negative = self.embed([""])
        return self._negative

    @torch.inference_mode()
    def encode_references(self, images: tuple[Image.Image, ...]) -> References:
        latents = []
        pixels = 0
        for image in images:
            x = prepare_reference(image, self.spec.reference_max_pixels, self.spec.multiple)
            pixels += x.shape[-1] * x.shape[-2]
            latents.append(self.vae.encode(x.to(self.device)))  # (1, C, h, w)
        shapes = tuple((z.shape[-2], z.shape[-1]) for z in latents)
        tokens = torch.cat([pack(z) for z in latents], dim=1) if latents else None
        return References(tokens, reference_ids(list(shapes)), shapes, pixels)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        """(B, C, h, w) normalised packed latents -> images."""
        return to_pil(self.vae.decode(latents))

    @torch.inference_mode()
    def generate_latents(
        self,
        requests: list[GenerationRequest],
        refs: list[References],
        on_step: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Denoise one group of complete requests of the same shape -> latents (B, C, h, w)."""
        first = requests[0]
        h, w = first.height // self.spec.multiple, first.width // self.spec.multiple
        b = len(requests)
        ctx = self.embed([r.prompt for r in requests])
        noise = torch.cat(
            [
                initial_noise(r.seed, r.height, r.width, self.spec.vae.latent_channels, self.spec.multiple)
                for r in requests
            ]
        ).to(self.device, self.dtype)
        img_ids = grid_ids(h, w).expand(b, -1, -1).to(self.device)
        ctx_ids = text_ids(ctx.shape[1]).expand(b, -1, -1).to(self.device)
        ref = ref_ids = None
        if refs[0].tokens is not None:
            ref = torch.cat([r.tokens for r in refs])
            ref_ids = refs[0].ids.expand(b, -1, -1).to(self.device)
        sigmas = get_schedule(first.steps, h * w)
        if self.spec.sampling.cfg and first.guidance > 1.0:
            neg = self.negative_embedding().expand(b, -1, -1)
            g = torch.tensor([r.guidance for r in requests])
            steps = denoise_cfg(self.transformer, noise, img_ids, ctx, neg, ctx_ids, sigmas, g, ref, ref_ids)
        else:  # distilled, or guidance 1 (the unconditional branch cancels out)
            steps = denoise(self.transformer, noise, img_ids, ctx, ctx_ids, sigmas, ref, ref_ids)
        img = noise
        for i, latents in enumerate(steps, start=1):
            img = latents
            if on_step is not None:
                on_step(i, first.steps)
        return unpack(img, h, w)

    def generate(
        self, requests: list[GenerationRequest], on_step: Callable[[int, int], None] | None = None
    ) -> list[Image.Image]:
        """Validate, group by shape, run each group as a batch; images come back in request order."""
        requests = [validate(self.spec, r) for r in requests]
        refs = [self.encode_references(r.references) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, (r, ref) in enumerate(zip(requests, refs, strict=True)):
            key = (r.width, r.height, r.steps, r.guidance is not None and r.guidance > 1.0, ref.shapes)
            groups.setdefault(key, []).append(i)
        images: list[Image.Image | None] = [None] * len(requests)
        for idx in groups.values():
            latents = self.generate_latents([requests[i] for i in idx], [refs[i] for i in idx], on_step)
            for i, image in zip(idx, self.decode(latents), strict=True):
                images[i] = image
        return images
