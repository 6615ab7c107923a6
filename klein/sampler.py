"""Flow-matching sampling for FLUX.2 [klein]: empirical-mu schedule, seeded noise, position ids,
and the Euler loops (single pass for distilled models, two-pass CFG for Base).

Follows BFL flux2 `sampling.py` and diffusers `Flux2KleinPipeline` (numerics of the latter: the
Euler update runs in float32 and the latents are kept in the model dtype between steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from klein.inpaint import Inpaint, blend, noised
from klein.transformer import Flux2, LoraSelection

REFERENCE_T_SCALE = 10  # reference k (0-based) sits at t = 10 + 10 k on RoPE axis 0

# Called during step i (1-based) with the latents before it, the velocity the model predicted (guided,
# float32) and the step's sigma: what a preview needs (klein.preview.predicted_x0). It must not
# change the tensors it is given.
StepHook = Callable[[int, Tensor, Tensor, float], None]


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Schedule shift fitted by BFL on (tokens, steps); past 4300 tokens it ignores the step count."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return a2 * image_seq_len + b2
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return a * num_steps + b


def get_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 sigmas from 1 (noise) to 0 (image), shifted by exp(mu) / (exp(mu) + 1/t - 1).
    In float32 arithmetic, as diffusers' FlowMatchEulerDiscreteScheduler computes them: a sigma an
    ulp away from theirs moves a step's bf16 rounding."""
    mu = compute_empirical_mu(image_seq_len, num_steps)
    t = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    shifted = np.float32(math.exp(mu)) / (np.float32(math.exp(mu)) + (np.float32(1) / t - np.float32(1)))
    return [float(s) for s in shifted.astype(np.float32)] + [0.0]


def initial_noise(seed: int, height: int, width: int, channels: int, pixels_per_token: int = 16) -> Tensor:
    """Packed noise (1, L, C) for one request: the same draw as diffusers' Flux2KleinPipeline with
    `torch.Generator("cpu").manual_seed(seed)` and batch size 1, whatever device runs the model."""
    generator = torch.Generator("cpu").manual_seed(seed)
    h, w = height // pixels_per_token, width // pixels_per_token
    noise = torch.randn((1, channels, h, w), generator=generator, dtype=torch.float32)
    return rearrange(noise, "B C h w -> B (h w) C")


def grid_ids(h: int, w: int, t: int = 0) -> Tensor:
    """(h*w, 4) ids (t, row, col, 0) in row-major token order."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.zeros(h * w, 4, dtype=torch.int64)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, rows.flatten(), cols.flatten()
    return ids


def text_ids(length: int) -> Tensor:
    """(L, 4) ids (0, 0, 0, i): text tokens rotate on the last axis only."""
    ids = torch.zeros(length, 4, dtype=torch.int64)
    ids[:, 3] = torch.arange(length)
    return ids


def reference_ids(shapes: list[tuple[int, int]]) -> Tensor:
    """Ids for reference token grids (h, w), concatenated in order, each at t = 10, 20, ..."""
    if not shapes:
        return torch.zeros(0, 4, dtype=torch.int64)
    return torch.cat([grid_ids(h, w, REFERENCE_T_SCALE * (k + 1)) for k, (h, w) in enumerate(shapes)])


def pack(latents: Tensor) -> Tensor:
    return rearrange(latents, "B C h w -> B (h w) C")


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    return rearrange(tokens, "B (h w) C -> B C h w", h=h, w=w)


def _euler(img: Tensor, pred: Tensor, t_curr: float, t_next: float) -> Tensor:
    """One Euler step, written as diffusers' FlowMatchEulerDiscreteScheduler.step writes it, so
    that torch rounds it alike: dt is a float32 CPU scalar tensor times the prediction (with a bf16
    prediction, torch rounds that dt to bf16 on the CPU and not on CUDA), added to the latents in
    float32, the sum back in the latents' dtype."""
    dt = torch.tensor(t_next, dtype=torch.float32) - torch.tensor(t_curr, dtype=torch.float32)
    return (img.float() + dt * pred).to(img.dtype)


def denoise(
    model: Flux2,
    img: Tensor,
    img_ids: Tensor,
    ctx: Tensor,
    ctx_ids: Tensor,
    sigmas: list[float],
    ref: Tensor | None = None,
    ref_ids: Tensor | None = None,
    lora: LoraSelection | None = None,
    hook: StepHook | None = None,
    repaint: tuple[Inpaint, Tensor] | None = None,
) -> Iterator[Tensor]:
    """Distilled sampling: one forward per step. Yields the latents (B, L_img, C) after each step,
    so the caller can report progress or stop between steps.

    img/img_ids: noise tokens and their ids; ref/ref_ids: reference tokens, attended after them;
    lora: each request's LoRA adapters (klein.lora); hook: sees each step's prediction;
    repaint: (inpainting, its noise): the unmasked latents follow the source after each step.
    """
    x_ids = img_ids if ref_ids is None else torch.cat((img_ids, ref_ids), dim=1)
    pe = model.rope(ctx_ids, x_ids)
    for i, (t_curr, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True), start=1):
        t = torch.full((1,), t_curr, device=img.device)  # shared by the batch (see Flux2.forward)
        pred = model(img, t, ctx, pe, ref, lora)
        if hook is not None:
            hook(i, img, pred, t_curr)
        img = _euler(img, pred, t_curr, t_next)
        if repaint is not None:
            img = blend(img, repaint[0], repaint[1], t_next, last=i == len(sigmas) - 1)
        yield img


