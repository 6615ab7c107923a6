"""The `klein` command line.

    klein generate --prompt TEXT [--preset NAME | --model NAME_OR_PATH [--base-model ID] | --weights DIR]
                   [--transformer FILE] [--vae FILE]
                   [--text-encoder DIR] [--ref IMAGE ...] [--image SRC --mask MASK [--strength S]]
                   [--width W --height H --seed S
                   --steps N --guidance G] [--lora FILE[:SCALE] ...] [--dtype bf16|fp32] [--device cpu|cuda]
                   [--compile [--freeze] [--autotune]] [--cuda-graphs] [--quantize fp8] [--attention NAME]
                   --out FILE.png
    klein serve [--preset NAME [--random-weights] | --model NAME_OR_PATH [--base-model ID] | --weights DIR]
                [--config FILE] [--host HOST] [--port PORT]
    klein download --model ORG/NAME[@REVISION] [--base-model ORG/NAME]
    klein verify IMAGE [--trust-anchor CA.pem] [--watermark-bits BITS]
    klein settings [--markdown] [FILTER]
    klein loadtest --host URL [--users N --spawn-rate R --run-time 60s --shape ramp|burst|soak|drain] [--out DIR]

Bad flags exit with status 2 and a message naming the flag and its bound.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# Request fields -> the flags that set them, for error messages.
FLAGS = {
    field: f"--{field}"
    for field in ("prompt", "width", "height", "seed", "steps", "guidance", "mask", "strength")
} | {"references": "--ref", "loras": "--lora"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klein", description="Serve and run FLUX.2 [klein] image models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _generate_flags,
        _serve_flags,
        _download_flags,
        _loadtest_flags,
        _verify_flags,
        _settings_flags,
    ):
        command = add(sub)
        command.set_defaults(subparser=command)  # errors name the subcommand's usage
    return parser


def _generate_flags(sub) -> argparse.ArgumentParser:
    from klein.config import PRESETS

    g = sub.add_parser("generate", help="generate one image in this process (no Ray)")
    g.add_argument("--prompt", required=True, help="text prompt")
    src = g.add_argument_group("model (default: the tiny preset, random weights)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="model variant")
    _model_flags(src)
    src.add_argument(
        "--weights", type=Path, metavar="DIR", help="diffusers-layout folder or folder of BFL files"
    )
    src.add_argument("--transformer", type=Path, metavar="FILE", help="BFL or FP8 transformer single file")
    src.add_argument("--vae", type=Path, metavar="FILE", help="BFL ae.safetensors")
    src.add_argument("--text-encoder", type=Path, metavar="DIR", help="Qwen3 folder (config.json + weights)")
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA adapter (.safetensors; diffusers, ai-toolkit, kohya formats) and its scale "
        "(-4..4, default 1); up to 3",
    )
    g.add_argument(
        "--ref",
        type=Path,
        action="extend",
        nargs="+",
        default=[],
        metavar="IMAGE",
        help="reference image(s) for editing / multi-reference generation",
    )
    g.add_argument("--image", type=Path, metavar="SRC", help="inpainting: the image to repaint (with --mask)")
    g.add_argument(
        "--mask", type=Path, metavar="MASK", help="inpainting: white repaints (the size of --image)"
    )
    g.add_argument("--strength", type=float, help="inpainting: how much is repainted, (0, 1] (default 0.8)")
    for side in ("--width", "--height"):
        g.add_argument(
            side,
            type=int,
            help="multiple of 16, 64-2048 (default: the model's, 1024, tiny 256; or the first image's)",
        )
    g.add_argument("--seed", type=int, default=0, help="noise seed, 0 to 2**63-1 (default 0)")
    g.add_argument(
        "--steps",
        type=int,
        help="denoising steps (default: the model's: 4 distilled, 50 Base, tiny presets 4)",
    )
    g.add_argument(
        "--guidance",
        type=float,
        help="CFG scale: Base models 1-20 (default 4.0); distilled models take only 1 (no guidance)",
    )
    g.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--out", type=Path, required=True, metavar="FILE", help="output .png, .jpg or .webp")
    fast = g.add_argument_group("fast path (klein.fast)")
    fast.add_argument(
        "--compile", action="store_true", help="torch.compile the model, warmed up at this size first"
    )
    fast.add_argument(
        "--freeze", action="store_true", help="with --compile: weights as constants (inductor freezing)"
    )
    fast.add_argument(
        "--autotune", action="store_true", help="with --compile: GEMM kernels chosen by timing (max-autotune)"
    )
    fast.add_argument(
        "--cuda-graphs", action="store_true", help="CUDA graphs for the transformer (CUDA only)"
    )
    fast.add_argument(
        "--quantize", choices=["fp8"], help="FP8 block linears (FP8 checkpoints are FP8 already)"
    )
    fast.add_argument(
        "--attention",
        choices=["auto", "default", "cudnn", "flash", "efficient", "math"],
        default="auto",
        help="SDPA backend for the transformer (default auto: cuDNN, else flash, on CUDA)",
    )
    return g


def _serve_flags(sub) -> argparse.ArgumentParser:
    from klein.config import PRESETS

    s = sub.add_parser("serve", help="start a local Ray, deploy the service, serve until Ctrl-C / SIGTERM")
    s.add_argument("--preset", choices=sorted(PRESETS), help="model variant (default: the config's; tiny)")
    _model_flags(s)
    s.add_argument(
        "--weights", type=Path, metavar="DIR", help="diffusers-layout folder or folder of BFL files"
    )
    s.add_argument(
        "--random-weights",
        action="store_true",
        help="serve the preset's real architecture with random weights (benchmarks without a checkpoint)",
    )
    s.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="Serve config YAML (default: serve/configs/local-cpu.yaml)",
    )
    s.add_argument("--host", help="bind address (default: the config's, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default: the config's, 8000)")
    return s


def _download_flags(sub) -> argparse.ArgumentParser:
    d = sub.add_parser(
        "download", help="fetch a hub model into the cache (HF_HOME), e.g. to fill a volume before serving"
    )
    _model_flags(d, required=True)
    return d


def _loadtest_flags(sub) -> argparse.ArgumentParser:
    lt = sub.add_parser(
        "loadtest", help="run Locust headless against a running service; write CSV, HTML, summary"
    )
    lt.add_argument("--host", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    lt.add_argument("--users", type=int, default=8, help="concurrent users (peak users with --shape)")
    lt.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    lt.add_argument("--run-time", default="60s", help="how long, e.g. 30s, 5m (the run stops then)")
    lt.add_argument(
        "--shape", choices=["ramp", "burst", "soak", "drain"], help="load shape over the run time"
    )
    lt.add_argument("--out", type=Path, default=Path("loadtest-out"), metavar="DIR", help="reports folder")
    lt.add_argument("--sizes", help="WxH,... (default 512x512 to 2 MP)")
    return lt


def _settings_flags(sub) -> argparse.ArgumentParser:
    st = sub.add_parser("settings", help="list every setting: its KLEIN_* variable, default and meaning")
    st.add_argument("filter", nargs="?", default="", help="only variables containing this, e.g. STORAGE")
    st.add_argument("--markdown", action="store_true", help="as a Markdown table")
    return st


def _settings(args) -> int:
    """The settings reference, generated from the settings models (serve.settings.reference)."""
    from serve.settings import reference

    rows = [r for r in reference() if args.filter.upper() in r[0]]
    if args.markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        for variable, default, meaning in rows:
            print(f"| `{variable}` | {f'`{default}`' if default else ''} | {meaning} |")
        return 0
    for variable, default, meaning in rows:
        print(f"{variable}={default}\n    {meaning}")
    return 0


def _verify_flags(sub) -> argparse.ArgumentParser:
    v = sub.add_parser("verify", help="check an image's C2PA manifest and invisible watermark")
    v.add_argument("image", type=Path, help="PNG, JPEG or WebP file")
    v.add_argument("--trust-anchor", type=Path, metavar="PEM", help="CA certificate(s) to trust")
    v.add_argument("--watermark-bits", default=None, metavar="BITS", help="expected 48-bit payload")
    return v


def _model_flags(group, required: bool = False) -> None:
    group.add_argument(
        "--model",
        required=required,
        metavar="NAME",
        help="a hub id org/name[@revision] (downloaded into HF_HOME; HF_TOKEN for gated repositories, "
        "HF_HUB_OFFLINE=1 for the cache alone), or a local folder or transformer file",
    )
    group.add_argument(
        "--base-model",
        metavar="ORG/NAME",
        help="for an FP8 hub model: the bf16 repository its text encoder, tokenizer and VAE come from "
        "(known for BFL's own FP8 repositories)",
    )


def _model_source(args, parser: argparse.ArgumentParser):
    """--model (a hub id or a path) -> ModelSource; every failure is a message naming the flag."""
    from klein import ModelSource
    from klein.checkpoint import CheckpointError
    from klein.hub import HubError

    if args.base_model and not args.model:
        parser.error("--base-model: only with --model")
    try:
        return ModelSource.from_name(args.model, args.base_model, getattr(args, "preset", None))
    except HubError as e:
        parser.error(f"--model: {e}")
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        parser.error(f"--model: {args.model}: {e}")


def _download(args, parser: argparse.ArgumentParser) -> int:
    source = _model_source(args, parser)
    print(f"{args.model}: {source.spec.name} ({'Base' if source.spec.sampling.cfg else 'distilled'})")
    for part in (source.transformer, source.vae, source.text_encoder):
        print(f"  {part.files[0].parent}")
    return 0


def _generate(args, parser: argparse.ArgumentParser) -> int:
    import torch

    from klein import DTYPES, Pipeline
    from klein.lora import LoraError, LoraOptions

    fmt = OUTPUT_FORMATS.get(args.out.suffix.lower())
    if fmt is None:
        parser.error(f"--out: must end in {', '.join(OUTPUT_FORMATS)}, got {args.out.name!r}")
    if not args.out.parent.is_dir():
        parser.error(f"--out: folder {args.out.parent} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda requested but no CUDA device is available")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    source = _generate_source(args, parser)
    request = _generate_request(args, parser, source.spec)
    fast = _fast_path(args, parser, device, request)

    t0 = time.perf_counter()
    pipe = Pipeline(
        source, device=device, dtype=dtype, fast=fast, lora=LoraOptions() if request.loras else None
    )
    t1 = time.perf_counter()
    warm = sum(r.warmup_s for r in pipe.warm_up(cfg=request.guidance is not None and request.guidance > 1))
    t2 = time.perf_counter()
    try:
        image = pipe.generate([request], on_step=_progress(request.run_steps))[0]
    except LoraError as e:
        parser.error(f"--lora: {e}")
    image.save(args.out, format=fmt)
    t3 = time.perf_counter()
    speed = "".join(f"\n  {r}" for r in pipe.reports if r.actions)
    print(
        f"{args.out} {request.width}x{request.height} seed={request.seed} steps={request.steps} "
        f"model={source.spec.name} load={t1 - t0:.2f}s warm-up={warm:.2f}s generate={t3 - t2:.2f}s{speed}"
    )
    return 0


def _generate_source(args, parser: argparse.ArgumentParser):
    """The model `klein generate` runs: --model, weights files, or a preset (the tiny one by default)."""
    from klein import ModelSource
    from klein.checkpoint import CheckpointError

    files = {
        "--weights": args.weights,
        "--transformer": args.transformer,
        "--vae": args.vae,
        "--text-encoder": args.text_encoder,
    }
    if args.model and any(files.values()):
        parser.error("--model: give either --model or weights files, not both")
    if args.base_model and not args.model:
        parser.error("--base-model: only with --model")
    if args.model:
        return _model_source(args, parser)
    try:
        if any(files.values()):
            return ModelSource.from_paths(
                args.weights, args.transformer, args.vae, args.text_encoder, args.preset
            )
        return ModelSource.preset(args.preset or "tiny")
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        given = [f for f, v in files.items() if v]
        flag = next(
            (f for f in given if str(files[f]) in str(e)),
            "--preset" if args.preset and not given else " / ".join(given) or "--weights",
        )
        parser.error(f"{flag}: {e}")


def _generate_request(args, parser: argparse.ArgumentParser, spec):
    """The flags as a validated GenerationRequest; a bad value is a message naming its flag."""
    from PIL import Image, UnidentifiedImageError

    from klein import GenerationRequest, InvalidRequest
    from klein.image import upright
    from klein.request import validate

    def read(path: Path, flag: str) -> Image.Image:
        try:
            with Image.open(path) as im:
                im.load()
                return upright(im)  # turned by its EXIF orientation, as diffusers' load_image does
        except (OSError, UnidentifiedImageError) as e:
            parser.error(f"{flag}: cannot read image {path}: {e}")

    if (args.image is None) != (args.mask is None):
        parser.error(
            "--mask: inpainting takes both --image and --mask (--mask is missing)"
            if args.image
            else "--image: inpainting takes both --image and --mask (--image is missing)"
        )
    if args.strength is not None and args.mask is None:
        parser.error("--strength: only with --image and --mask (inpainting)")
    refs = [read(path, "--ref") for path in args.ref]
    if args.image is not None:
        refs.insert(0, read(args.image, "--image"))
    mask = read(args.mask, "--mask") if args.mask is not None else None
    request = GenerationRequest(
        prompt=args.prompt,
        width=args.width,
        height=args.height,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        references=tuple(refs),
        loras=_loras(args.lora, parser),
        mask=mask,
        strength=args.strength,
    )
    try:
        return validate(spec, request)
    except InvalidRequest as e:
        flag = FLAGS.get(e.field.split("[")[0], e.field)
        if args.image is not None and e.field.startswith("references[0]"):
            flag = "--image"
        parser.error(f"{flag}: {e.message}")


def _fast_path(args, parser: argparse.ArgumentParser, device: str, request):
    """The fast-path flags as FastPath options, warmed at the request's size."""
    from klein import FastPath
    from klein.fast import FREEZE_WITH_LORA, OptionConflict

    if args.cuda_graphs and device != "cuda":
        parser.error(f"--cuda-graphs: needs CUDA; the device is {device}")
    if args.attention not in ("auto", "default", "math") and device != "cuda":
        parser.error(f"--attention: {args.attention} needs CUDA; the device is {device}")
    if args.freeze and args.lora:
        parser.error(f"--freeze: not with --lora: {FREEZE_WITH_LORA}")
    try:
        return FastPath(
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
            freeze=args.freeze,
            autotune=args.autotune,
            quantize=args.quantize,
            attention=args.attention,
            warmup_sizes=((request.width, request.height),) if args.compile or args.cuda_graphs else (),
        )
    except OptionConflict as e:
        parser.error(e.worded(lambda name: "--" + name.replace("_", "-")))


