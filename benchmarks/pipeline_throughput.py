"""In-process pipeline latency and throughput (all stages in one process, no Ray).

    python benchmarks/pipeline_throughput.py [--preset tiny] [--size 64 256] [--batch 1 4] [--n 20]

For each (size, batch): median seconds per call and images per second, after a warm-up call.
Real presets (klein-4b, ...) run with random weights at their real sizes.
The served DAG is measured against this baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from klein import GenerationRequest, ModelSource, Pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    source = ModelSource.preset_spec(args.preset)
    source = (
        ModelSource.preset(args.preset)
        if source.random_seed is not None
        else ModelSource.random_weights(args.preset)
    )
    pipe = Pipeline(source, device=args.device, dtype=dtype)
    print(f"{args.preset} on {args.device} {args.dtype}, threads {torch.get_num_threads()}; "
          f"built in {time.perf_counter() - t0:.2f} s")  # fmt: skip
    for size in args.size:
        for batch in args.batch:
            reqs = [GenerationRequest(f"prompt {i}", size, size, seed=i) for i in range(batch)]
            pipe.generate(reqs)
            times = []
            for _ in range(args.n):
                t = time.perf_counter()
                pipe.generate(reqs)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            print(f"{size}x{size} batch {batch}: {med * 1e3:.1f} ms per call (median of {args.n}), "
                  f"{batch / med:.1f} images/s")  # fmt: skip


if __name__ == "__main__":
    main()
