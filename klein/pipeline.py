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

from klein import fast as fastpath
from klein.config import ModelSpec
from klein.fast import FastPath
from klein.image import prepare_reference, to_pil
from klein.inpaint import Inpaint, prepare_mask, prepare_source
from klein.loader import ModelSource
from klein.lora import LoraBank, LoraOptions, LoraSelection, load_lora, split_for_bank
from klein.request import GenerationRequest, start_step, validate
from klein.sampler import pack, reference_ids, sample, unpack
from klein.vae import AutoEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class References:
    """Encoded reference images of one request: packed tokens, their token grids and pixels."""

    tokens: Tensor | None  # (1, L_ref, C); None without references
    shapes: tuple[tuple[int, int], ...]  # token grid (h, w) of each reference
    pixels: int  # sum of processed reference pixels (metering: input megapixels)
    mask: Tensor | None = None  # inpainting: (L_img, 1) on the first reference's (the source's) grid

    @property
    def source(self) -> Tensor:
        """An inpainting's packed source latents (1, L_img, C): the first reference's tokens."""
        h, w = self.shapes[0]
        return self.tokens[:, : h * w]

    @property
    def ids(self) -> Tensor:
        return reference_ids(list(self.shapes))


@torch.inference_mode()
def encode_references(
    vae: AutoEncoder, spec: ModelSpec, images: tuple[Image.Image, ...], mask: Image.Image | None = None
) -> References:
    """Resize/crop each reference like diffusers, VAE-encode it, and pack its tokens in order. With
    a `mask` the first image is an inpainting's source: resized as the inpaint pipeline does."""
    latents, pixels = [], 0
    for k, image in enumerate(images):
        if k == 0 and mask is not None:
            x = prepare_source(image, spec.multiple)
        else:
            x = prepare_reference(image, spec.reference_max_pixels, spec.multiple)
        pixels += x.shape[-1] * x.shape[-2]
        latents.append(vae.encode(x.to(vae.device)))  # (1, C, h, w)
    shapes = tuple((z.shape[-2], z.shape[-1]) for z in latents)
    tokens = torch.cat([pack(z) for z in latents], dim=1) if latents else None
    grid = None
    if mask is not None:
        (h, w), m = shapes[0], spec.multiple
        grid = prepare_mask(mask, w * m, h * m, m)
    return References(tokens, shapes, pixels, grid)


def inpainting(refs: list[References], steps: int, strength: float | None) -> Inpaint | None:
    """A batch's inpainting (its requests all repaint, from the same step), or None."""
    if refs[0].mask is None:
        return None
    source = torch.cat([r.source for r in refs])
    mask = torch.stack([r.mask for r in refs])
    return Inpaint(source, mask, start_step(steps, strength))


