"""Warm-up of a model stage compiled with inductor, from nothing and with the compiled code an
earlier replica left in storage (deployments.stages.compile_cache).

    python benchmarks/compile_cache.py [--stage text_embedder|transformer|codec] [--preset tiny]
        [--size 256] [--device cpu] [--replicas 3] [--storage DIR] [--bare]

Starts the stage `--replicas` times, one after another, each in a process of its own with an empty
inductor cache (a fresh pod), all sharing one local storage directory (empty at the start unless
`--storage` names one in use); each replica compiles, warms up at `--size` (batch 1) and reports
its warm-up time and what it loaded, found, compiled and saved. The first replica compiles from
nothing; the next ones load what it saved.

`--bare` does the same with klein alone, where Ray and the service's other dependencies are not
installed (the lent GPU machine): the stage's model loaded and set up by klein.fast, torch's
compiled code saved to and loaded from a file in `--storage`, as the stage does through storage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("text_embedder", "transformer", "codec")


def replica(stage: str, preset: str, size: int, device: str | None, root: str) -> dict:
    """One replica of `stage` (in this process): constructed, compiled and warmed up."""
    import hashlib

    from deployments.stages.base import Placement
    from deployments.stages.compile_cache import CompileCache
    from deployments.storage import StorageOptions
    from klein import ModelSource
    from klein.config import get_preset

    spec = get_preset(preset)
    source = (
        ModelSource.random_weights(spec.name) if spec.random_seed is None else ModelSource.preset(spec.name)
    )
    storage = StorageOptions(root=root)
    fast = {
        "compile": True,
        "share_compiled": True,
        "warmup_sizes": [f"{size}x{size}"],
        "warmup_batch_sizes": [1],
    }
    common = {"fast": fast, "placement": Placement(device=device)}
    cache = CompileCache(storage)
    start = time.perf_counter()
    check = None
    if stage == "text_embedder":
        from deployments.stages.text_embedder import TextEmbedder, TextEmbedderOptions

        built = TextEmbedder(source, TextEmbedderOptions(cache_mb=0, **common), compile_cache=cache)
        (embedding,) = built.on_worker(built.embed_now, ["a lighthouse at dusk"])  # the warmed shape
        check = hashlib.sha256(embedding.float().numpy().tobytes()).hexdigest()
    elif stage == "transformer":
        from deployments.stages.transformer import FlowTransformer, FlowTransformerOptions

        built = FlowTransformer(source, FlowTransformerOptions(**common), compile_cache=cache)
    else:
        from deployments.stages.codec import Codec, CodecOptions

        options = CodecOptions(preview_fit_images=8, preview_fit_size=128, **common)
        built = Codec(source, options, storage, compile_cache=cache)
    stats = dict(built._fast) | {"constructed_s": time.perf_counter() - start, "check": check}
    for upload in cache.uploads:  # the save goes on in the background: done before the next replica
        upload.join()
    return stats


def bare_replica(stage: str, preset: str, size: int, device: str | None, root: str) -> dict:
    """One replica's model as klein alone sets it up, with torch's compiled code from `root`."""
    import torch

    from klein import DTYPES, FastPath, ModelSource
    from klein import fast as fastpath
    from klein.config import get_preset

    spec = get_preset(preset)
    source = (
        ModelSource.random_weights(spec.name) if spec.random_seed is None else ModelSource.preset(spec.name)
    )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES["bf16" if dev.type == "cuda" else "fp32"]  # as the stages place themselves
    load, setup, warm_up, kw = {
        "text_embedder": (source.load_text_embedder, fastpath.setup_text_embedder, fastpath.warm_up_text_embedder, {}),
        "transformer": (source.load_transformer, fastpath.setup_transformer, fastpath.warm_up_transformer,
                        {"multiple": spec.multiple}),
        "codec": (source.load_vae, fastpath.setup_vae, fastpath.warm_up_vae, {"multiple": spec.multiple}),
    }[stage]  # fmt: skip
    model = load(dev, dtype)
    opts = FastPath(compile=True, warmup_sizes=((size, size),))
    path = Path(root) / f"{stage}-{dev.type}.bin"
    row = {"loaded_bytes": 0}
    start = time.perf_counter()
    if path.exists():
        blob = path.read_bytes()
        if torch.compiler.load_cache_artifacts(blob) is None:
            raise RuntimeError(f"torch could not read {path}")
        row["loaded_bytes"] = len(blob)
    before = fastpath.compiled_graph_counts()
    setup(model, opts)
    warmed = warm_up(model, opts, **kw)
    found, compiled, _ = (a - b for a, b in zip(fastpath.compiled_graph_counts(), before, strict=True))
    row |= {"warm_up": str(warmed), "constructed_s": time.perf_counter() - start, "check": None}
    saved = torch.compiler.save_cache_artifacts() if compiled else None
    if saved is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(saved[0])
    row["compile_cache"] = (f"{path.name}: loaded {row['loaded_bytes'] / 1e6:.1f} MB; {found} graphs found, "
                            f"{compiled} compiled" + (f"; saving {len(saved[0]) / 1e6:.1f} MB" if saved else ""))  # fmt: skip
    return row


def run_replicas(
    stage: str, preset: str, size: int, device: str | None, replicas: int, root: Path, bare: bool = False
) -> list[dict]:
    rows = []
    for n in range(replicas):
        with tempfile.TemporaryDirectory() as inductor:
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": inductor}
            cmd = [sys.executable, __file__, "--child", "--stage", stage, "--preset", preset, "--size", str(size),
                   "--storage", str(root)] + (["--device", device] if device else []) + ["--bare"] * bare  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800,
                               cwd=Path(__file__).resolve().parents[1])  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"replica {n + 1} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=STAGES, default="text_embedder")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=256, help="the warmed image side")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when there is one")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--storage", help="a local storage directory (default: a new empty one)")
    ap.add_argument("--bare", action="store_true", help="klein alone, without the service (see above)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.replicas < 1:
        ap.error(f"--replicas: at least 1, got {args.replicas}")
    if args.child:
        one = bare_replica if args.bare else replica
        print(json.dumps(one(args.stage, args.preset, args.size, args.device, args.storage)), flush=True)
        return []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.storage or scratch)
        rows = run_replicas(args.stage, args.preset, args.size, args.device, args.replicas, root, args.bare)
    how = "klein alone" if args.bare else "the stage"
    print(f"{args.stage} ({how}), preset {args.preset}, {args.size}², {args.device or 'default device'}:")
    for n, row in enumerate(rows, start=1):
        print(
            f"  replica {n}: constructed in {row['constructed_s']:.1f} s; {row['warm_up']}; {row['compile_cache']}"
        )
    return rows


if __name__ == "__main__":
    main()
