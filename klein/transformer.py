"""The FLUX.2 flow transformer (a rectified-flow DiT), following BFL flux2 `model.py`.

Module attribute names are the BFL checkpoint keys, so a native single file loads with no key map.
Everything is bias-free; modulation is global (computed once per forward, shared by all blocks).
Token layout: joint attention runs over [txt | img | ref_1 .. ref_N], text first, no mask.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from klein.config import TransformerConfig
from klein.fp8 import fp8_linear

# Rotary embedding as (cos, sin) of each phase, float32 (B, 1, L, head_dim/2, 2): one per (token,
# rotated pair). Real-valued rather than complex: the compiler generates code for it (it has none for
# complex numbers) and the result is the same to the bit.
Rope = Tensor


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding of the timestep (sigma·1000, `model_timestep`); cosines first."""
    t = t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def model_timestep(sigma: Tensor, dtype: torch.dtype) -> Tensor:
    """sigma in [0, 1] as the timestep (0..1000) that the embedding sees, rounded where diffusers
    rounds it: its scheduler's sigma·1000 is cast to the latents' dtype, its pipeline passes that
    / 1000 and its transformer casts to the model's dtype and multiplies by 1000 again. In bf16 each
    is a rounding (968 for sigma 0.9674, where 967.4 would be exact); in float32 they give back
    sigma·1000 to within an ulp, as diffusers does."""
    t = (sigma.float() * 1000).to(dtype)
    return (t / 1000).to(dtype) * 1000


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Rope:
    """ids (B, L, n_axes) -> (cos, sin) of every phase, (B, 1, L, sum(axes_dim)/2, 2) in float32;
    the angles are computed in float64 and each of cos and sin is rounded once."""
    phases = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        phases.append(ids[..., i].to(torch.float64)[..., None] * omega)  # (B, L, d/2)
    angle = torch.cat(phases, dim=-1)
    return torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1).float().unsqueeze(1)


def apply_rope(x: Tensor, pe: Rope) -> Tensor:
    """Rotate consecutive pairs (x0, x1) of the head dim by the token's phase, in float32:
    (x0 cos - x1 sin, x0 sin + x1 cos), the arithmetic of a complex product.

    Two spellings of the same arithmetic, equal bit for bit (each product rounds alike; a - b is
    a + (-b); the sums' operands are only swapped). Eager runs the one with the fewest tensors
    made. Compiled code gets the one whose output is one elementwise expression over the head
    dim: inductor's CPU code vectorises that, where for the stacked pairs it vectorised across the
    heads with gathered loads (3x slower for a klein-sized q or k on the CPU)."""
    if torch.compiler.is_compiling():
        return _rope_swapped_pairs(x, pe)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = pe.unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def _rope_swapped_pairs(x: Tensor, pe: Rope) -> Tensor:
    """(x0, x1) cos + (x1, x0) (-sin, sin): apply_rope's arithmetic as one elementwise expression."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = pe[..., :1], pe[..., 1:]
    return (pairs * cos + pairs.flip(-1) * torch.cat((-sin, sin), dim=-1)).flatten(-2).type_as(x)


# SDPA kernels in order of preference for the transformer's attention (klein.fast pins them);
# None: torch's own choice.
_SDPA_PRIORITY: list | None = None


def set_attention_priority(backends: list | None) -> None:
    """Pin the order of SDPA backends (torch.nn.attention.SDPBackend) for the transformer."""
    global _SDPA_PRIORITY
    _SDPA_PRIORITY = None if backends is None else list(backends)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if _SDPA_PRIORITY is None:
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Rope) -> Tensor:
    """q, k, v (B, H, L, D) -> (B, L, H*D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return rearrange(sdpa(q, k, v), "B H L D -> B L (H D)")


def modulate(x: Tensor, shift: Tensor, scale1p: Tensor, eps: float = 1e-6) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift, with `scale1p` = 1 + scale precomputed once per forward.

    Three roundings in bf16, as diffusers' blocks make them (LayerNorm's own affine would be one
    kernel, but one rounding: images a level off on a third of the pixels). Compiled, inductor
    fuses the three anyway."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * scale1p + shift


def _bf16_gemm_is_native() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return bool(
        mkldnn is not None
        and hasattr(mkldnn, "_is_mkldnn_bf16_supported")
        and mkldnn._is_mkldnn_bf16_supported()
    )


# CPUs without bf16 dot-product instructions (AVX2) emulate bf16 GEMMs about 7x slower than
# float32 ones. There the bf16 operands are widened to float32 (exactly) and the product is
# rounded back to bf16: the same numbers a native bf16 GEMM with float32 accumulation gives.
_WIDEN_BF16_ON_CPU = not _bf16_gemm_is_native()


