"""Post-processing cost per 1 MP image, part by part, and the Codec post-processing throughput by
batch size.

    python -m benchmarks.postprocess [--size 1024] [--repeats 5] [--batches 1 2 4 8]

Parts: the NSFW classifier (a random ViT-base at 224x224, the architecture of BFL's reference
filter), the dwtDct watermark, PNG / JPEG / WebP encoding, C2PA signing (ES256, test CA). Medians of
`--repeats` runs after a warm-up. The batch table runs the whole chain (classify the batch at once;
per image: watermark, JPEG, sign) as the Codec does, after decoding.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def natural_image(size: int, seed: int = 0) -> Image.Image:
    """Smooth shapes plus grain: closer to a photo than white noise (which compresses badly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y))], -1) * 0.4 + 0.5
    img = (base + rng.normal(0, 0.03, base.shape)).clip(0, 1) * 255
    return Image.fromarray(img.astype(np.uint8))


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()

    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from deployments.stages.codec import CodecOptions, encode_image
    from deployments.stages.payloads import FinishParams
    from deployments.stages.postprocess import PostProcessor, ProvenanceOptions, SafetyOptions
    from klein.provenance import C2PASigner, Watermarker
    from klein.safety import NSFWClassifier
    from tests.certs import make_test_pki

    tmp = Path(tempfile.mkdtemp(prefix="klein-postprocess-"))
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(num_labels=2, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    )
    vit.save_pretrained(tmp / "vit")
    ViTImageProcessor().save_pretrained(tmp / "vit")
    pki = make_test_pki(tmp)

    image = natural_image(args.size)
    mp = args.size * args.size / 1e6
    print(
        f"{args.size}x{args.size} ({mp:.2f} MP), torch threads {torch.get_num_threads()}, medians of {args.repeats}"
    )
    clf = NSFWClassifier(tmp / "vit")
    wm = Watermarker()
    signer = C2PASigner.from_files(pki["chain"], pki["key"])
    opts = CodecOptions()
    marked = wm.embed(image)
    files = {fmt: encode_image(marked, fmt, opts) for fmt in ("png", "jpeg", "webp")}
    parts = {
        "classifier (ViT-base, 224^2)": lambda: clf.scores([image]),
        "watermark embed (dwtDct)": lambda: wm.embed(image),
        "encode PNG (level 4)": lambda: encode_image(marked, "png", opts),
        "encode JPEG (q95)": lambda: encode_image(marked, "jpeg", opts),
        "encode WebP (q95)": lambda: encode_image(marked, "webp", opts),
        "C2PA sign PNG": lambda: signer.sign(files["png"], "png", "flux-2-klein-4b", "x.png"),
        "C2PA sign JPEG": lambda: signer.sign(files["jpeg"], "jpeg", "flux-2-klein-4b", "x.jpg"),
        "C2PA sign WebP": lambda: signer.sign(files["webp"], "webp", "flux-2-klein-4b", "x.webp"),
    }
    for name, fn in parts.items():
        print(f"  {name:<30} {median_ms(fn, args.repeats):8.1f} ms")
    print("  file sizes: " + ", ".join(f"{k} {len(v) / 1e3:.0f} kB" for k, v in files.items()))

    post = PostProcessor(
        SafetyOptions(classifier=tmp / "vit"),
        ProvenanceOptions(c2pa_cert_chain=pki["chain"], c2pa_key=pki["key"]),
    )
    print("Codec post-processing (classify batch; watermark, JPEG, C2PA per image):")
    for b in args.batches:
        imgs = [natural_image(args.size, seed=i) for i in range(b)]
        params = [
            FinishParams(f"j{i}", f"images/j{i}.jpg", "jpeg", "p", "flux-2-klein-4b", i) for i in range(b)
        ]

        def chain(imgs=imgs, params=params):
            flags = post.flagged(imgs, params)
            for im, p, f in zip(imgs, params, flags, strict=True):
                post.file(encode_image(post.pixels(im, p, f), "jpeg", opts), p, [])

        ms = median_ms(chain, max(2, args.repeats // 2))
        print(
            f"  batch {b}: {ms:8.1f} ms per batch, {ms / b:7.1f} ms per image, {b / ms * 1e3:5.2f} images/s"
        )


if __name__ == "__main__":
    main()
