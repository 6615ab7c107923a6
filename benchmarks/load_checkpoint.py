"""Loading a large transformer checkpoint: seconds and peak RSS against the file size.

    python benchmarks/load_checkpoint.py [--gb 2.0] [--dtype bf16] [--dir /tmp/klein-load-bench]

Writes a random BFL-layout transformer of about --gb gigabytes (once), then loads it in fresh
processes: with klein's loader (meta device, tensors read one by one into their final storage),
and for comparison with `safetensors.torch.load_file` + `load_state_dict(assign=True)`.
The page cache is warm (the file was just written or read); RSS is the process's own. "First use"
reads every weight once, which is when lazily mapped tensors actually reach memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import psutil, torch
from klein.config import TransformerConfig
from klein.loader import Component, load_transformer, transformer_config
from klein.transformer import Flux2
path, mode, dtype = sys.argv[1], sys.argv[2], {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[3]]
comp = Component((__import__("pathlib").Path(path),), "bfl")
cfg = transformer_config(comp)
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
if mode == "klein":
    model = load_transformer(comp, cfg, "cpu", dtype)
else:
    from safetensors.torch import load_file
    with torch.device("meta"):
        model = Flux2(cfg)
    sd = {k: v.to(dtype) for k, v in load_file(path).items()}
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
elapsed = time.perf_counter() - t0
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.inference_mode():  # first use: every weight read once (mmap-backed tensors fault in here)
    checksum = sum(float(p.sum(dtype=torch.float32)) for p in model.parameters())
first_use = time.perf_counter() - t0 - elapsed
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": elapsed, "first_use": first_use, "load_peak_rss": load_peak, "baseline_rss": base, "peak_rss": peak, "model_bytes": n,
                  "final_rss": psutil.Process().memory_info().rss}))
"""


def write_checkpoint(path: Path, gb: float) -> None:
    import torch

    from klein.checkpoint import save_safetensors
    from klein.config import TransformerConfig

    # hidden 2048 (16 heads of 128), like the real models' block structure; depth sized to --gb in bf16
    h = 2048
    per_double, per_single = 2 * (3 + 1 + 6 + 3) * h * h, (3 + 6 + 1 + 3) * h * h
    n_single = max(1, int(gb * 1e9 / 2 / (per_double / 2 + per_single)))
    cfg = TransformerConfig(in_channels=128, hidden_size=h, num_heads=16, depth=max(1, n_single // 2),
                            depth_single_blocks=n_single, context_in_dim=3 * 2560)  # fmt: skip
    from klein.transformer import Flux2

    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux2(cfg).state_dict().items()}
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_safetensors(sd, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/klein-load-bench"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"flux-2-klein-bench-{args.gb:g}gb.safetensors"
    if not path.exists():
        write_checkpoint(path, args.gb)
    size = path.stat().st_size
    print(f"checkpoint {path}: {size / 1e9:.2f} GB (bf16), loading as {args.dtype}")
    for mode in ("klein", "klein", "safetensors.load_file"):
        r = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(path), mode, args.dtype],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
        extra = r["load_peak_rss"] - r["baseline_rss"]
        print(
            f"{mode:>22}: load {r['seconds']:.2f} s, peak RSS {r['load_peak_rss'] / 1e9:.2f} GB = "
            f"{r['load_peak_rss'] / size:.2f}x file ({extra / size:.2f}x above the {r['baseline_rss'] / 1e9:.2f} GB "
            f"baseline); first use of every weight {r['first_use']:.2f} s, peak RSS then "
            f"{r['peak_rss'] / 1e9:.2f} GB (model {r['model_bytes'] / 1e9:.2f} GB)"
        )


if __name__ == "__main__":
    main()
