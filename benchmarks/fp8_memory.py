"""Resident memory of a transformer held in FP8 against bf16, loaded by klein's own loader.

    python benchmarks/fp8_memory.py [--preset klein-9b] [--dir /tmp/klein-fp8-bench]

Writes (once) two random checkpoints with the preset's real geometry in BFL's layouts, tensor by
tensor: `flux-2-<preset>-bench.safetensors` (bf16) and `...-fp8.safetensors` (e4m3 block linears with
a scalar `weight_scale`, as BFL's FP8 releases). Then, each in a fresh process: loads the bf16 file as
bf16, loads the FP8 file (kept FP8 where the device runs FP8 GEMMs: the CPU does with torch 2.13), and
loads the bf16 file with `--quantize fp8` (each block linear converted as it is read); reports the bytes held by the model's tensors,
the process's peak and final RSS, and runs one small forward to show the model works as held.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import psutil, torch
from pathlib import Path
from klein.fast import FastPath, setup_transformer
from klein.fp8 import weight_bytes
from klein.loader import Component, load_transformer, transformer_config
from klein.sampler import grid_ids, text_ids
path, quantize = Path(sys.argv[1]), sys.argv[2] == "fp8"
comp = Component((path,), "bfl")
cfg = transformer_config(comp)
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
model = load_transformer(comp, cfg, "cpu", torch.bfloat16, quantize="fp8" if quantize else None)
if quantize:  # as klein.fast's set-up runs it after loading: the block linears are FP8 already
    setup_transformer(model, FastPath(quantize="fp8"))
seconds = time.perf_counter() - t0
loaded_rss = psutil.Process().memory_info().rss
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.inference_mode():  # one small forward: 16 image + 8 text tokens
    ids, tids = grid_ids(4, 4)[None], text_ids(8)[None]
    out = model(torch.randn(1, 16, cfg.in_channels), torch.tensor([0.5]), torch.randn(1, 8, cfg.context_in_dim),
                model.rope(tids, ids))
print(json.dumps({"seconds": seconds, "model_bytes": weight_bytes(model), "baseline_rss": base,
                  "loaded_rss": loaded_rss, "load_peak_rss": load_peak,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "block_dtype": str(model.single_blocks[0].linear1.weight.dtype),
                  "finite": bool(torch.isfinite(out).all())}))
"""


def write_random(path: Path, preset: str, fp8: bool) -> None:
    """A random BFL-layout transformer file, generated and written one tensor at a time."""
    import torch

    from klein.checkpoint import _FORMATS, quantize_fp8
    from klein.config import get_preset
    from klein.fp8 import is_fp8_layer
    from klein.transformer import Flux2

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux2(get_preset(preset).transformer).state_dict().items()}
    entries = []  # (name, shape, dtype) in file order
    for key, shape in shapes.items():
        quantised = fp8 and key.endswith(".weight") and is_fp8_layer(key.removesuffix(".weight"))
        entries.append((key, shape, torch.float8_e4m3fn if quantised else torch.bfloat16))
        if quantised:
            entries.append((key.removesuffix(".weight") + ".weight_scale", (), torch.float32))
    header, offset = {}, 0
    for name, shape, dtype in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _FORMATS[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape, dtype in entries:
            if key.endswith(".weight_scale"):
                continue  # written with its weight
            w = torch.randn(shape, generator=g) * 0.02
            if dtype == torch.float8_e4m3fn:
                q = quantize_fp8({key: w}, lambda _: True)
                f.write(q[key].reshape(-1).view(torch.uint8).numpy().tobytes())
                f.write(
                    q[key.removesuffix(".weight") + ".weight_scale"]
                    .reshape(-1)
                    .view(torch.uint8)
                    .numpy()
                    .tobytes()
                )
            else:
                f.write(w.to(torch.bfloat16).reshape(-1).view(torch.uint8).numpy().tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="klein-9b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/klein-fp8-bench"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for fp8 in (False, True):
        path = args.dir / f"flux-2-{args.preset}-bench{'-fp8' if fp8 else ''}.safetensors"
        if not path.exists():
            write_random(path, args.preset, fp8)
        files[fp8] = path
    rows = [("bf16 file, held in bf16", files[False], "none"), ("FP8 file (BFL layout)", files[True], "none"),
            ("bf16 file, --quantize fp8", files[False], "fp8")]  # fmt: skip
    print(f"{args.preset} transformer; files: bf16 {files[False].stat().st_size / 1e9:.2f} GB, "
          f"FP8 {files[True].stat().st_size / 1e9:.2f} GB")  # fmt: skip
    results = {}
    for label, path, quantize in rows:
        r = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(path), quantize],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
        results[label] = r
        print(f"{label:>28}: model tensors {r['model_bytes'] / 1e9:.2f} GB ({r['block_dtype']} block linears), "
              f"RSS after load {r['loaded_rss'] / 1e9:.2f} GB, peak {r['load_peak_rss'] / 1e9:.2f} GB "
              f"(baseline {r['baseline_rss'] / 1e9:.2f} GB), load {r['seconds']:.1f} s, forward finite: {r['finite']}")  # fmt: skip
    bf16, fp8 = results[rows[0][0]], results[rows[1][0]]
    print(f"FP8 / bf16: model tensors {fp8['model_bytes'] / bf16['model_bytes']:.3f}, "
          f"RSS after load {(fp8['loaded_rss'] - fp8['baseline_rss']) / (bf16['loaded_rss'] - bf16['baseline_rss']):.3f} "
          "(above each process's baseline)")  # fmt: skip


if __name__ == "__main__":
    main()
