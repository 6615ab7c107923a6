"""Per-request LoRA adapters (klein.lora): transformer forward time for a batch with none, one shared,
one per request and a mixed set of adapters, the cost of loading an adapter into the bank, the bank's
memory, and batch invariance with adapters.

    python benchmarks/lora_batching.py [--dtype fp32] [--batch 4] [--rank 16] [--max-rank RANK]
        [--slots 8] [--repeats 5] [--device cpu] [--format ai-toolkit|kohya] [--loads 6]
        [--preset mid|tiny|klein-4b|klein-9b] [--hidden 512 --heads 4 --double 2 --single 4]
        [--img 1024 --txt 512]

The default config ("mid") is benchmarks/transformer_forward.py's: hidden 512 (4 heads of 128), 2
double + 4 single blocks, 1024 image + 512 text tokens. Random adapters of rank `--rank` on every block
linear are written as .safetensors files in a trainer's format (bf16, as trainers save them) and read
back through klein's loader into a `LoraBank` of `--slots` slots zero-padded to `--max-rank` (default:
the adapters' rank; deployments default to 64). Variants of a batch of B requests:

- none: `lora=None` (the path every request without adapters takes when its whole batch has none);
- same: every request the same adapter;
- distinct: every request its own adapter (B distinct);
- mixed: the first request none, the last three adapters, the others one each.

After one warm-up call each, the variants run round by round, the order rotated each round; printed:
median ms (min-max) and the median of the per-round ratios to "none". Also: every request of every
variant against the same request run alone (bit-exact in fp32 on the CPU; native bf16 GEMMs on an AMX
CPU are not batch-invariant even without adapters; the max difference is printed), the adapter FLOPs
against the base linears' (counted in one forward), the time to load a fresh adapter (read the file,
parse it, write it into the bank) and a bank hit, and the bank's bytes; last, one linear layer with
klein's adapter path (the places stacked into one rank, added by one GEMM) against the first version
of it (two GEMMs per place, scaled and summed in output-sized tensors), side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import klein.transformer as dit
from klein.checkpoint import save_safetensors
from klein.config import PRESETS, TransformerConfig
from klein.fp8 import weight_bytes
from klein.loader import _random
from klein.lora import LoraBank, lora_targets, parse_lora, read_lora
from klein.sampler import grid_ids, text_ids
from klein.transformer import Flux2, LoraSelection

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("none", "same", "distinct", "mixed")


def config(args) -> TransformerConfig:
    if args.preset != "mid":
        return PRESETS[args.preset].transformer
    head_dim = args.hidden // args.heads
    return TransformerConfig(
        in_channels=128, hidden_size=args.hidden, num_heads=args.heads, depth=args.double,
        depth_single_blocks=args.single, context_in_dim=3 * args.hidden, axes_dim=(head_dim // 4,) * 4,
    )  # fmt: skip


# --- random adapters, written as trainers write them ---


def random_factors(
    c: TransformerConfig, rank: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A (r, in), B (out, r)) on every block linear (attention and MLP of every block, the usual
    "all linear layers" adapter), of a size that visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fan_in, fan_out) in lora_targets(c).items():
        if name.startswith(("double_blocks.", "single_blocks.")):
            a = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=g) * (0.5 / rank**0.5)
            out[name] = (a, b)
    return out


def write_adapter(path: Path, fmt: str, factors, dtype=torch.bfloat16) -> None:
    sd = {}
    for name, (a, b) in factors.items():
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            sd |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b}
            sd[f"{key}.alpha"] = torch.tensor(float(a.shape[0]))  # alpha = rank: scale 1
        else:  # ai-toolkit: BFL module names under `diffusion_model.`
            sd |= {f"diffusion_model.{name}.lora_A.weight": a, f"diffusion_model.{name}.lora_B.weight": b}
    save_safetensors({k: v.to(dtype).contiguous() for k, v in sd.items()}, path)


# --- the batch's adapters ---


def requests_for(variant: str, batch: int) -> list[list[tuple[str, float]]]:
    """Per request its adapters (key, scale); keys are a0, a1, ..."""
    if variant == "none":
        return [[] for _ in range(batch)]
    if variant == "same":
        return [[("a0", 1.0)] for _ in range(batch)]
    if variant == "distinct":
        return [[(f"a{i}", 1.0)] for i in range(batch)]
    out = [[(f"a{i % 4}", 0.8)] for i in range(batch)]  # mixed
    out[0] = []
    out[-1] = [("a1", 0.6), ("a2", 1.0), ("a3", -0.7)]
    return out


def on(selection: LoraSelection | None, device) -> LoraSelection | None:
    return (
        None if selection is None else LoraSelection(selection.slots.to(device), selection.scales.to(device))
    )


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count_flops(model: Flux2, call) -> tuple[float, float]:
    """(base linear FLOPs, adapter FLOPs) of one call, counted by wrapping klein.transformer's
    `linear` and `lora_delta` (the adapter path: two batched matmuls through rank places x R)."""
    counts = {"base": 0.0, "lora": 0.0}
    linear, lora_delta = dit.linear, dit.lora_delta

    def counting_linear(x, weight, scale=None):
        counts["base"] += 2 * x.shape[:-1].numel() * weight.shape[0] * weight.shape[1]
        return linear(x, weight, scale)

    def counting_delta(x, bank_a, bank_b, selection, rows=slice(None), y=None):
        n_out = len(range(*rows.indices(bank_b.shape[1])))
        places, rank = selection.slots.shape[1], bank_a.shape[1]
        counts["lora"] += places * 2 * x.shape[:-1].numel() * rank * (x.shape[-1] + n_out)
        return lora_delta(x, bank_a, bank_b, selection, rows, y)

    dit.linear, dit.lora_delta = counting_linear, counting_delta
    try:
        call()
    finally:
        dit.linear, dit.lora_delta = linear, lora_delta
    return counts["base"], counts["lora"]


def per_place_into(y, x, bank_a, bank_b, selection: LoraSelection):
    """The first version of klein's adapter path, kept here to measure against: per place two
    batched GEMMs through rank R, the output-sized product scaled, summed over places, then added
    to y (four output-sized tensors written per place)."""
    out = None
    for s in range(selection.slots.shape[1]):
        index = selection.slots[:, s]
        t = torch.bmm(x, bank_a[index].transpose(1, 2))
        d = torch.bmm(t, bank_b[index].transpose(1, 2))
        d = d * selection.scales[:, s].to(d.dtype)[:, None, None]
        out = d if out is None else out + d
    return y + out


def one_linear(model: Flux2, selection: LoraSelection, b: int, n_tokens: int, device, dtype, rounds: int):
    """The first double block's MLP input linear (hidden -> 2 x mlp_hidden, the widest LoRA-able
    output) on B x n_tokens rows: without adapters, klein's adapter path, the first per-place one."""
    m = model.double_blocks[0].img_mlp[0]
    x = torch.randn(b, n_tokens, m.in_features, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    calls = {
        "no adapters": lambda: m(x),
        "klein (stacked, one GEMM adds)": lambda: m(x, selection),
        "per place (first version)": lambda: per_place_into(dit.linear(x, m.weight), x, m.lora_A, m.lora_B, selection),
    }  # fmt: skip
    diff = (
        (calls["klein (stacked, one GEMM adds)"]().float() - calls["per place (first version)"]().float())
        .abs()
        .max()
    )
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            sync(device)
            t1 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t1)
    base = statistics.median(times["no adapters"])
    print(f"\none linear, {m.in_features} -> {m.out_features} on {b} x {n_tokens} rows, 3 places of rank "
          f"{m.lora_A.shape[1]}, median of {rounds} alternating rounds:")  # fmt: skip
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k}: {med * 1e3:.1f} ms (adapters add {(med - base) * 1e3:.1f} ms)")
    print(f"  max |klein - first version| {diff.item():.2e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid", choices=["mid", "tiny", "klein-4b", "klein-9b"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--img", type=int, default=1024, help="image tokens (a square grid)")
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-rank", type=int, default=None, help="the bank's rank (default: --rank)")
    ap.add_argument("--slots", type=int, default=8, help="bank slots, slot 0 the empty adapter")
    ap.add_argument("--format", default="ai-toolkit", choices=["ai-toolkit", "kohya"])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every variant once)")
    ap.add_argument("--loads", type=int, default=6, help="fresh adapters loaded to time a bank miss")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="where to write the adapter files (default: a temp dir)")
    args = ap.parse_args()
    max_rank = args.max_rank or args.rank
    if args.batch < 2:
        ap.error("--batch must be at least 2 (the variants differ by request)")
    if args.slots - 1 < max(4, args.batch):
        ap.error(f"--slots must hold at least {max(4, args.batch)} adapters plus the empty slot")

    c, dtype, device, b = config(args), DTYPES[args.dtype], torch.device(args.device), args.batch
    side = int(args.img**0.5)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}", end="")
    if device.type == "cuda":
        print(f" ({torch.cuda.get_device_name(device)})", end="")
    else:
        print(f" (CPU capability {torch.backends.cpu.get_cpu_capability()})", end="")
    print(
        f", {args.dtype}, bf16 GEMMs {'widened to fp32' if dit._WIDEN_BF16_ON_CPU else 'native'} on the CPU"
    )
    print(f"config: {c}; batch {b}, {side * side} image + {args.txt} text tokens")

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        root = Path(args.dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        run(args, c, dtype, device, b, side, max_rank, root)


def run(args, c, dtype, device, b, side, max_rank, root: Path) -> None:
    t0 = time.perf_counter()
    model = _random(Flux2, c, 0, device, dtype)
    print(f"model: {weight_bytes(model) / 1e6:.1f} MB of weights, built in {time.perf_counter() - t0:.1f} s")

    n_files = 4 + args.loads
    files = {}
    for i in range(n_files):
        files[f"a{i}"] = root / f"a{i}.safetensors"
        write_adapter(files[f"a{i}"], args.format, random_factors(c, args.rank, 100 + i))
    size = files["a0"].stat().st_size
    print(f"adapters: rank {args.rank}, {args.format} format, bf16, {size / 1e6:.2f} MB per file; "
          f"bank: {args.slots} slots of rank {max_rank}")  # fmt: skip

    timings = {"read": [], "parse": []}

    def load(key: str):
        t = time.perf_counter()
        tensors, metadata = read_lora(files[key])
        t1 = time.perf_counter()
        adapter = parse_lora(tensors, metadata, c, key)
        timings["read"].append(t1 - t)
        timings["parse"].append(time.perf_counter() - t1)
        return adapter

    bank = LoraBank(model, slots=args.slots, max_rank=max_rank, places=3)
    print(f"bank: {bank.bytes / 1e6:.1f} MB ({bank.bytes / weight_bytes(model):.1%} of the weights), "
          f"{bank.bytes / (args.slots * 1e6):.2f} MB per slot")  # fmt: skip

    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, side * side, c.in_channels, generator=g).to(device, dtype)
    ctx = torch.randn(b, args.txt, c.context_in_dim, generator=g).to(device, dtype)
    t = torch.full((1,), 0.6).to(device, dtype)  # one shared sigma, as the samplers pass it
    pe = model.rope(
        text_ids(args.txt).expand(b, -1, -1).to(device), grid_ids(side, side).expand(b, -1, -1).to(device)
    )
    pe1 = model.rope(text_ids(args.txt)[None].to(device), grid_ids(side, side)[None].to(device))

    reqs = {v: requests_for(v, b) for v in VARIANTS}
    sels = {v: on(bank.selection(r, load), device) for v, r in reqs.items()}
    for key in list(timings):
        timings[key].clear()

    def call(variant):
        return lambda: model(x, t, ctx, pe, None, sels[variant])

    # batch invariance: each request of a batch against the same request alone
    outs = {v: call(v)() for v in VARIANTS}
    print("check: each request in its batch against the same request alone")
    for v in VARIANTS:
        worst, exact = 0.0, True
        for i, adapters in enumerate(reqs[v]):
            alone = model(
                x[i : i + 1], t, ctx[i : i + 1], pe1, None, on(bank.selection([adapters], load), device)
            )
            exact &= torch.equal(alone[0], outs[v][i])
            worst = max(worst, (alone[0].float() - outs[v][i].float()).abs().max().item())
        effect = (outs[v].float() - outs["none"].float()).abs().max().item()
        finite = bool(torch.isfinite(outs[v]).all())
        print(f"  {v:9s} {'bit-exact' if exact else f'max |diff| {worst:.2e}'} ({b} requests); "
              f"max |out - none| {effect:.3f}; finite {finite}")  # fmt: skip
    same = torch.equal(outs["mixed"][0], outs["none"][0])
    print(f"  mixed's adapter-free request equals the no-adapter batch's: {'bit-exact' if same else 'NO'}")

    base, extra = count_flops(model, call("same"))
    print(
        f"FLOPs per forward: base linears {base / 1e9:.1f} G; adapter path {extra / 1e9:.2f} G "
        f"({extra / base:.1%} of the linears'; 3 places of rank {max_rank} whatever the adapters)"
    )

    # timing: warm-up, then rounds of every variant, the order rotated each round
    for v in VARIANTS:
        call(v)()
    times = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            fn = call(v)
            sync(device)
            t1 = time.perf_counter()
            fn()
            sync(device)
            times[v].append(time.perf_counter() - t1)

    # bank: the selection for the mixed batch (all resident), a miss (a fresh adapter: read, parse,
    # write into a slot, evicting the least recently used when the bank is full) and a hit
    mixed = []
    for _ in range(20):
        t1 = time.perf_counter()
        bank.selection(reqs["mixed"], load)
        mixed.append(time.perf_counter() - t1)
    misses, hits = [], []
    for i in range(4, n_files):
        key = f"a{i}"
        sync(device)
        t1 = time.perf_counter()
        bank.selection([[(key, 1.0)]], load)
        sync(device)
        misses.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        bank.selection([[(key, 1.0)]], load)
        hits.append(time.perf_counter() - t1)
    puts = [m - r - p for m, r, p in zip(misses, timings["read"], timings["parse"], strict=True)]

    def ms(xs):
        return f"{statistics.median(xs) * 1e3:.1f} ms ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"

    print(f"\n{args.dtype}, batch {b}, rank {args.rank} (bank rank {max_rank}), {args.repeats} rounds:")
    print("| variant | forward | ratio to none (median of rounds) |")
    print("|---|---|---|")
    for v in VARIANTS:
        ratios = [a / n for a, n in zip(times[v], times["none"], strict=True)]
        ratio = (
            "1"
            if v == "none"
            else f"**{statistics.median(ratios):.3f}** ({min(ratios):.3f}-{max(ratios):.3f})"
        )
        print(f"| {v} | {ms(times[v])} | {ratio} |")
    print(
        f"\nfresh adapter into the bank ({len(misses)} loads, page cache warm): {ms(misses)}; "
        f"of it read {ms(timings['read'])}, parse {ms(timings['parse'])}, write into the slot {ms(puts)}"
    )
    print(
        f"bank hit (one request, one adapter): {statistics.median(hits) * 1e6:.0f} us; selection for the "
        f"mixed batch, all resident: {statistics.median(mixed) * 1e6:.0f} us"
    )
    print(f"bank: {bank.bytes / 1e6:.1f} MB for {args.slots} slots of rank {max_rank}; {bank.stats()}")
    one_linear(model, sels["mixed"], b, side * side + args.txt, device, dtype, 15)


if __name__ == "__main__":
    main()
