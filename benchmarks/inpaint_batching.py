"""Inpainting in batches: requests whose start step differs (another strength) run as separate
groups of the transformer; what that costs against one batch of one strength, and that each image
stays its solo run's (tiny preset, in process, CPU by default).

    python benchmarks/inpaint_batching.py [--size 256] [--batch 4] [--steps 8] [--repeats 5]

Four ways to run `--batch` requests, alternating, median wall time of `--repeats` rounds:
- same: one strength (0.5), one batch;
- mixed: two strengths (0.5 and 1.0, half each): two groups, each its own batch;
- plain: text-to-image requests of the same size (no source, no mask), one batch;
- solo: the mixed requests one at a time (what no batching would cost).
The steps that run differ with strength (0.5 of 8 runs 4, 1.0 runs 8), so the figures are also
given per step run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from klein import GenerationRequest, ModelSource, Pipeline


def _source(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)).resize(
        (size, size)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    pipe = Pipeline(ModelSource.preset(args.preset))
    source, n = _source(args.size, 1), args.batch
    mask = Image.new("L", (args.size, args.size), 0)
    mask.paste(255, (args.size // 4, args.size // 4, 3 * args.size // 4, 3 * args.size // 4))

    def inpaint(seed: int, strength: float) -> GenerationRequest:
        return GenerationRequest("a red door", seed=seed, steps=args.steps, references=(source,), mask=mask,
                                 strength=strength)  # fmt: skip

    runs = {
        "same": lambda: pipe.generate([inpaint(i, 0.5) for i in range(n)]),
        "mixed": lambda: pipe.generate([inpaint(i, 0.5 if i % 2 else 1.0) for i in range(n)]),
        "plain": lambda: pipe.generate(
            [
                GenerationRequest("a red door", args.size, args.size, seed=i, steps=args.steps)
                for i in range(n)
            ]
        ),
        "solo": lambda: [pipe.generate([inpaint(i, 0.5 if i % 2 else 1.0)]) for i in range(n)],
    }
    steps_run = {"same": n * args.steps // 2, "mixed": n // 2 * args.steps // 2 + n // 2 * args.steps,
                 "plain": n * args.steps, "solo": n // 2 * args.steps // 2 + n // 2 * args.steps}  # fmt: skip
    for run in runs.values():
        run()  # warm up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    print(f"{n} requests {args.size}x{args.size}, {args.steps} steps, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}:")  # fmt: skip
    for name in runs:
        t = statistics.median(times[name])
        print(
            f"  {name:>6}: {t * 1e3:8.1f} ms  ({steps_run[name]} request-steps, {t / steps_run[name] * 1e3:.1f} ms each)"
        )
    mixed, solo = runs["mixed"](), runs["solo"]()
    exact = all(np.array_equal(np.asarray(a), np.asarray(b[0])) for a, b in zip(mixed, solo, strict=True))
    print(f"  mixed batch images == their solo runs: {exact}")


if __name__ == "__main__":
    main()
