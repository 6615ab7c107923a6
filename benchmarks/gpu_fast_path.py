"""The GPU fast path, measured in one run: klein eager vs attention-pinned vs compiled vs compiled
+ FP8 vs CUDA graphs vs diffusers (eager and its best native path), and last, if the deadline leaves
time, compiled with frozen weights; on the same random weights at
klein-4B's shapes, 1024², batch 1 and 4; end to end (text encoder + transformer + VAE: eager,
compiled, + FP8, and with the deadline's leftovers + CUDA graphs); attention and GEMM
micro-benchmarks at klein's shapes with achieved TFLOP/s.

    python benchmarks/gpu_fast_path.py --preset klein-4b --size 1024 --batch 1 4 --deadline 450 --out DIR
    python benchmarks/gpu_fast_path.py --device cpu --preset tiny --size 256 --batch 1 2 \\
        --backend aot_eager --deadline 120 --out DIR          # the CPU rehearsal the test suite runs

Every variant writes its JSON line to DIR/results.jsonl as soon as it is known and DIR/summary.md is
rewritten after each, so a run cut short keeps what it measured. A variant that would run past
--deadline is skipped (and says so); one that fails records its traceback and the run goes on, and
`--only ID ...` re-runs just the variants named (the environment is always recorded).

On a lent H100/H200 (torch 2.11 there, no package registry: diffusers travels as a wheel, see
docs/benchmarks.md for the one command). Imports only klein's model modules, torch, einops, PIL,
numpy and (optionally) diffusers and torchao.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

from klein import transformer as dit
from klein.config import get_preset
from klein.fast import FastPath, cudagraph_skips, setup_transformer, warm_up_transformer
from klein.fp8 import fp8_linear, fp8_unsupported_reason, quantize_rows, quantize_tokens
from klein.sampler import denoise, get_schedule, grid_ids, text_ids

CONTEXT = 512  # text tokens
VARIANTS = (
    "P1",
    "A1",
    "A2",
    "V1",
    "V2",
    "V3",
    "V4",
    "V5",
    "V6",
    "V7",
    "V8",
    "V9",
    "V10",
    "E1",
    "E2",
    "E3",
    "E4",
)
GROUPS = {  # what --only runs besides the variants it names: the environment, and a group's set-up
    "P0": VARIANTS,
    "V": ("V1", "V2", "V3", "V4", "V5", "V6", "V8", "V9", "V10"),
    "E": ("E1", "E2", "E3", "E4"),
}
HEADER = (
    "variant | B | ms/image | ms/forward | TFLOP/s | % ceiling | × V1 | × V5 | rel.err | warm-up s | peak GB"
)


# --- arithmetic ---


def forward_flops(c, n_img: int, n_txt: int = CONTEXT) -> float:
    """FLOPs of one transformer forward at batch 1 (multiply-adds x 2): linears per token of their
    stream, attention 4·L²·hidden, the last single block on image rows only (as klein runs it)."""
    h, m, n = c.hidden_size, c.mlp_hidden, n_img + n_txt
    per_token = 2 * (h * 3 * h + h * h + h * 2 * m + m * h)  # a double block's stream = single block
    double = c.depth * (per_token * n + 4 * n * n * h)
    single = (c.depth_single_blocks - 1) * (per_token * n + 4 * n * n * h)
    last = 2 * h * 3 * h * n + (per_token - 2 * h * 3 * h) * n_img + 4 * n_img * n * h
    embed = 2 * (c.in_channels * h * n_img + c.context_in_dim * h * n_txt + h * c.in_channels * n_img)
    return double + single + last + embed


# --- the run ---


class Run:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.out / "results.jsonl").open("w")
        self.rows: list[dict] = []
        self.ref: dict[tuple[str, int], dict] = {}  # (V1|V5, B) -> row with its output
        self.ceiling: float | None = None
        self.device = torch.device(args.device)
        self.micro_reps = 10 if self.device.type == "cuda" else 3  # the CPU run is a rehearsal

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self, row: dict) -> None:
        row = {k: v for k, v in row.items() if k != "output"} | {"at_s": round(self.elapsed(), 1)}
        self.jsonl.write(json.dumps(row, default=str) + "\n")
        self.jsonl.flush()
        print(json.dumps(row, default=str)[:400], flush=True)
        self.rows.append(row)
        self.summary()

    def wanted(self, vid: str) -> bool:
        """With --only: the variants named, the groups they are in, and V1 with any transformer
        variant (the reference of every row's rel.err and × V1)."""
        only = self.args.only
        with_v1 = vid == "V1" and any(member in only for member in GROUPS["V"]) if only else False
        return not only or vid in only or with_v1 or any(member in only for member in GROUPS.get(vid, ()))

    def variant(self, vid: str, what: str, estimate_s: float, fn) -> None:
        if not self.wanted(vid):
            return
        if self.elapsed() + estimate_s * self.args.estimate_scale > self.args.deadline:
            self.write({"variant": vid, "what": what, "skipped": "deadline"})
            return
        try:
            fn()
        except Exception as e:
            self.write({"variant": vid, "what": what, "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-3000:]})  # fmt: skip
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def summary(self) -> None:
        lines = [f"# gpu_fast_path: {self.args.preset} {self.args.size}² on {self.args.device}", "", HEADER,
                 "|".join(["---"] * 11)]  # fmt: skip
        notes = []
        for r in self.rows:
            if "ms_per_image" in r:
                cells = [r["variant"], r["B"], r["ms_per_image"], r["ms_per_forward"], r.get("tflops"),
                         r.get("pct_ceiling"), r.get("x_v1"), r.get("x_v5"), r.get("rel_err"), r.get("warmup_s"),
                         r.get("peak_gb")]  # fmt: skip
                lines.append(
                    " | ".join(
                        "" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells
                    )
                )
                if r.get("ran_eagerly"):
                    notes.append(
                        f"- {r['variant']} B={r['B']}: {r['ran_eagerly']} calls ran EAGERLY (not warmed)"
                    )
            elif "skipped" in r or "error" in r:
                notes.append(f"- {r['variant']}: {r.get('skipped') or r.get('error')}")
            else:
                notes.append(
                    f"- {r['variant']}: {json.dumps({k: v for k, v in r.items() if k != 'variant'})[:600]}"
                )
        (self.out / "summary.md").write_text("\n".join(lines + [""] + notes) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, device: torch.device) -> list[float]:
    """Seconds per call: CUDA events on CUDA, the wall clock elsewhere; synced before and after."""
    out = []
    for _ in range(reps):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            sync(device)
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


# --- models and inputs ---


def build(spec, device, dtype):
    """(klein Flux2, diffusers Flux2Transformer2DModel or None) sharing one set of random weights."""
    c = spec.transformer
    try:
        from diffusers import Flux2Transformer2DModel
    except Exception as e:  # the peer is optional: klein alone still measures
        print(f"diffusers unavailable ({type(e).__name__}: {e}); peer rows are skipped", flush=True)
        from klein.loader import ModelSource

        return ModelSource.random_weights(spec.name).load_transformer(device, dtype), None
    from klein.checkpoint import transformer_from_diffusers

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            theirs = Flux2Transformer2DModel(
                in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
                attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
                joint_attention_dim=c.context_in_dim, axes_dims_rope=tuple(c.axes_dim), guidance_embeds=False,
            ).eval()  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    with torch.device("meta"):
        ours = dit.Flux2(c)
    ours.load_state_dict(transformer_from_diffusers(theirs.state_dict()), strict=True, assign=True)
    return ours.eval().requires_grad_(False), theirs.requires_grad_(False)


@torch.inference_mode()
def make_inputs(spec, b: int, size: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(b)
    side = size // spec.multiple
    c = spec.transformer
    return {
        "img": torch.randn(b, side * side, c.in_channels, generator=g).to(device, dtype),
        "ctx": torch.randn(b, CONTEXT, c.context_in_dim, generator=g).to(device, dtype),
        "img_ids": grid_ids(side, side).expand(b, -1, -1).to(device),
        "ctx_ids": text_ids(CONTEXT).expand(b, -1, -1).to(device),
        "sigmas": get_schedule(4, side * side),
    }


def klein_run(model, x: dict):
    def run():
        with torch.inference_mode():
            *_, latents = denoise(model, x["img"], x["img_ids"], x["ctx"], x["ctx_ids"], x["sigmas"])
        return latents

    return run


def diffusers_run(model, x: dict):
    """The same four Euler steps through diffusers' transformer (timestep = sigma, as
    Flux2KleinPipeline passes it), the update in float32 as both pipelines do."""

    def run():
        img, b = x["img"], x["img"].shape[0]
        with torch.inference_mode():
            for t_curr, t_next in zip(x["sigmas"][:-1], x["sigmas"][1:], strict=True):
                t = torch.full((b,), t_curr, device=img.device, dtype=img.dtype)
                v = model(hidden_states=img, encoder_hidden_states=x["ctx"], timestep=t,
                          img_ids=x["img_ids"][0], txt_ids=x["ctx_ids"][0], return_dict=False)[0]  # fmt: skip
                img = (img.float() + (t_next - t_curr) * v.float()).to(img.dtype)
        return img

    return run


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure(run: Run, vid: str, what: str, fn, b: int, spec, gate=None) -> dict:
    """Warm-up call (compilation happens here), then the timed calls; one row per batch size.
    `gate`: a compiled model's ShapeGate; the row says how many calls it ran eagerly (any means
    the timed inputs were not the warmed ones and the figure is not the compiled one)."""
    device = run.device
    eager_before = gate.eager_calls if gate is not None else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    fn()
    sync(device)
    warmup_s = time.perf_counter() - t
    reps = run.args.reps_b1 if b == 1 else run.args.reps
    times = timed(fn, reps, device)
    out = fn()
    sync(device)
    med = statistics.median(times)
    flops = 4 * b * forward_flops(spec.transformer, (run.args.size // spec.multiple) ** 2)
    row = {"variant": vid, "what": what, "B": b, "ms_per_image": 1e3 * med / b, "ms_per_forward": 1e3 * med / 4,
           "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times), "images_per_s": b / med,
           "tflops": flops / med / 1e12, "warmup_s": warmup_s, "finite": bool(torch.isfinite(out).all()),
           "output": out}  # fmt: skip
    if run.ceiling:
        row["pct_ceiling"] = 100 * row["tflops"] / run.ceiling
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    for ref in ("V1", "V5"):
        if (base := run.ref.get((ref, b))) is not None:
            row[f"x_{ref.lower()}"] = base["ms_per_image"] / row["ms_per_image"]
            if ref == "V1":
                row["rel_err"] = rel_err(out, base["output"])
    if vid in ("V1", "V5"):
        run.ref[(vid, b)] = row
        if vid == "V5" and (v1 := run.ref.get(("V1", b))) is not None:
            row["rel_err"] = rel_err(out, v1["output"])
    if gate is not None:
        row["ran_eagerly"] = gate.eager_calls - eager_before
    run.write(row)
    return row


# --- variants ---


def env_info(run: Run) -> None:
    info = {"variant": "P0", "torch": torch.__version__, "python": platform.python_version(),
            "device": str(run.device), "threads": torch.get_num_threads(),
            "fp8": fp8_unsupported_reason(run.device) or "available"}  # fmt: skip
    if run.device.type == "cuda":
        p = torch.cuda.get_device_properties(run.device)
        info |= {"gpu": p.name, "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "sdpa_enabled": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                  "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                  "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                  "math": torch.backends.cuda.math_sdp_enabled()}}  # fmt: skip
        try:
            import subprocess

            q = "name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"],
                                                capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        except Exception as e:
            info["nvidia_smi"] = str(e)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception as e:
        info["diffusers"] = f"unavailable: {e}"
    (run.out / "env.json").write_text(json.dumps(info, indent=1, default=str))
    run.write(info)


def ceilings(run: Run) -> None:
    d, n = run.device, (8192 if run.device.type == "cuda" else 256)
    a = torch.randn(n, n, device=d, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=d, dtype=torch.bfloat16)
    row = {"variant": "P1", "n": n}
    for _ in range(3):
        a @ b
    row["bf16_mm_tflops"] = 2 * n**3 / statistics.median(timed(lambda: a @ b, run.micro_reps, d)) / 1e12
    run.ceiling = row["bf16_mm_tflops"]
    if fp8_unsupported_reason(d) is None:
        a8, sa = quantize_tokens(a)
        b8, sb = quantize_rows(b)
        ts, tb = sa.max(), sb.max()
        tw = functools.partial(torch._scaled_mm, a8, b8.t(), scale_a=ts, scale_b=tb, out_dtype=torch.bfloat16)
        rw = functools.partial(
            torch._scaled_mm, a8, b8.t(), scale_a=sa, scale_b=sb.reshape(1, -1), out_dtype=torch.bfloat16
        )
        for name, fn in (("fp8_tensorwise_tflops", tw), ("fp8_rowwise_tflops", rw)):
            fn(use_fast_accum=True)
            sec = statistics.median(timed(functools.partial(fn, use_fast_accum=True), run.micro_reps, d))
            row[name] = 2 * n**3 / sec / 1e12
    size = (4 << 30) if d.type == "cuda" else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=d)
    dst = torch.empty_like(src)
    dst.copy_(src)
    row["copy_tb_s"] = 2 * size / statistics.median(timed(lambda: dst.copy_(src), run.micro_reps, d)) / 1e12
    run.write(row)


def _kernel_names(fn, device) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    keys = [e.key for e in prof.key_averages()]
    return [
        k for k in keys if any(s in k.lower() for s in ("flash", "cudnn", "fmha", "attention", "efficient"))
    ][:6]


def backends_call(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def attention_micro(run: Run, spec) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c, d = spec.transformer, run.device
    n = (run.args.size // spec.multiple) ** 2 + CONTEXT
    shapes = [(1, c.num_heads, n, c.head_dim), (4, c.num_heads, n, c.head_dim)]
    if spec.name == "klein-4b":
        shapes.append((1, 32, n, 128))  # 9B's heads
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
    for shape in shapes:
        q, k, v = (torch.randn(shape, device=d, dtype=run.dtype) for _ in range(3))
        row = {"variant": "A1", "shape": list(shape)}
        flops = 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3]
        for name, backend in backends.items():

            def call(backend=backend, q=q, k=k, v=v):
                if backend is None:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            try:
                call()
                sec = statistics.median(timed(call, run.micro_reps, d))
                row[name] = {"ms": 1e3 * sec, "tflops": flops / sec / 1e12}
            except RuntimeError as e:
                row[name] = f"unavailable: {str(e).splitlines()[0][:160]}"
        row["default_kernels"] = _kernel_names(functools.partial(backends_call, q, k, v), d)
        run.write(row)


def gemm_micro(run: Run, spec, b: int) -> None:
    c, d = spec.transformer, run.device
    h, m = c.hidden_size, c.mlp_hidden
    n_img = (run.args.size // spec.multiple) ** 2
    shapes = [("single qkv", (n_img + CONTEXT) * b, h, 3 * h), ("single mlp in", (n_img + CONTEXT) * b, h, 2 * m),
              ("single out", (n_img + CONTEXT) * b, h + m, h), ("double img qkv", n_img * b, h, 3 * h),
              ("double img proj", n_img * b, h, h), ("double img mlp in", n_img * b, h, 2 * m),
              ("double img mlp out", n_img * b, m, h), ("double txt qkv", CONTEXT * b, h, 3 * h)]  # fmt: skip
    fp8 = fp8_unsupported_reason(d) is None
    for name, rows, k_in, n_out in shapes:
        x = torch.randn(rows, k_in, device=d, dtype=run.dtype)
        w = torch.randn(n_out, k_in, device=d, dtype=run.dtype)
        flops = 2 * rows * k_in * n_out
        row = {"variant": "A2", "shape": name, "M": rows, "K": k_in, "N": n_out, "B": b}
        calls = {"bf16": lambda x=x, w=w: torch.nn.functional.linear(x, w)}
        if fp8:
            w8, ws = quantize_rows(w)
            a8, xs = quantize_tokens(x)
            calls["fp8_rowwise_with_quant"] = lambda x=x, w8=w8, ws=ws: fp8_linear(x, w8, ws)
            calls["fp8_rowwise_prequant"] = lambda a8=a8, xs=xs, w8=w8, ws=ws: torch._scaled_mm(
                a8, w8.t(), scale_a=xs, scale_b=ws.reshape(1, -1), out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip
            calls["fp8_tensorwise"] = lambda a8=a8, xs=xs, w8=w8, ws=ws: torch._scaled_mm(
                a8, w8.t(), scale_a=xs.max(), scale_b=ws.max(), out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip
        for label, fn in calls.items():
            try:
                fn()
                sec = statistics.median(timed(fn, run.micro_reps, d))
                row[label] = {"ms": 1e3 * sec, "tflops": flops / sec / 1e12}
            except RuntimeError as e:
                row[label] = f"unavailable: {str(e).splitlines()[0][:160]}"
        if isinstance(row.get("fp8_rowwise_with_quant"), dict):
            row["fp8_over_bf16"] = row["bf16"]["ms"] / row["fp8_rowwise_with_quant"]["ms"]
        run.write(row)


def profile_forward(run: Run, model, x: dict, path: str) -> dict:
    """One forward under torch.profiler: the table, and device time grouped by kind of kernel."""
    from torch.profiler import ProfilerActivity, profile

    d = run.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if d.type == "cuda" else [])
    pe = model.rope(x["ctx_ids"], x["img_ids"])
    t = torch.full((1,), 0.5, device=d)
    with torch.inference_mode(), profile(activities=acts) as prof:
        model(x["img"], t, x["ctx"], pe)
        sync(d)
    sort = "cuda_time_total" if d.type == "cuda" else "cpu_time_total"
    (run.out / path).write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    groups = {"gemm": 0.0, "attention": 0.0, "elementwise": 0.0, "other": 0.0}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) if d.type == "cuda" else e.self_cpu_time_total
        k = e.key.lower()
        if any(
            s in k
            for s in (
                "gemm",
                "matmul",
                "aten::mm",
                "addmm",
                "cutlass",
                "nvjet",
                "sm90_xmma",
                "scaled_mm",
                "linear",
            )
        ):
            groups["gemm"] += us
        elif any(s in k for s in ("flash", "cudnn", "fmha", "attention", "sdpa")):
            groups["attention"] += us
        elif any(
            s in k
            for s in (
                "elementwise",
                "triton",
                "vectorized",
                "reduce",
                "norm",
                "mul",
                "add",
                "silu",
                "cat",
                "copy",
            )
        ):
            groups["elementwise"] += us
        else:
            groups["other"] += us
    total = sum(groups.values()) or 1.0
    return {k: round(100 * v / total, 1) for k, v in groups.items()}


def transformer_variants(run: Run, spec) -> None:
    args, d = run.args, run.device
    ours, theirs = build(spec, d, run.dtype)
    inputs = {b: make_inputs(spec, b, args.size, d, run.dtype) for b in args.batch}
    compile_kw = {"backend": args.backend}

    def eager():
        dit.set_attention_priority(None)
        for b in args.batch:
            measure(run, "V1", "klein eager (torch's SDPA choice)", klein_run(ours, inputs[b]), b, spec)
        run.write(
            {
                "variant": "V1-profile",
                "kinds_pct": profile_forward(run, ours, inputs[args.batch[0]], "profile_eager.txt"),
            }
        )

    def pinned():
        from torch.nn.attention import SDPBackend

        order = [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]
        dit.set_attention_priority(order)
        try:
            for b in args.batch:
                measure(
                    run,
                    "V2",
                    "klein eager, SDPA cuDNN > flash > efficient > math",
                    klein_run(ours, inputs[b]),
                    b,
                    spec,
                )
        finally:
            dit.set_attention_priority(None)

    def compiled(vid: str, what: str, **fast):
        model = copy.deepcopy(ours)
        opts = FastPath(compile=True, warmup_sizes=((args.size, args.size),), warmup_batches=tuple(args.batch),
                        **compile_kw, **fast)  # fmt: skip
        report = setup_transformer(model, opts)
        warm = warm_up_transformer(model, opts, multiple=spec.multiple)
        run.write(
            {"variant": f"{vid}-setup", "setup": str(report), "warm_up": str(warm), "warmup_s": warm.warmup_s}
        )
        for b in args.batch:
            measure(run, vid, what, klein_run(model, inputs[b]), b, spec, gate=model.forward)
        if vid == "V3":
            run.write(
                {
                    "variant": "V3-profile",
                    "kinds_pct": profile_forward(run, model, inputs[args.batch[0]], "profile_compiled.txt"),
                }
            )
        dit.set_attention_priority(None)

    def peer():
        if theirs is None:
            raise RuntimeError("diffusers is not importable here")
        for b in args.batch:
            measure(
                run,
                "V5",
                "diffusers eager, default attention backend",
                diffusers_run(theirs, inputs[b]),
                b,
                spec,
            )

    def graphs():
        if d.type != "cuda":
            run.write({"variant": "V6", "skipped": "CUDA graphs need CUDA"})
            return
        model = copy.deepcopy(ours)
        opts = FastPath(
            cuda_graphs=True, warmup_sizes=((args.size, args.size),), warmup_batches=(1,), **compile_kw
        )
        # (the B=1 shape only: CUDA graphs are recorded per shape)
        skipped = cudagraph_skips()
        setup_transformer(model, opts)
        warm = warm_up_transformer(model, opts, multiple=spec.multiple)
        b = 1 if 1 in inputs else args.batch[0]
        what = "klein whole-model compile, mode reduce-overhead (CUDA graphs)"
        measure(run, "V6", what, klein_run(model, inputs[b]), b, spec, gate=model.forward)
        # inductor may compile for CUDA graphs and then not use them: V6 would time plain compiled code
        run.write(
            {"variant": "V6-setup", "warm_up": str(warm), "cudagraph_skips": cudagraph_skips() - skipped}
        )
        dit.set_attention_priority(None)

    def peer_best():
        if theirs is None:
            raise RuntimeError("diffusers is not importable here")
        model = copy.deepcopy(theirs)
        if d.type == "cuda":
            model.set_attention_backend("_native_cudnn")
        model.compile_repeated_blocks(fullgraph=True, **compile_kw)
        for b in args.batch:
            measure(
                run,
                "V8",
                "diffusers compile_repeated_blocks + cuDNN attention",
                diffusers_run(model, inputs[b]),
                b,
                spec,
            )

    def torchao_peer():
        if d.type != "cuda":
            run.write({"variant": "V9", "skipped": "torchao's float8 needs CUDA sm89+"})
            return
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        from klein.fp8 import is_fp8_layer

        model = copy.deepcopy(ours)
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and is_fp8_layer(name))  # fmt: skip
        for block in (*model.double_blocks, *model.single_blocks):
            block.compile(fullgraph=True, **compile_kw)
        for b in args.batch:
            measure(
                run,
                "V9",
                "klein + torchao float8 rowwise + regional compile",
                klein_run(model, inputs[b]),
                b,
                spec,
            )

    fp8_reason = fp8_unsupported_reason(d)
    run.variant("V1", "klein eager", 25, eager)
    run.variant("V2", "klein eager, SDPA pinned", 20, pinned)
    run.variant(
        "V3",
        "klein regional compile",
        90,
        lambda: compiled("V3", "klein regional compile (blocks, fullgraph), SDPA pinned"),
    )
    if fp8_reason is None:
        run.variant(
            "V4",
            "klein compile + FP8",
            90,
            lambda: compiled("V4", "klein regional compile + FP8 W8A8 rowwise", quantize="fp8"),
        )
    elif run.wanted("V4"):
        run.write({"variant": "V4", "skipped": f"FP8: {fp8_reason}"})
    run.variant("V5", "diffusers eager", 30, peer)
    frozen = functools.partial(compiled, "V10", "klein regional compile, frozen weights (inductor freezing)", freeze=True)  # fmt: skip
    # (last: what is left of the deadline once the ranked techniques are measured; frozen, each
    # block compiles on its own, so it takes longer than V3)
    run.later = [("V6", "CUDA graphs", 75, graphs), ("V8", "diffusers best native", 75, peer_best), ("V9", "torchao peer", 90, torchao_peer), ("V10", "compile + freeze", 180, frozen)]  # fmt: skip


def end_to_end(run: Run, spec) -> None:
    """Text encoder + transformer + VAE on random weights of the preset, one 1024² image, p50."""
    from klein import GenerationRequest, ModelSource, Pipeline

    args, d = run.args, run.device
    source = (
        ModelSource.random_weights(spec.name) if spec.random_seed is None else ModelSource.preset(spec.name)
    )
    req = GenerationRequest("a lighthouse at dusk, photographed on film", args.size, args.size, seed=1)
    variants = [("E1", "eager bf16 (torch's SDPA choice)", FastPath(attention="default")),
                ("E2", "compiled (text, DiT, VAE), SDPA pinned", FastPath(compile=True, backend=args.backend))]  # fmt: skip
    if fp8_unsupported_reason(d) is None:
        variants.append(
            ("E3", "compiled + FP8", FastPath(compile=True, quantize="fp8", backend=args.backend))
        )

    def measured(vid: str, what: str, fast: FastPath):
        def go():
            from dataclasses import replace

            opts = replace(fast, warmup_sizes=((args.size, args.size),), warmup_batches=(1,))
            if d.type == "cuda":
                torch.cuda.reset_peak_memory_stats(d)
            t = time.perf_counter()
            pipe = Pipeline(source, device=d, dtype=run.dtype, fast=opts)
            load_s = time.perf_counter() - t
            warm = sum(r.warmup_s for r in pipe.warm_up())
            pipe.generate([req])
            times = timed(lambda: pipe.generate([req]), args.reps_b1, d)
            row = {"variant": vid, "what": what, "p50_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                   "max_ms": 1e3 * max(times), "load_s": load_s, "warmup_s": warm, "setup": [str(r) for r in pipe.reports]}  # fmt: skip
            if d.type == "cuda":
                row["peak_gb"] = torch.cuda.max_memory_allocated(d) / 1e9
            run.write(row)
            dit.set_attention_priority(None)

        return go

    for vid, what, fast in variants:
        run.variant(vid, what, 40 if vid == "E1" else 120, measured(vid, what, fast))
    # the best end to end there may be: first of what runs with the time the deadline leaves
    quantize = "fp8" if fp8_unsupported_reason(d) is None else None
    what = f"compiled, transformer whole with CUDA graphs{' + FP8' if quantize else ''}"
    if d.type == "cuda":
        fast = FastPath(compile=True, cuda_graphs=True, quantize=quantize, backend=args.backend)
        run.later.insert(0, ("E4", what, 150, measured("E4", what, fast)))
    elif run.wanted("E4"):
        run.write({"variant": "E4", "skipped": "CUDA graphs need CUDA"})


def vae_variants(run: Run, spec) -> None:
    from klein.vae import Decoder

    d, c = run.device, spec.vae
    torch.manual_seed(0)
    decoder = Decoder(c).to(d, run.dtype).eval().requires_grad_(False)
    side = run.args.size // 8
    z = torch.randn(1, c.z_channels, side, side, device=d, dtype=run.dtype)
    with torch.inference_mode():
        want = decoder(z)
        row = {"variant": "V7", "size": run.args.size}
        row["eager_nchw_ms"] = 1e3 * statistics.median(timed(lambda: decoder(z), 5, d))
        cl = copy.deepcopy(decoder).to(memory_format=torch.channels_last)
        zc = z.contiguous(memory_format=torch.channels_last)
        row["eager_channels_last_ms"] = 1e3 * statistics.median(timed(lambda: cl(zc), 5, d))
        cl.compile(fullgraph=True, backend=run.args.backend)
        t = time.perf_counter()
        got = cl(zc)
        sync(d)
        row["compile_s"] = time.perf_counter() - t
        row["compiled_channels_last_ms"] = 1e3 * statistics.median(timed(lambda: cl(zc), 5, d))
        row["rel_err"] = rel_err(got, want)
        row["mid_attention_kernels"] = _kernel_names(
            lambda: decoder.mid.attn_1(
                torch.randn(1, c.decoder_channels[-1], side, side, device=d, dtype=run.dtype)
            ),
            d,
        )
    run.write(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="klein-4b")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument(
        "--backend", default="inductor", help="torch.compile backend (aot_eager on CPU rehearsals)"
    )
    ap.add_argument("--deadline", type=float, default=450, help="seconds; later variants are skipped past it")
    ap.add_argument("--estimate-scale", type=float, default=1.0, help="scale the per-variant time estimates")
    ap.add_argument("--reps", type=int, default=3, help="timed runs at batch > 1")
    ap.add_argument("--reps-b1", type=int, default=5, help="timed runs at batch 1")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="+", choices=VARIANTS, metavar="ID",
                    help=f"run only these variants (a second call re-running what failed): {' '.join(VARIANTS)}")  # fmt: skip
    args = ap.parse_args(argv)
    spec = get_preset(args.preset)
    if args.size % spec.multiple or not 64 <= args.size <= 2048:
        ap.error(f"--size: must be a multiple of {spec.multiple} between 64 and 2048, got {args.size}")
    if any(b < 1 or b > 16 for b in args.batch):
        ap.error(f"--batch: each must be between 1 and 16, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device: cuda requested but no CUDA device is available")
    torch.manual_seed(0)
    run = Run(args)
    run.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    run.later = []
    run.variant("P0", "environment", 5, lambda: env_info(run))
    run.variant("P1", "ceilings", 10, lambda: ceilings(run))
    run.variant("A1", "attention micro", 10, lambda: attention_micro(run, spec))
    run.variant("A2", "GEMM micro", 20, lambda: [gemm_micro(run, spec, b) for b in args.batch[:1]])
    run.variant("V", "transformer variants", 60, lambda: transformer_variants(run, spec))
    run.variant("E", "end to end", 5, lambda: end_to_end(run, spec))
    run.variant("V7", "VAE decode", 60, lambda: vae_variants(run, spec))
    for vid, what, estimate, fn in run.later:
        run.variant(vid, what, estimate, fn)
    print("\n" + (run.out / "summary.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
