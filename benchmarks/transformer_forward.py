"""Transformer forward time: klein's Flux2 vs diffusers' Flux2Transformer2DModel, same weights.

    python benchmarks/transformer_forward.py [--hidden 512 --double 2 --single 4 --img 1024 --txt 512]
        [--dtype fp32 bf16] [--repeats 15] [--device cpu] [--no-widen]

Runs alternate (ours, theirs, ours, ...) after warm-up so both see the same machine state; prints
the median time of each and the median of the per-pair ratios ours / diffusers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import klein.transformer
from klein.checkpoint import transformer_from_diffusers
from klein.config import TransformerConfig
from klein.sampler import grid_ids, text_ids
from klein.transformer import Flux2

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(c: TransformerConfig, device, dtype):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    theirs = Flux2Transformer2DModel(
        in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
        axes_dims_rope=c.axes_dim, guidance_embeds=False,
    ).eval()  # fmt: skip
    with torch.device("meta"):
        ours = Flux2(c)
    ours.load_state_dict(transformer_from_diffusers(theirs.state_dict()), strict=True, assign=True)
    return ours.to(device, dtype).eval(), theirs.to(device, dtype)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--img", type=int, default=1024, help="image tokens (a square grid)")
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--no-widen", action="store_true", help="run klein's bf16 GEMMs in bf16 even without native support"
    )
    args = ap.parse_args()
    if args.no_widen:
        klein.transformer._WIDEN_BF16_ON_CPU = False

    head_dim = args.hidden // args.heads
    c = TransformerConfig(
        in_channels=128, hidden_size=args.hidden, num_heads=args.heads, depth=args.double,
        depth_single_blocks=args.single, context_in_dim=3 * args.hidden, axes_dim=(head_dim // 4,) * 4,
    )  # fmt: skip
    side = int(args.img**0.5)
    widen = (
        "bf16 GEMMs widened to fp32 (no native bf16 on this CPU)"
        if klein.transformer._WIDEN_BF16_ON_CPU
        else "bf16 GEMMs in bf16"
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"klein: {widen}")
    print(f"config: {c}, batch {args.batch}, {side * side} image + {args.txt} text tokens")
    for name in args.dtype:
        measure(c, args, name)


def measure(c: TransformerConfig, args, name: str) -> None:
    dtype = DTYPES[name]
    ours, theirs = build(c, args.device, dtype)
    g = torch.Generator().manual_seed(1)
    b, side = args.batch, int(args.img**0.5)
    x = torch.randn(b, side * side, 128, generator=g).to(args.device, dtype)
    ctx = torch.randn(b, args.txt, c.context_in_dim, generator=g).to(args.device, dtype)
    t = torch.full((b,), 0.6).to(args.device, dtype)
    ids = grid_ids(side, side).expand(b, -1, -1).to(args.device)
    tids = text_ids(args.txt).expand(b, -1, -1).to(args.device)

    def run_ours():
        return ours(x, t[:1], ctx, ours.rope(tids, ids))

    def run_theirs():
        return theirs(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=ids, txt_ids=tids,
                      return_dict=False)[0]  # fmt: skip

    with torch.inference_mode():
        exact = build(c, args.device, torch.float32)[0](
            x.float(), t[:1].float(), ctx.float(), ours.rope(tids, ids)
        )
        err_ours = (run_ours().float() - exact).abs().max().item()
        err_theirs = (run_theirs().float() - exact).abs().max().item()
        for _ in range(2):
            run_ours(), run_theirs()
        times = {"ours": [], "diffusers": []}
        for _ in range(args.repeats):
            for label, fn in (("ours", run_ours), ("diffusers", run_theirs)):
                sync(args.device)
                t0 = time.perf_counter()
                fn()
                sync(args.device)
                times[label].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"], strict=True)]
    mo, md = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(
        f"{name}: ours {mo * 1e3:.1f} ms, diffusers {md * 1e3:.1f} ms (medians of {args.repeats}); "
        f"ratio ours/diffusers: median of pairs {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}; max |out - fp32 ours|: ours {err_ours:.2e}, "
        f"diffusers {err_theirs:.2e}"
    )


if __name__ == "__main__":
    main()
