"""FP8 (float8_e4m3fn) linears: weights stored in FP8 with one float32 scale per output row, and
GEMMs through `torch._scaled_mm` with per-token activation scales computed on the fly (W8A8,
"dynamic rowwise").

BFL's FP8 checkpoints carry one scale per tensor (`<layer>.weight_scale`); it is expanded to one per
row on load, so both origins share one kernel. Scaled GEMMs exist on CUDA from compute capability
8.9 (Ada, Hopper) and, in recent torch, on the CPU; `fp8_supported` probes the device once.
Elsewhere FP8 checkpoints are dequantised at load (klein.checkpoint), as they always were.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn; a larger value would cast to NaN
MIN_SCALE = 1e-12  # an all-zero row or token still gets a finite scale


def is_fp8_layer(name: str) -> bool:
    """The layers BFL quantise in FLUX.2 [klein] FP8: block attention and MLP projections."""
    return bool(
        re.fullmatch(r"double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2)", name)
        or re.fullmatch(r"single_blocks\.\d+\.linear[12]", name)
    )


def quantize_rows(weight: Tensor, chunk_bytes: int = 64 * 2**20) -> tuple[Tensor, Tensor]:
    """(N, K) weight -> (e4m3 weight, float32 scale (N,)) with weight ≈ w8 * scale[:, None].

    Rows are converted a block of about `chunk_bytes` (as float32) at a time, so quantising a
    large weight needs little memory beyond its FP8 result; each row's scale is its own, so the
    blocks give what one pass would."""
    n, k = weight.shape
    w8 = torch.empty((n, k), dtype=FP8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    step = max(1, chunk_bytes // (4 * k))
    for i in range(0, n, step):
        w = weight[i : i + step].float()
        s = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
        w8[i : i + step] = (w / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        scale[i : i + step] = s
    return w8, scale


def quantize_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) activations -> (e4m3, float32 scale (M, 1)): one scale per token, so a token's
    quantisation does not depend on its batch-mates."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x (..., K) @ weight.T with an e4m3 `weight` (N, K) and its row scales (N,) -> (..., N) in
    x's dtype. The product accumulates in float32 (CUDA: Hopper's fast accumulation)."""
    a, a_scale = quantize_tokens(x.reshape(-1, x.shape[-1]))
    # rowwise CUDA kernels write bf16 only; the CPU writes any float dtype
    out_dtype = x.dtype if x.device.type == "cpu" else torch.bfloat16
    out = torch._scaled_mm(
        a,
        weight.t(),  # column-major (K, N), as _scaled_mm wants its second operand
        scale_a=a_scale,
        scale_b=scale.reshape(1, -1),
        out_dtype=out_dtype,
        use_fast_accum=True,
    )
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def _probe(device_type: str) -> str | None:
    """None when a scaled FP8 GEMM runs on this kind of device, else why not."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            return f"CUDA compute capability {major}.{minor} < 8.9"
    try:
        w, s = quantize_rows(torch.eye(16, device=device_type))
        x = torch.arange(32.0, device=device_type).reshape(2, 16)
        out = fp8_linear(x.to(torch.bfloat16), w, s).float()
        if not torch.allclose(out, x, rtol=0.07, atol=0.0):  # e4m3 keeps 3 mantissa bits
            return "torch._scaled_mm computes wrong results"
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return f"torch._scaled_mm fails: {type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def fp8_supported(device: torch.device | str) -> bool:
    return fp8_unsupported_reason(device) is None


def fp8_unsupported_reason(device: torch.device | str) -> str | None:
    return _probe(torch.device(device).type)


@functools.cache
def log_once(message: str) -> None:
    log.warning(message)


def fp8_layer_names(model: nn.Module, layers: Callable[[str], bool] = is_fp8_layer) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and layers(n)]


def quantize_linears(model: nn.Module, layers: Callable[[str], bool] = is_fp8_layer) -> list[str]:
    """Turn the bias-free linears named by `layers` into FP8 form in place: e4m3 `weight` and a
    float32 `weight_scale` buffer per output row. On the meta device only the form changes (a
    checkpoint's FP8 tensors are assigned next). The modules must honour `weight_scale`
    (klein.transformer.Linear does). Returns the names converted."""
    names = fp8_layer_names(model, layers)
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if "weight_scale" not in m._buffers or m.bias is not None:
            raise TypeError(f"{name}: {type(m).__name__} cannot run in FP8")
        if m.weight.dtype == FP8:
            continue
        if m.weight.is_meta:
            w8 = torch.empty(m.weight.shape, dtype=FP8, device="meta")
            scale = torch.empty(m.weight.shape[0], dtype=torch.float32, device="meta")
        else:
            w8, scale = quantize_rows(m.weight)
        m.weight = nn.Parameter(w8, requires_grad=False)
        m.register_buffer("weight_scale", scale)
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
