"""Codec stage: VAE encode of reference images; VAE decode -> safety classifier -> invisible watermark
-> PNG/JPEG/WebP -> C2PA signature -> upload to storage. Decoding is batched; each image is decoded
on its own (batch invariance). Also classifies input images for the ingress (input moderation), and
renders the previews the FlowTransformer sends (klein.preview: a linear map fitted to this VAE at
start-up), checked by the safety classifier like the image, stored at the key the job gave."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time

import torch
from PIL import Image
from pydantic import Field
from ray import serve
from torch import Tensor

from deployments import metrics, telemetry
from deployments.options import DeploymentOptions
from deployments.stages.base import LRU, Stage, StageOptions, gated, isolating
from deployments.stages.compile_cache import CompileCache
from deployments.stages.payloads import FinishParams, FinishResult, PreviewParams
from deployments.stages.postprocess import PostProcessor, ProvenanceOptions, SafetyOptions, open_image
from deployments.storage import StorageOptions, open_storage
from klein import ModelSource
from klein import fast as fastpath
from klein.image import CONTENT_TYPES, to_pil
from klein.pipeline import References, encode_references
from klein.preview import LatentPreview

log = logging.getLogger(__name__)
SOFTWARE = "klein-serve (FLUX.2 [klein]); AI generated"


def _digest(images: list[bytes]) -> str:
    """One identity for a list of encoded files."""
    return hashlib.sha256(b"".join(len(b).to_bytes(8, "big") + b for b in images)).hexdigest()


class CodecOptions(StageOptions):
    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=16))
    max_batch_size: int = Field(4, ge=1, description="images decoded per batch")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of results (4:4:4)")
    webp_quality: int = Field(95, ge=1, le=100, description="WebP quality of results")
    png_compress_level: int = Field(4, ge=0, le=9, description="zlib level: 1 fast ... 9 small")
    reference_cache_mb: int = Field(
        64, ge=0, description="encoded references by content, in MB: OpenAI n>1 encodes them once (0: off)"
    )
    preview_fit_images: int = Field(
        16, ge=2, description="images the preview map is fitted on at start-up (a quarter held out)"
    )
    preview_fit_size: int = Field(256, ge=64, multiple_of=64, description="their side, in pixels")
    preview_quality: int = Field(80, ge=1, le=100, description="JPEG quality of previews")


def encode_image(image: Image.Image, fmt: str, o: CodecOptions) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0131] = SOFTWARE  # Software
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=o.jpeg_quality, subsampling=0, exif=exif)
    elif fmt == "webp":
        image.save(buf, "WEBP", quality=o.webp_quality, exif=exif)
    elif fmt == "png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", SOFTWARE)
        image.save(buf, "PNG", compress_level=o.png_compress_level, pnginfo=info)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()


class Codec(Stage):
    def __init__(
        self,
        source: ModelSource,
        options: CodecOptions,
        storage: StorageOptions,
        safety: SafetyOptions | None = None,
        provenance: ProvenanceOptions | None = None,
        tracing=None,
        compile_cache: CompileCache | None = None,
    ):
        super().__init__(options.placement)
        telemetry.setup(tracing or telemetry.TelemetryOptions(), "Codec")
        self.spec = source.spec
        self.vae = self.on_worker(source.load_vae, self.device, self.dtype)
        self.storage = open_storage(storage)
        self.options = options
        start = time.monotonic()
        self.previews_map = self.on_worker(
            LatentPreview.fit_to, self.vae, options.preview_fit_images, options.preview_fit_size
        )
        log.info(
            "preview map fitted to the VAE in %.2f s: R^2 %.3f on held-out images",
            time.monotonic() - start,
            self.previews_map.fit.r2,
        )
        self.speed_up(
            self.vae, fastpath.setup_vae, fastpath.warm_up_vae, "decode_one", cache=compile_cache, spec=self.spec,
            multiple=self.spec.multiple,
        )  # fmt: skip
        self.post = self.on_worker(
            PostProcessor, safety or SafetyOptions(), provenance or ProvenanceOptions(), self.device
        )
        self._finish_batch.set_max_batch_size(options.max_batch_size)
        self._finish_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.references = LRU(
            options.reference_cache_mb * 2**20, lambda r: r.tokens.numel() * r.tokens.element_size()
        )

    async def encode(
        self, images: list[bytes], trace: dict | None = None, mask: bytes | None = None
    ) -> References:
        """Reference images (encoded files, already validated by the ingress) -> packed tokens; with
        an inpainting's `mask` (white repaints) the first is its source. The same files encode to the
        same tokens: the n images of one OpenAI edit share one encoding."""
        start = time.time_ns()
        key = _digest(images + ([b"mask", mask] if mask is not None else []))

        def work():
            if (refs := self.references.get(key)) is not None:
                return refs
            pil = tuple(Image.open(io.BytesIO(b)) for b in images)
            mask_image = Image.open(io.BytesIO(mask)) if mask is not None else None
            refs = encode_references(self.vae, self.spec, pil, mask_image)
            refs = References(refs.tokens.cpu(), refs.shapes, refs.pixels, refs.mask)
            self.references.put(key, refs)
            return refs

        out = await self.run(work, job=key)
        telemetry.record("encode", [trace], start, images=len(images))
        return out

    async def stats(self) -> dict:
        return await super().stats() | {"references": self.references.stats()}

    async def moderate(self, images: list[bytes], tolerance: int) -> list[bool]:
        """Input moderation for the ingress: which input images the classifier flags."""
        key = _digest(images)  # names the call for the health bookkeeping
        return await self.run(lambda: self.post.moderate([open_image(b) for b in images], tolerance), job=key)

    async def previews(self, latents: list[Tensor], params: list[PreviewParams]) -> list[bool]:
        """Render predicted clean latents (L, C) small, check them (one classifier forward), store
        each as JPEG at its `key`: one call per transformer step for all its requests that asked.
        False where the classifier flagged one (nothing is stored)."""
        start = time.time_ns()

        def render() -> list[Image.Image]:  # off the worker thread: a small matmul each
            return [
                Image.fromarray(self.previews_map.render(z, *p.grid).numpy())
                for z, p in zip(latents, params, strict=True)
            ]

        images = await asyncio.to_thread(render)
        flagged = [False] * len(images)
        if self.post.classifier is not None:  # (not judged for health: previews are not jobs)
            flagged = await self.attempt(self.post.flagged, images, params)

        def jpeg(image: Image.Image) -> bytes:
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=self.options.preview_quality)
            return buf.getvalue()

        files = await asyncio.to_thread(
            lambda: [None if f else jpeg(im) for im, f in zip(images, flagged, strict=True)]
        )
        stored = [
            self.storage.put(p.key, data, CONTENT_TYPES["jpeg"])
            for p, data in zip(params, files, strict=True)
            if data
        ]
        await asyncio.gather(*stored)
        metrics.stage_batch("preview", len(latents), (time.time_ns() - start) / 1e9)
        return [not f for f in flagged]

    async def finish(self, latents: Tensor, params: FinishParams) -> FinishResult:
        return await self.through(self._finish_batch, latents, params)

    def _decode(self, latents: list[Tensor]) -> list[Image.Image | BaseException]:
        decoded: list[Image.Image | BaseException] = []
        for z in latents:
            try:
                with torch.inference_mode():
                    decoded.append(to_pil(self.vae.decode(z[None].to(self.device)))[0])
            except Exception as e:  # one bad request fails alone
                decoded.append(e)
        return decoded

    def _files(
        self,
        decoded: list[Image.Image | BaseException],
        flags: dict[int, bool | BaseException],
        params: list[FinishParams],
        ingredients: list[list[bytes] | BaseException],
    ) -> list[bytes | BaseException]:
        """Watermark, encode and sign each image the classifier passed."""
        out: list[bytes | BaseException] = []
        for i, (image, p, refs) in enumerate(zip(decoded, params, ingredients, strict=True)):
            failed = [x for x in (image, flags.get(i), refs) if isinstance(x, BaseException)]
            if failed:
                out.append(failed[0])
                continue
            try:
                data = encode_image(self.post.pixels(image, p, flags[i]), p.output_format, self.options)
                out.append(self.post.file(data, p, refs))
            except Exception as e:  # moderated, or a failing step: this request only
                out.append(e)
        return out

    async def _finished_files(
        self,
        latents: list[Tensor],
        params: list[FinishParams],
        ingredients: list[list[bytes] | BaseException],
    ) -> list[bytes | BaseException]:
        t0 = time.time_ns()
        decoded = await self.attempt(self._decode, latents)
        self.judge([p.job_id for p in params], decoded)  # each request's decode, for health
        t1 = time.time_ns()
        ok = [i for i, im in enumerate(decoded) if not isinstance(im, BaseException)]

        def classify(batch: list[int]) -> list[bool]:  # one forward; one by one if that fails
            return self.post.flagged([decoded[i] for i in batch], [params[i] for i in batch])

        flags = await isolating(lambda batch: self.attempt(classify, batch), ok, "classify")
        out = await self.attempt(self._files, decoded, dict(zip(ok, flags, strict=True)), params, ingredients)
        telemetry.record("decode", [p.trace for p in params], t0, t1, batch_size=len(latents))
        for p in params:
            telemetry.record("postprocess", [p.trace], t1, format=p.output_format)
        return out

    async def _ingredients(self, params: list[FinishParams]) -> list[list[bytes] | BaseException]:
        """An edit's references, its C2PA ingredients: each stored file read once per batch (the n
        images of one OpenAI edit share theirs). A failed read fails only the requests that need it."""
        keys = list(dict.fromkeys(k for p in params for k in p.input_keys))
        reads = await asyncio.gather(*map(self.storage.get, keys), return_exceptions=True)
        files = dict(zip(keys, reads, strict=True))
        out: list[list[bytes] | BaseException] = []
        for p in params:
            mine = [files[k] for k in p.input_keys]
            failed = [f for f in mine if isinstance(f, BaseException)]
            out.append(failed[0] if failed else [f for f in mine if f is not None])
        return out

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.0)
    @gated
    async def _finish_batch(
        self, latents: list[Tensor], params: list[FinishParams]
    ) -> list[FinishResult | BaseException]:
        self.batch_sizes.append(len(latents))
        start = time.time_ns()
        ingredients = await self._ingredients(params) if self.post.signer is not None else [[]] * len(params)
        files = await self._finished_files(latents, params, ingredients)
        metrics.stage_batch("decode", len(latents), (time.time_ns() - start) / 1e9)

        async def upload(z: Tensor, data, p: FinishParams) -> FinishResult | BaseException:
            if isinstance(data, BaseException):
                return data
            start = time.time_ns()
            try:
                await self.storage.put(p.key, data, CONTENT_TYPES[p.output_format])
            except Exception as e:
                return e
            telemetry.record("upload", [p.trace], start, bytes=len(data))
            h, w = z.shape[-2] * self.spec.multiple, z.shape[-1] * self.spec.multiple
            return FinishResult(
                p.key, w, h, CONTENT_TYPES[p.output_format], len(data), data if p.return_bytes else None
            )

        uploads = (upload(z, d, p) for z, d, p in zip(latents, files, params, strict=True))
        return list(await asyncio.gather(*uploads))
