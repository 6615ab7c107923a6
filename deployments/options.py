"""Typed options: per-deployment Serve options (each deployment's options embed `DeploymentOptions`),
and the ingress's options, which the job service (deployments/jobs) and the HTTP edge
(deployments/api) read."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Options(BaseModel):
    """A section of the settings: a key it does not know (a misspelling) is an error naming it,
    not a setting silently left at its default."""

    model_config = ConfigDict(extra="forbid")


class Autoscaling(Options):
    min_replicas: int = Field(1, ge=0, description="replicas kept when idle (0: scale to zero)")
    max_replicas: int = Field(1, ge=1, description="upper bound")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at start-up (default: min)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="per-replica in-flight requests to aim for")
    upscale_delay_s: float = Field(30.0, ge=0, description="how long demand must stay high before scaling up")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="how long demand must stay low before scaling down"
    )
    metrics_interval_s: float = Field(10.0, gt=0, description="how often replicas report their load")
    look_back_period_s: float = Field(30.0, gt=0, description="window averaged for decisions")


class ActorOptions(Options):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPU fraction per replica (Ray does bookkeeping only)")
    memory: int | None = Field(None, ge=0, description="bytes of RAM reserved per replica")


class DeploymentOptions(Options):
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count; None: autoscale")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    max_ongoing_requests: int = Field(8, ge=1, description="in-flight requests per replica")
    max_queued_requests: int = Field(512, ge=-1, description="queued per caller before 503; -1: unbounded")
    ray_actor: ActorOptions = Field(default_factory=ActorOptions)
    health_check_period_s: float = Field(10.0, gt=0, description="seconds between Serve's health checks")
    health_check_timeout_s: float = Field(30.0, gt=0, description="a health check slower than this fails")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="how long a stopping replica may finish its requests"
    )

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `serve.deployment(...)` / `.options(...)`."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor.model_dump(exclude_none=True),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        else:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        return opts


class IngressOptions(Options):
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            max_ongoing_requests=256, ray_actor=ActorOptions(num_cpus=0.5)
        )
    )
    public_url: str | None = Field(None, description="base URL clients reach us at; default: the request's")
    max_body_mb: int = Field(64, ge=1, description="largest request body accepted (413 beyond)")
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed to call from browsers (CORS); none by default"
    )
    max_input_image_mb: int = Field(20, ge=1, description="largest input image file")
    max_input_image_pixels: int = Field(
        40_000_000, ge=4096, description="largest input image before resizing"
    )
    max_images_per_request: int = Field(4, ge=1, le=16, description="OpenAI `n` upper bound")
    metrics_key_ids: list[str] = Field(
        default_factory=list,
        description="ids of the API keys that may read /metrics (a key's id: the first 16 hex digits "
        "of its SHA-256); with keys configured, no other key may (it totals every tenant's jobs)",
    )
    max_jobs_in_flight: int = Field(24, ge=1, description="per API key, like BFL; 429 beyond")
    max_running_jobs: int = Field(
        256, ge=1, description="jobs one ingress replica runs at once (async and sync); 503 beyond"
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 429 and 503")
    job_lease_s: float = Field(600.0, gt=0, description="a Pending job older than this is run again")
    job_deadline_s: float = Field(
        3600.0, gt=0, description="a job not finished this long after submission ends in Error"
    )
    request_storage_retry_s: float = Field(
        5.0, ge=0, description="storage retries while a client waits (polls); 503 + Retry-After after"
    )
    max_attempts: int = Field(3, ge=1, description="runs of a job before it ends in Error")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each attempt")
    reaper_interval_s: float = Field(15.0, gt=0, description="how often abandoned jobs are looked for")
    sync_timeout_s: float = Field(300.0, gt=0, description="OpenAI-style requests give up after this")
    events_poll_s: float = Field(
        0.25, gt=0, le=5, description="how often an event stream looks at its job in storage"
    )
    events_keepalive_s: float = Field(15.0, gt=0, description="an event stream's comment line when idle")
    webhook_attempts: int = Field(5, ge=1, description="deliveries tried per webhook (backoff 1, 2, 4 ... s)")
    webhook_allow_private: bool = Field(False, description="allow webhooks to private/loopback addresses")
    fetch_input_urls: bool = Field(False, description="accept http(s) URLs as input images (fetched here)")
    fetch_allow_private: bool = Field(
        False, description="allow input-image URLs on private/loopback addresses"
    )
    fetch_timeout_s: float = Field(10.0, gt=0, le=120, description="time cap for fetching one input image")

    @field_validator("metrics_key_ids")
    @classmethod
    def _key_ids(cls, ids: list[str]) -> list[str]:
        for kid in ids:
            if len(kid) != 16 or any(c not in "0123456789abcdef" for c in kid):
                raise ValueError(
                    f"{kid!r} is not a key id: 16 lowercase hex digits, the start of the key's SHA-256 "
                    "(printf %s KEY | sha256sum | cut -c1-16)"
                )
        return ids
