"""Composition: Settings -> the Serve application (Ingress over TextEmbedder, FlowTransformer, Codec).

`build_app(settings)` is the typed builder; `build(args)` is the entry point Serve config files name
(`import_path: serve.app:build`), with `args` overriding the environment.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve import Application

from deployments.ingress import Ingress, IngressConfig
from deployments.jobs.progress import ProgressBoard
from deployments.jobs.store import CancelFlags
from deployments.stages.adapters import Adapters
from deployments.stages.codec import Codec
from deployments.stages.compile_cache import CompileCache
from deployments.stages.text_embedder import TextEmbedder
from deployments.stages.transformer import FlowTransformer
from serve.settings import Settings, api_model_id, unknown_variables

log = logging.getLogger(__name__)
DEPLOYMENTS = ("Ingress", "TextEmbedder", "FlowTransformer", "Codec")


def build_app(settings: Settings) -> Application:
    source = settings.model_source()
    model_id = settings.model_id or api_model_id(source.spec.name)
    price = settings.price(model_id)
    storage = settings.storage
    keys = settings.key_ring()
    if settings.require_api_keys and not keys.enabled:
        raise ValueError(
            "require_api_keys is set but no API keys are configured (KLEIN_API_KEYS / KLEIN_API_KEYS_FILE)"
        )
    log.info("building %s (%s) with %s storage", model_id, source.spec.name, storage.backend)
    for name in unknown_variables():  # klein serve refuses these; KubeRay's path gets a warning
        log.warning("%s is not a setting (misspelt?): it is ignored", name)
    if settings.safety.classifier is None:  # (required and missing was refused when parsing)
        log.warning("NO SAFETY CLASSIFIER: outputs and inputs are not moderated (set safety.classifier)")
    if settings.provenance.c2pa_cert_chain is None:  # (one of the two without the other: refused)
        log.warning(
            "C2PA signing is off: outputs carry no content credentials "
            "(set KLEIN_PROVENANCE__C2PA_CERT_CHAIN and KLEIN_PROVENANCE__C2PA_KEY)"
        )

    def deployment(cls, name, options):
        return serve.deployment(cls, name=name, **options.deployment.serve_options())

    tracing = settings.telemetry
    embedder = deployment(TextEmbedder, "TextEmbedder", settings.text_embedder)
    transformer = deployment(FlowTransformer, "FlowTransformer", settings.transformer_stage)
    codec = deployment(Codec, "Codec", settings.codec)
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="Ingress", **settings.ingress.deployment.serve_options()
    )
    config = IngressConfig(
        spec=source.spec,
        model_id=model_id,
        price=price,
        options=settings.ingress,
        storage=storage,
        keys=keys,
        tracing=tracing,
        safety=settings.safety,
        max_request_tokens=settings.transformer_stage.max_batch_tokens,
        lora=settings.lora,
    )
    adapters = Adapters(settings.lora, storage, source.spec.transformer) if settings.lora.enabled else None
    compiled = CompileCache(storage)  # code compiled by one replica, loaded by the next
    codec_app = codec.bind(
        source,
        settings.codec,
        storage,
        safety=settings.safety,
        provenance=settings.provenance,
        tracing=tracing,
        compile_cache=compiled,
    )
    return ingress.bind(
        embedder.bind(source, settings.text_embedder, tracing=tracing, compile_cache=compiled),
        transformer.bind(
            source,
            settings.transformer_stage,
            cancel=CancelFlags(storage),
            adapters=adapters,
            progress=ProgressBoard(storage),
            previewer=codec_app,  # the transformer sends previews to the Codec to render
            tracing=tracing,
            compile_cache=compiled,
        ),
        codec_app,
        config=config,
    )


def build(args: dict) -> Application:
    return build_app(Settings(**args))