def _loras(values: list[str], parser: argparse.ArgumentParser) -> tuple:
    """--lora FILE[:SCALE] -> LoraRequests; a missing file names the flag."""
    from klein.request import LoraRequest

    out = []
    for value in values:
        path, _, scale = value.rpartition(":")
        try:
            path, scale = (path, float(scale)) if path else (value, 1.0)
        except ValueError:
            path, scale = value, 1.0
        if not Path(path).is_file():
            parser.error(f"--lora: {path} is not a file")
        out.append(LoraRequest(path, scale))
    return tuple(out)


def _loadtest(args, parser: argparse.ArgumentParser) -> int:
    import importlib.util
    import math
    import os
    import re

    from serve import loadtest

    if not args.host.startswith(("http://", "https://")):
        parser.error(f"--host: must be an http(s) URL, got {args.host!r}")
    if args.users < 1:
        parser.error(f"--users: must be at least 1, got {args.users}")
    if not (math.isfinite(args.spawn_rate) and args.spawn_rate > 0):
        parser.error(f"--spawn-rate: must be a positive number, got {args.spawn_rate}")
    if args.sizes is not None:
        for size in args.sizes.split(","):
            if re.fullmatch(r"[0-9]{2,5}x[0-9]{2,5}", size.strip()) is None:
                parser.error(f"--sizes: WxH,... like 512x512,1024x768; got {size!r}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} is a file; name a folder for the reports")
    if importlib.util.find_spec("locust") is None:
        parser.error('locust is not installed: pip install -e ".[loadtest]" -c constraints.txt')
    try:
        seconds = loadtest._seconds(args.run_time)
    except ValueError as e:
        parser.error(f"--run-time: {e}")
    if not 1 <= seconds <= 24 * 3600:
        parser.error(f"--run-time: must be between 1 s and 24 h, got {args.run_time}")
    extra = {"KLEIN_SIZES": args.sizes} if args.sizes else {}
    try:
        summary = loadtest.run(
            args.host,
            args.out,
            users=args.users,
            spawn_rate=args.spawn_rate,
            run_time=args.run_time,
            shape=args.shape,
            api_key=os.environ.get("KLEIN_API_KEY"),
            extra_env=extra,
        )
    except RuntimeError as e:  # Locust itself failed: its log says why
        print(f"klein loadtest: {e}", file=sys.stderr)
        return 1
    print((args.out / "summary.md").read_text())
    return 0 if summary["images"] > 0 else 1