class LoraSelection(NamedTuple):
    """Per request of a batch: the bank slots of its adapters (B, S) and their scales (B, S).
    Unused places hold slot 0 (the empty adapter) with scale 0."""

    slots: Tensor
    scales: Tensor

    def repeat(self, n: int) -> LoraSelection:
        """For a batch run n times over (CFG's unconditional and conditional halves)."""
        return LoraSelection(self.slots.repeat(n, 1), self.scales.repeat(n, 1))


def lora_delta(
    x: Tensor,
    bank_a: Tensor,
    bank_b: Tensor,
    selection: LoraSelection,
    rows: slice = slice(None),
    y: Tensor | None = None,
) -> Tensor:
    """sum over places s: scale[b, s] * B_{slot[b, s]} (A_{slot[b, s]} x_b), for output rows `rows`;
    x (B, L, in) -> (B, L, out); with `y` (B, L, out), y plus that.

    A request's places are stacked into one adapter of rank S·R and scaled in the rank-sized
    intermediate, so the output is written once: by the second batched matmul, which adds into `y`
    (per place matmuls and sums wrote four output-sized tensors per place and cost 2-9x more, see
    docs/benchmarks.md). Each request's arithmetic is its own (batched matmuls over requests)."""
    places, rank = selection.slots.shape[1], bank_a.shape[1]
    down = bank_a[selection.slots].flatten(1, 2)  # (B, S·R, in)
    up = bank_b[:, rows][selection.slots].permute(0, 2, 1, 3).flatten(2)  # (B, out, S·R)
    t = torch.bmm(x, down.transpose(1, 2))  # (B, L, S·R)
    t = (t.unflatten(2, (places, rank)) * selection.scales.to(t.dtype)[:, None, :, None]).flatten(2)
    if y is None:
        return torch.bmm(t, up.transpose(1, 2))
    return torch.baddbmm(y, t, up.transpose(1, 2))


def linear(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """x @ weight.T; an FP8 `weight` with its per-row `scale` runs as an FP8 GEMM (klein.fp8)."""
    if scale is not None:
        return fp8_linear(x, weight, scale)
    if _WIDEN_BF16_ON_CPU and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.linear(x.float(), weight.float()).to(torch.bfloat16)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """A bias-free nn.Linear (same state-dict keys) that routes through `linear`.

    In FP8 form (`klein.fp8.to_fp8`) `weight` is float8_e4m3fn and the buffer `weight_scale` holds
    one float32 scale per output row: the layout of BFL's FP8 files, with their scalar expanded."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("weight_scale", None)  # not in the state dict until it holds a tensor
        self.register_buffer("lora_A", None)  # LoRA slot banks (klein.lora.enable_lora)
        self.register_buffer("lora_B", None)

    def forward(self, x: Tensor, lora: LoraSelection | None = None) -> Tensor:
        return self.with_lora(linear(x, self.weight, self.weight_scale), x, lora)

    def with_lora(
        self, y: Tensor, x: Tensor, lora: LoraSelection | None, rows: slice = slice(None)
    ) -> Tensor:
        """y plus the requests' adapters on output rows `rows` (klein.lora)."""
        if lora is None or self.lora_A is None:
            return y
        return lora_delta(x, self.lora_A, self.lora_B, lora, rows, y)

    def split_rows(self, sizes: list[int]) -> list[tuple[Tensor, Tensor | None]]:
        """(weight, scale) of consecutive blocks of output rows, as views."""
        weights = self.weight.split(sizes)
        if self.weight_scale is None:
            return [(w, None) for w in weights]
        return list(zip(weights, self.weight_scale.split(sizes), strict=True))


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim)
        self.out_layer = Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))  # the timestep: shared, never LoRA


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, x.shape[-1:], self.scale, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class SiLUActivation(nn.Module):
    """SwiGLU: the gate is the first half."""

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return F.silu(x1) * x2


class Modulation(nn.Module):
    """vec -> (shift, 1 + scale, gate) once (single) or twice (double); each (B, 1, hidden)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [(out[i], 1 + out[i + 1], out[i + 2]) for i in range(0, self.multiplier, 3)]


class SelfAttention(nn.Module):
    """One stream's projections of a double block; the attention itself is joint."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)

    def qkv_heads(self, x: Tensor, lora: LoraSelection | None = None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x, lora), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


