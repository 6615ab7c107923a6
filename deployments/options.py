"""Per-deployment Serve options, typed: each stage's options model embeds one of these."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Autoscaling(BaseModel):
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


class ActorOptions(BaseModel):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPU fraction per replica (Ray does bookkeeping only)")
    memory: int | None = Field(None, ge=0, description="bytes of RAM reserved per replica")


class DeploymentOptions(BaseModel):
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count; None: autoscale")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    max_ongoing_requests: int = Field(8, ge=1, description="in-flight requests per replica")
    max_queued_requests: int = Field(512, ge=-1, description="queued per caller before 503; -1: unbounded")
    ray_actor: ActorOptions = Field(default_factory=ActorOptions)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

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