def _verify(args, parser: argparse.ArgumentParser) -> int:
    """Exit 0 when the image carries a valid manifest or the watermark, 1 when it carries neither."""
    from PIL import Image, UnidentifiedImageError

    from klein.provenance import BFL_WATERMARK_BITS, decode_watermark, hamming, parse_bits, read_manifest

    if not args.image.is_file():
        parser.error(f"image: {args.image} does not exist")
    try:
        expected = parse_bits(args.watermark_bits or BFL_WATERMARK_BITS)
    except ValueError as e:
        parser.error(f"--watermark-bits: {e}")
    data = args.image.read_bytes()
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        parser.error(f"image: cannot read {args.image}: {e}")
    mime = Image.MIME.get(image.format, "application/octet-stream")
    anchor = None
    if args.trust_anchor is not None:
        if not args.trust_anchor.is_file():
            parser.error(f"--trust-anchor: {args.trust_anchor} does not exist")
        anchor = args.trust_anchor.read_bytes()
    try:
        state, manifest = read_manifest(data, mime, anchor)
    except ValueError as e:
        parser.error(f"--trust-anchor: {args.trust_anchor}: {e}")
    print(f"C2PA: {state}")
    if manifest:
        print(f"  title: {manifest.get('title')}")
        gen = manifest.get("claim_generator_info") or [{}]
        print(f"  claim generator: {gen[0].get('name')} {gen[0].get('version', '')}".rstrip())
        sig = manifest.get("signature_info") or {}
        print(f"  signed by: {sig.get('issuer')} ({sig.get('alg')}) at {sig.get('time', 'no timestamp')}")
        for assertion in manifest.get("assertions", []):
            if assertion.get("label", "").startswith("c2pa.actions"):
                for a in assertion["data"]["actions"]:
                    model = (a.get("parameters") or {}).get("model", "")
                    print(f"  action: {a['action']} {a.get('digitalSourceType', '')} {model}".rstrip())
        print(f"  ingredients: {len(manifest.get('ingredients', []))}")
    bits = decode_watermark(image)
    if bits is None:
        print("watermark: image smaller than 256 px, none can be carried")
        mark = False
    else:
        distance = hamming(bits, expected)
        mark = distance <= 2
        verdict = "present" if mark else "absent"
        print(f"watermark: {verdict} ({distance} of 48 bits differ from the expected payload)")
    return 0 if mark or (manifest and state in ("Valid", "Trusted")) else 1


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="denoise", unit="step", leave=False)

    def on_step(i: int, n: int) -> None:
        bar.update(1)
        if i == n:
            bar.close()

    return on_step


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args, args.subparser)
    if args.command == "loadtest":
        return _loadtest(args, args.subparser)
    if args.command == "verify":
        return _verify(args, args.subparser)
    if args.command == "download":
        return _download(args, args.subparser)
    if args.command == "settings":
        return _settings(args)
    if args.command == "serve":
        from serve.run import serve_forever

        return serve_forever(args, args.subparser)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