def denoise_cfg(
    model: Flux2,
    img: Tensor,
    img_ids: Tensor,
    ctx: Tensor,
    neg_ctx: Tensor,
    ctx_ids: Tensor,
    sigmas: list[float],
    guidance: float | Tensor,
    ref: Tensor | None = None,
    ref_ids: Tensor | None = None,
    lora: LoraSelection | None = None,
    hook: StepHook | None = None,
    repaint: tuple[Inpaint, Tensor] | None = None,
) -> Iterator[Tensor]:
    """Base-model sampling with classifier-free guidance: v = v_neg + g (v_cond - v_neg).

    The unconditional and conditional halves run as one batch of 2B; `guidance` is a float or a
    (B,) tensor. Yields the latents after each step, like `denoise`.
    """
    x_ids = img_ids if ref_ids is None else torch.cat((img_ids, ref_ids), dim=1)
    pe = model.rope(torch.cat((ctx_ids, ctx_ids)), torch.cat((x_ids, x_ids)))
    ctx2 = torch.cat((neg_ctx, ctx))  # (2B, L_txt, D): [uncond; cond]
    ref2 = None if ref is None else torch.cat((ref, ref))
    g = torch.as_tensor(guidance, dtype=torch.float32, device=img.device).reshape(-1, 1, 1)
    lora2 = None if lora is None else lora.repeat(2)  # the adapters act on both halves
    for i, (t_curr, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True), start=1):
        t = torch.full((1,), t_curr, device=img.device)
        pred_neg, pred_cond = model(torch.cat((img, img)), t, ctx2, pe, ref2, lora2).chunk(2)
        # in the model's dtype, as diffusers combines them (g a float32 scalar per request)
        pred = pred_neg + (g * (pred_cond - pred_neg).float()).to(pred_neg.dtype)
        if hook is not None:
            hook(i, img, pred, t_curr)
        img = _euler(img, pred, t_curr, t_next)
        if repaint is not None:
            img = blend(img, repaint[0], repaint[1], t_next, last=i == len(sigmas) - 1)
        yield img


def sample(
    model: Flux2,
    ctx: Tensor,
    seeds: list[int],
    height: int,
    width: int,
    steps: int,
    *,
    neg_ctx: Tensor | None = None,
    guidance: Tensor | None = None,
    ref: Tensor | None = None,
    ref_shapes: tuple[tuple[int, int], ...] = (),
    pixels_per_token: int = 16,
    lora: LoraSelection | None = None,
    hook: StepHook | None = None,
    inpaint: Inpaint | None = None,
) -> Iterator[Tensor]:
    """Sample a batch that shares size, step count and reference shapes; each request has its own
    seed (noise), prompt (`ctx`, (B, L, D)) and references (`ref`, (B, L_ref, C)).

    `guidance` (B,) with `neg_ctx` runs CFG; None runs the distilled single pass. Yields the packed
    latents (B, L_img, C) after each step (see `denoise`); `hook` sees each step's prediction.
    `inpaint` repaints the masked part of a source (klein.inpaint): sampling starts at its step from
    the source noised to that sigma, so `steps - inpaint.start` steps run (and are yielded).
    """
    device, dtype = model.device, model.dtype
    b, h, w = len(seeds), height // pixels_per_token, width // pixels_per_token
    channels = model.config.in_channels
    img = torch.cat([initial_noise(s, height, width, channels, pixels_per_token) for s in seeds]).to(
        device, dtype
    )
    img_ids = grid_ids(h, w).expand(b, -1, -1).to(device)
    ctx = ctx.to(device, dtype)
    ctx_ids = text_ids(ctx.shape[1]).expand(b, -1, -1).to(device)
    ref_ids = None
    if ref is not None:
        ref = ref.to(device, dtype)
        ref_ids = reference_ids(list(ref_shapes)).expand(b, -1, -1).to(device)
    sigmas = get_schedule(steps, h * w)
    repaint = None
    if inpaint is not None:  # start part-way, from the source noised to that sigma
        inpaint, noise = inpaint.to(device, dtype), img
        sigmas = sigmas[inpaint.start :]
        img = noised(inpaint.source, noise, sigmas[0])
        repaint = (inpaint, noise)
    if lora is not None:
        lora = LoraSelection(lora.slots.to(device), lora.scales.to(device))
    if guidance is None:
        yield from denoise(model, img, img_ids, ctx, ctx_ids, sigmas, ref, ref_ids, lora, hook, repaint)
    else:
        neg = neg_ctx.to(device, dtype)
        yield from denoise_cfg(
            model,
            img,
            img_ids,
            ctx,
            neg,
            ctx_ids,
            sigmas,
            guidance.to(device),
            ref,
            ref_ids,
            lora,
            hook,
            repaint,
        )