class Pipeline:
    def __init__(
        self,
        source: ModelSource,
        device: str | torch.device = "cpu",
        dtype=torch.float32,
        fast: FastPath | None = None,
        lora: LoraOptions | None = None,
    ):
        """`fast`: the fast path's options (klein.fast); `warm_up` compiles their sizes. `lora`: the
        adapter bank's size (klein.lora), made now so that warm-up covers it; without it, the first
        request with adapters makes one of the default size."""
        self.source = source
        self.spec = source.spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.fast = fast or FastPath()
        self.text_embedder = source.load_text_embedder(device, dtype)
        self.transformer = source.load_transformer(device, dtype, quantize=self.fast.quantize)
        self.vae = source.load_vae(device, dtype)
        self._negative: Tensor | None = None
        self.lora_options = lora or LoraOptions()
        self.lora_bank = None if lora is None else self._bank()
        self.reports = [
            fastpath.setup_text_embedder(self.text_embedder, self.fast),
            fastpath.setup_transformer(self.transformer, self.fast),
            fastpath.setup_vae(self.vae, self.fast),
        ]
        for report in self.reports:
            log.info("%s", report)

    def warm_up(self, cfg: bool | None = None) -> list[fastpath.Report]:
        """Runs every component once per configured size and batch size (compiling them), before
        any request; `cfg` (default: the variant's) warms the transformer for CFG's double batch."""
        cfg = self.spec.sampling.cfg if cfg is None else cfg
        reports = [
            fastpath.warm_up_text_embedder(self.text_embedder, self.fast),
            fastpath.warm_up_transformer(self.transformer, self.fast, cfg=cfg, multiple=self.spec.multiple),
            fastpath.warm_up_vae(self.vae, self.fast, self.spec.multiple),
        ]
        for report in reports:
            log.info("%s", report)
        return reports

    def _bank(self) -> LoraBank:
        o = self.lora_options
        return LoraBank(self.transformer, slots=o.slots, max_rank=o.max_rank, places=o.max_loras)

    def lora_selection(self, requests: list[GenerationRequest]) -> LoraSelection | None:
        """The requests' adapters (by file path) in the bank; None when none has any."""
        if not any(r.loras for r in requests):
            return None
        if self.lora_bank is None:
            self.lora_bank = self._bank()
        adapters = [[(lora.path, lora.scale) for lora in r.loras] for r in requests]
        return self.lora_bank.selection(adapters, lambda path: load_lora(path, self.spec.transformer))

    def embed(self, prompts: list[str]) -> Tensor:
        """(B, 512, context_dim)."""
        return self.text_embedder(prompts)

    def negative_embedding(self) -> Tensor:
        """The empty prompt's embedding (CFG's unconditional branch), computed once."""
        if self._negative is None:
            self._negative = self.embed([""])
        return self._negative

    def encode_references(
        self, images: tuple[Image.Image, ...], mask: Image.Image | None = None
    ) -> References:
        return encode_references(self.vae, self.spec, images, mask)

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
        """Embed and denoise one group of complete requests of the same shape -> latents (B, C, h, w)."""
        return self.denoise(requests, self.embed([r.prompt for r in requests]), refs, on_step)

    @torch.inference_mode()
    def denoise(
        self,
        requests: list[GenerationRequest],
        ctx: Tensor,
        refs: list[References],
        on_step: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Denoise one group of complete requests of the same shape, their prompts embedded (`ctx`,
        one row each) -> latents (B, C, h, w)."""
        first = requests[0]
        cfg = self.spec.sampling.cfg and first.guidance > 1.0  # guidance 1: the uncond branch cancels out
        steps = sample(
            self.transformer,
            ctx,
            [r.seed for r in requests],
            first.height,
            first.width,
            first.steps,
            neg_ctx=self.negative_embedding().expand(len(requests), -1, -1) if cfg else None,
            guidance=torch.tensor([r.guidance for r in requests]) if cfg else None,
            ref=torch.cat([r.tokens for r in refs]) if refs[0].tokens is not None else None,
            ref_shapes=refs[0].shapes,
            pixels_per_token=self.spec.multiple,
            lora=self.lora_selection(requests),
            inpaint=inpainting(refs, first.steps, first.strength),
        )
        img = None
        for i, latents in enumerate(steps, start=1):
            img = latents
            if on_step is not None:
                on_step(i, first.run_steps)
        m = self.spec.multiple
        return unpack(img, first.height // m, first.width // m)

    def _fit_bank(self, group: list[int], requests: list[GenerationRequest]) -> list[list[int]]:
        """A group split where its requests need more adapters at once than the bank holds."""
        keys = [{lora.path for lora in requests[i].loras} for i in group]
        return [[group[j] for j in part] for part in split_for_bank(keys, self.lora_options.slots - 1)]

    def generate(
        self, requests: list[GenerationRequest], on_step: Callable[[int, int], None] | None = None
    ) -> list[Image.Image]:
        """Validate, group by shape, run each group as a batch; images come back in request order."""
        requests = [validate(self.spec, r, self.lora_options.max_loras) for r in requests]
        refs = [self.encode_references(r.references, r.mask) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, (r, ref) in enumerate(zip(requests, refs, strict=True)):
            start = start_step(r.steps, r.strength) if r.mask is not None else None  # None: no inpainting
            key = (r.width, r.height, r.steps, r.guidance is not None and r.guidance > 1.0, ref.shapes, start)
            groups.setdefault(key, []).append(i)
        images: list[Image.Image | None] = [None] * len(requests)
        for idx in (part for group in groups.values() for part in self._fit_bank(group, requests)):
            latents = self.generate_latents([requests[i] for i in idx], [refs[i] for i in idx], on_step)
            for i, image in zip(idx, self.decode(latents), strict=True):
                images[i] = image
        return images