def mlp(layers: nn.Sequential, x: Tensor, lora: LoraSelection | None) -> Tensor:
    """A double block's MLP, `layers` = (Linear, SwiGLU, Linear), each linear with its adapters."""
    up, act, down = layers
    return down(act(up(x, lora)), lora)


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        for s in ("img", "txt"):
            self.add_module(f"{s}_attn", SelfAttention(dim, num_heads))
            mlp = nn.Sequential(
                Linear(dim, 2 * mlp_hidden),
                SiLUActivation(),
                Linear(mlp_hidden, dim),
            )
            self.add_module(f"{s}_mlp", mlp)

    def forward(
        self, img: Tensor, txt: Tensor, pe: Rope, mod_img, mod_txt, lora: LoraSelection | None = None
    ) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1), lora)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1), lora)
        q = torch.cat((txt_q, img_q), dim=2)  # (B, H, L_txt + L_img, D)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe)  # (B, L_txt + L_img, hidden)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn, lora)
        img = img + img_gate2 * mlp(self.img_mlp, modulate(img, img_shift2, img_scale2), lora)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn, lora)
        txt = txt + txt_gate2 * mlp(self.txt_mlp, modulate(txt, txt_shift2, txt_scale2), lora)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence (ViT-22B style)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.hidden = dim
        self.linear1 = Linear(dim, 3 * dim + 2 * mlp_hidden)
        self.linear2 = Linear(dim + mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)

    def forward(
        self, x: Tensor, pe: Rope, mod, rows: slice = slice(None), lora: LoraSelection | None = None
    ) -> Tensor:
        """x (B, L, hidden) -> the updated `rows` of x. Every token is a key and a value, but only
        `rows` are queried and go through the MLP: the last block skips the tokens nobody reads."""
        ((shift, scale, gate),) = mod
        x_mod = modulate(x, shift, scale)
        n_qkv = 3 * self.hidden
        qkv, up = self.linear1.split_rows([n_qkv, self.linear1.out_features - n_qkv])
        qkv = self.linear1.with_lora(linear(x_mod, *qkv), x_mod, lora, slice(0, n_qkv))
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q[:, :, rows], k)
        x_rows = x_mod[:, rows]
        gate_up = self.linear1.with_lora(linear(x_rows, *up), x_rows, lora, slice(n_qkv, None))

        attn = sdpa(apply_rope(q, pe[:, :, rows]), apply_rope(k, pe), v)
        g, u = gate_up.chunk(2, dim=-1)
        # linear2 reads [attention | SwiGLU(mlp)]
        return x[:, rows] + gate * self.linear2(
            torch.cat((attn.transpose(1, 2).flatten(2), F.silu(g) * u), -1), lora
        )


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor, lora: LoraSelection | None = None) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift first
        return self.linear(modulate(x, shift, 1 + scale), lora)


class Flux2(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        h = c.hidden_size
        self.img_in = Linear(c.in_channels, h)
        self.txt_in = Linear(c.context_in_dim, h)
        self.time_in = MLPEmbedder(256, h)
        self.double_stream_modulation_img = Modulation(h, double=True)
        self.double_stream_modulation_txt = Modulation(h, double=True)
        self.single_stream_modulation = Modulation(h, double=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, c.num_heads, c.mlp_hidden) for _ in range(c.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, c.num_heads, c.mlp_hidden) for _ in range(c.depth_single_blocks)
        )
        self.final_layer = LastLayer(h, c.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def rope(self, ctx_ids: Tensor, x_ids: Tensor) -> Rope:
        """Phases for the joint sequence [txt | img]; ids are (B, L, 4) as (t, h, w, l)."""
        return rope(torch.cat((ctx_ids, x_ids), dim=1), self.config.axes_dim, self.config.theta)

    def forward(
        self,
        img: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        pe: Rope,
        ref: Tensor | None = None,
        lora: LoraSelection | None = None,
    ) -> Tensor:
        """Velocity of the noisy image tokens.

        img (B, L_img, in_channels): noisy latent tokens; ref (B, L_ref, in_channels): reference
          tokens, which take part in every attention but whose outputs nobody reads.
        timesteps (B,) or (1,): sigma in [0, 1]. The samplers pass one shared sigma, so the
          modulation is one matrix-vector product per step whatever the batch size: a (B, hidden)
          GEMM would round differently from B = 1 and make an image depend on its batch-mates.
        ctx (B, L_txt, context_in_dim): text embeddings.
        pe: `self.rope(ctx_ids, cat(img_ids, ref_ids))`, computed once per sampling run.
        lora: each request's LoRA adapters (klein.lora), or None.
        Returns (B, L_img, in_channels).
        """
        t = model_timestep(timesteps, self.dtype)
        vec = self.time_in(timestep_embedding(t).to(self.dtype))  # (B or 1, hidden)
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)

        n_img = img.shape[1]
        x = img if ref is None else torch.cat((img, ref.to(img.dtype)), dim=1)
        img = self.img_in(x.to(self.dtype), lora)
        txt = self.txt_in(ctx.to(self.dtype), lora)
        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt, lora)

        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img + L_ref, hidden)
        for block in self.single_blocks[:-1]:
            x = block(x, pe, mod_single, lora=lora)
        x = self.single_blocks[-1](x, pe, mod_single, rows=slice(n_txt, n_txt + n_img), lora=lora)
        return self.final_layer(x, vec, lora)
