"""The Ingress deployment: the job service (deployments/jobs) over handles to the model stages,
served through the HTTP edge (deployments/api).

Job records live in storage, so the ingress is stateless: any replica answers any poll, and each
replica's reaper re-runs jobs whose lease expired (their ingress died). See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from deployments import telemetry
from deployments.api.app import build_api
from deployments.api.auth import KeyRing
from deployments.jobs.metering import Price
from deployments.jobs.pipeline import StageHandles
from deployments.jobs.service import JobService
from deployments.options import IngressOptions
from deployments.stages.adapters import Adapters, LoraSettings
from deployments.stages.postprocess import SafetyOptions
from deployments.storage import StorageOptions, open_storage
from klein.config import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class IngressConfig:
    """Everything the Ingress is built from besides the stage handles (bound by keyword)."""

    spec: ModelSpec
    model_id: str
    price: Price
    options: IngressOptions = field(default_factory=IngressOptions)
    storage: StorageOptions = field(default_factory=StorageOptions)
    keys: KeyRing = field(default_factory=KeyRing)
    tracing: telemetry.TelemetryOptions = field(default_factory=telemetry.TelemetryOptions)
    safety: SafetyOptions = field(default_factory=SafetyOptions)
    max_request_tokens: int | None = None  # the FlowTransformer's max_batch_tokens: larger is refused
    lora: LoraSettings = field(default_factory=LoraSettings)  # where requests' adapters come from


class Ingress:
    def __init__(self, embedder, transformer, codec, *, config: IngressConfig):
        telemetry.setup(config.tracing, "Ingress")
        self.config = config
        self.service = JobService(
            spec=config.spec,
            model_id=config.model_id,
            options=config.options,
            storage=open_storage(config.storage),
            presign_expiry_s=config.storage.presign_expiry_s,
            price=config.price,
            stages=StageHandles(embedder, transformer, codec),
            prompt_filter=config.safety.prompt_filter(),
            moderate_inputs=config.safety.classifier is not None and config.safety.check_inputs,
            max_request_tokens=config.max_request_tokens,
            adapters=Adapters(config.lora, config.storage, config.spec.transformer)
            if config.lora.enabled
            else None,
        )

    def __serve_build_asgi_app__(self):
        return build_api(self.service, self.config.keys)

    async def check_health(self) -> None:
        """Healthy while the event loop answers. Storage is checked and complained about, not
        failed on: a restart cannot fix an unreachable bucket, and would drop the jobs in flight."""
        self.service.reaper.ensure_running()
        try:
            await asyncio.to_thread(self.service.storage.check)
        except Exception as e:
            log.warning("storage is unreachable: %s", e)
