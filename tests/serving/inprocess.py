"""The serving classes wired together in one process, without Ray: fake handles that resolve
chained responses like Serve does. For fast tests of the ingress logic (jobs, retries, reaper)."""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback

import ray.serve.batching as batching
from ray.exceptions import RayTaskError

from deployments.api.auth import KeyRing
from deployments.ingress import Ingress, IngressConfig
from deployments.jobs.idempotency import IdempotencyClaim
from deployments.jobs.metering import Price
from deployments.jobs.progress import ProgressBoard
from deployments.jobs.service import InputImage, Submission, Webhook
from deployments.jobs.store import CancelFlags
from deployments.options import IngressOptions
from deployments.stages.adapters import Adapters, LoraSettings
from deployments.stages.codec import Codec, CodecOptions
from deployments.stages.postprocess import SafetyOptions
from deployments.stages.text_embedder import TextEmbedder, TextEmbedderOptions
from deployments.stages.transformer import FlowTransformer, FlowTransformerOptions
from deployments.storage import StorageOptions
from klein import ModelSource

# @serve.batch asks for the replica context to log a warning; outside Serve there is none.
batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None


class FakeResponse:
    def __init__(self, coro):
        self.task = asyncio.ensure_future(coro)

    def __await__(self):
        return self.task.__await__()


class FakeMethod:
    def __init__(self, fn, failures: list):
        self.fn, self.failures = fn, failures

    def remote(self, *args):
        async def call():
            resolved = [await a if isinstance(a, FakeResponse) else a for a in args]
            try:
                if self.failures:
                    raise self.failures.pop(0)
                out = self.fn(*resolved)
                return await out if inspect.isawaitable(out) else out
            except Exception as e:  # as Serve delivers a replica's exception: a RayTaskError(<cause>)
                raise RayTaskError(self.fn.__name__, traceback.format_exc(), e).as_instanceof_cause() from e

        return FakeResponse(call())


class FakeHandle:
    """`handle.method.remote(...)`; `fail_next[method]` holds exceptions to raise first."""

    def __init__(self, obj):
        self.obj = obj
        self.fail_next: dict[str, list] = {}

    def __getattr__(self, name):
        return FakeMethod(getattr(self.obj, name), self.fail_next.setdefault(name, []))


def slow_writes(storage, prefixes: str | tuple[str, ...], seconds: float, times: int | None = None) -> None:
    """Writes of keys under `prefixes` take `seconds` longer (a slow or retrying S3); only the
    first `times` of them, if given."""
    real_put, slowed = storage._put, [0]

    def put(key, *args):
        if key.startswith(prefixes) and (times is None or slowed[0] < times):
            slowed[0] += 1
            time.sleep(seconds)
        return real_put(key, *args)

    storage._put = put


def _fresh_batch_queues() -> None:
    """@serve.batch keeps one queue per decorated function, bound to the first event loop that
    used it (one replica per process in Serve); each test runs its own loop."""
    for fn in (TextEmbedder._embed_batch, FlowTransformer._batched, Codec._finish_batch):
        fn.set_max_batch_size.__self__._queue = None


def build(
    root, keys=None, safety=None, provenance=None, max_batch_tokens=32768, storage=None, lora=None, price=None,
    **ingress,
) -> Ingress:  # fmt: skip
    """`root`: a local storage directory, unless `storage` (StorageOptions) names another backend;
    `lora`: LoraSettings (adapters served), `price`: the model's Price."""
    _fresh_batch_queues()
    source = ModelSource.preset("tiny")
    storage = storage or StorageOptions(root=root)
    embedder = FakeHandle(TextEmbedder(source, TextEmbedderOptions()))
    codec_options = CodecOptions(preview_fit_images=8, preview_fit_size=128)  # a quick fit
    codec = FakeHandle(Codec(source, codec_options, storage, safety=safety, provenance=provenance))
    transformer = FakeHandle(
        FlowTransformer(
            source,
            FlowTransformerOptions(cancel_check_interval_s=0, max_batch_tokens=max_batch_tokens),
            cancel=CancelFlags(storage),
            adapters=Adapters(lora, storage, source.spec.transformer) if lora else None,
            progress=ProgressBoard(storage),
            previewer=codec,
        )
    )
    config = IngressConfig(
        spec=source.spec,
        model_id="flux-2-klein-tiny",
        price=price or Price(first_mp=1.4, per_mp=0.1),
        options=IngressOptions(retry_backoff_s=0, reaper_interval_s=3600, **ingress),
        storage=storage,
        keys=keys or KeyRing(),
        safety=safety or SafetyOptions(),
        max_request_tokens=max_batch_tokens,
        lora=lora or LoraSettings(),
    )
    return Ingress(embedder, transformer, codec, config=config)


def submit_job(ingress: Ingress, start: bool = False, **fields):
    """`JobService.submit` with a Submission made of `fields`: `images` may be (field, bytes, PIL
    image) tuples, `webhook_url` / `webhook_secret` make its Webhook, `idempotency_key` /
    `body_hash` its IdempotencyClaim."""
    images = tuple(InputImage(*im) if isinstance(im, tuple) else im for im in fields.pop("images", ()))
    url, secret = fields.pop("webhook_url", None), fields.pop("webhook_secret", None)
    token, body_hash = fields.pop("idempotency_key", None), fields.pop("body_hash", "")
    submission = Submission(
        images=images,
        webhook=Webhook(url, secret) if url else None,
        idempotency=IdempotencyClaim(token, body_hash) if token is not None else None,
        **fields,
    )
    return ingress.service.submit(submission, start=start)
