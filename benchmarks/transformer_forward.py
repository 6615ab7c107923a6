"""Transformer forward time: klein's Flux2 vs diffusers' Flux2Transformer2DModel, same weights.

    python benchmarks/transformer_forward.py [--hidden 512 --double 2 --single 4 --img 1024 --txt 512]
        [--dtype fp32 bf16] [--repeats 15] [--device cpu] [--no-widen] [--compile] [--freeze]
        [--autotune] [--fp8] [--backend inductor]

Runs alternate (ours, theirs, ours, ...) after warm-up so both see the same machine state; prints
the median time of each and the median of the per-pair ratios ours / diffusers. `--compile` adds
klein compiled by its fast path (klein.fast: regional, inductor, warmed up at the measured shape;
compile time reported, plus the first call at a size that was not warmed up, compiled on demand,
and the same size run eagerly by the shape gate); `--freeze` and `--autotune` add klein compiled
with inductor's freezing (weights as constants: oneDNN linears on prepacked weights on the CPU) and
max-autotune, each alone and both together; `--fp8` adds klein with FP8 block linears (eager, and
compiled with --compile) and the resident bytes of each. Klein gets its timestep in float32 as its
samplers pass it (diffusers gets the model's dtype, as its pipeline passes it): a compiled variant is
warmed up for exactly the inputs it is timed on, and the run fails if one of them ran eagerly.
Every variant leaves attention to torch's SDPA choice, as diffusers does (klein.fast pins cuDNN or
flash on CUDA by default, process-wide; benchmarks/gpu_fast_path.py measures that separately).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import klein.transformer
from klein.checkpoint import transformer_from_diffusers
from klein.config import TransformerConfig
from klein.fast import FastPath, setup_transformer, warm_up_transformer
from klein.fp8 import weight_bytes
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
    ap.add_argument("--compile", action="store_true", help="add klein compiled (klein.fast, inductor)")
    ap.add_argument("--freeze", action="store_true", help="add klein compiled with inductor freezing")
    ap.add_argument("--autotune", action="store_true", help="add klein compiled with inductor max-autotune")
    ap.add_argument("--fp8", action="store_true", help="add klein with FP8 block linears")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a rehearsal)")
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
    with torch.inference_mode():  # inputs as the samplers make them (compiled code is specialised)
        x = torch.randn(b, side * side, 128, generator=g).to(args.device, dtype)
        ctx = torch.randn(b, args.txt, c.context_in_dim, generator=g).to(args.device, dtype)
        t = torch.full((b,), 0.6).to(args.device, dtype)  # diffusers' pipeline: the latents' dtype
        t32 = torch.full((1,), 0.6, device=args.device)  # klein's samplers: float32, shared by the batch
        ids = grid_ids(side, side).expand(b, -1, -1).to(args.device)
        tids = text_ids(args.txt).expand(b, -1, -1).to(args.device)
        pe = ours.rope(tids, ids)

    def klein_call(model):
        return lambda: model(x, t32, ctx, pe)

    def run_theirs():
        return theirs(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=ids, txt_ids=tids,
                      return_dict=False)[0]  # fmt: skip

    variants = {"ours": klein_call(ours), "diffusers": run_theirs}
    notes = []
    if args.fp8:
        fp8 = fast_variant(ours, FastPath(quantize="fp8", attention="default"))
        variants["ours fp8"] = klein_call(fp8)
        notes.append(
            f"resident bytes: klein {weight_bytes(ours) / 1e6:.1f} MB, FP8 {weight_bytes(fp8) / 1e6:.1f} MB"
        )
    if args.compile:
        compiled = {}
        for label, extra in compiled_variants(args):
            opts = FastPath(compile=True, warmup_sizes=((side * 16, side * 16),), backend=args.backend,
                            attention="default", **extra)  # fmt: skip
            t0 = time.perf_counter()
            compiled[label] = model = fast_variant(ours, opts)
            warm = warm_up_transformer(model, opts, context_len=args.txt)
            notes.append(f"{label}: set-up + warm-up (compilation) {time.perf_counter() - t0:.1f} s ({warm})")
            variants[label] = klein_call(model)
        notes += unwarmed(compiled["ours compiled"], c, args, dtype)

    eager_before = {k: m.forward.eager_calls for k, m in compiled.items()} if args.compile else {}
    with torch.inference_mode():
        exact = build(c, args.device, torch.float32)[0](x.float(), t32, ctx.float(), pe)
        errors = {k: (fn().float() - exact).abs().max().item() for k, fn in variants.items()}
        for _ in range(2):
            for fn in variants.values():
                fn()
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for label, fn in variants.items():
                sync(args.device)
                t0 = time.perf_counter()
                fn()
                sync(args.device)
                times[label].append(time.perf_counter() - t0)
    for label, before in eager_before.items():
        if (ran := compiled[label].forward.eager_calls - before) > 0:
            raise SystemExit(f"{label}: {ran} timed calls ran eagerly (the inputs were not the warmed ones)")
    md = statistics.median(times["diffusers"])
    print(
        f"{name}: diffusers {md * 1e3:.1f} ms (median of {args.repeats}); max |out - fp32 ours| {errors['diffusers']:.2e}"
    )
    for label in variants:
        if label == "diffusers":
            continue
        ratios = [a / b for a, b in zip(times[label], times["diffusers"], strict=True)]
        print(
            f"  {label}: {statistics.median(times[label]) * 1e3:.1f} ms; ratio to diffusers: median of pairs "
            f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
            f"max |out - fp32 ours| {errors[label]:.2e}"
        )
    for note in notes:
        print(f"  {note}")


def compiled_variants(args) -> list[tuple[str, dict]]:
    """(label, extra FastPath options) of each compiled variant the flags ask for."""
    out = [("ours compiled", {})]
    if args.freeze:
        out.append(("ours compiled freeze", {"freeze": True}))
    if args.autotune:
        out.append(("ours compiled max-autotune", {"autotune": True}))
    if args.freeze and args.autotune:
        out.append(("ours compiled freeze + max-autotune", {"freeze": True, "autotune": True}))
    if args.fp8:
        out.append(("ours compiled fp8", {"quantize": "fp8"}))
    return out


def timed_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def fast_variant(model: Flux2, opts: FastPath) -> Flux2:
    copy_ = copy.deepcopy(model)
    setup_transformer(copy_, opts)
    return copy_


def unwarmed(model: Flux2, c: TransformerConfig, args, dtype) -> list[str]:
    """A size outside the warmed set: its first call compiled on demand (new_shapes="compile"), or
    run eagerly by the shape gate (the default, new_shapes="eager"), against a warmed call."""
    side = int(args.img**0.5) // 2
    with torch.inference_mode():
        x = torch.randn(args.batch, side * side, 128).to(args.device, dtype)
        ctx = torch.randn(args.batch, args.txt, c.context_in_dim).to(args.device, dtype)
        pe = model.rope(
            text_ids(args.txt).expand(args.batch, -1, -1).to(args.device),
            grid_ids(side, side).expand(args.batch, -1, -1).to(args.device),
        )
        t = torch.full((1,), 0.6, device=args.device)  # float32, as the samplers pass it
        out = []
        for policy in ("eager", "compile"):  # closed after warm-up: eager; then opened: compiled now
            model.forward.closed = policy == "eager"
            t0 = time.perf_counter()
            model(x, t, ctx, pe)
            first = time.perf_counter() - t0
            second = statistics.median(timed_calls(lambda: model(x, t, ctx, pe), 5))
            out.append(f"a size not warmed up ({side * 16}²), new_shapes={policy}: first call {first * 1e3:.0f} ms, "
                       f"then {second * 1e3:.0f} ms (median of 5)")  # fmt: skip
        model.forward.closed = True
    return out


if __name__ == "__main__":
    main()
