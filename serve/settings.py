"""Service settings: one pydantic-settings object, read once from the environment (KLEIN_ prefix,
`__` for nesting, e.g. KLEIN_STORAGE__BACKEND=s3) and from Serve config `args`.

Precedence, field by field: config `args` > environment > defaults. Nested objects merge, so a
config can name the bucket while the credentials come from the environment (a Secret).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.api.auth import KeyRing, parse_keys
from deployments.jobs.metering import DEFAULT_PRICES, Price
from deployments.options import IngressOptions
from deployments.stages.adapters import LoraSettings
from deployments.stages.codec import CodecOptions
from deployments.stages.postprocess import ProvenanceOptions, SafetyOptions
from deployments.stages.text_embedder import TextEmbedderOptions
from deployments.stages.transformer import FlowTransformerOptions
from deployments.storage import StorageOptions
from deployments.telemetry import TelemetryOptions
from klein import ModelSource
from klein.fast import FREEZE_WITH_LORA


def api_model_id(name: str) -> str:
    """BFL-style model ids: klein-4b -> flux-2-klein-4b, tiny -> flux-2-klein-tiny."""
    return f"flux-2-{name}" if name.startswith("klein") else f"flux-2-klein-{name}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KLEIN_", env_nested_delimiter="__", extra="forbid")

    preset: str | None = Field(
        None, description="model preset; 'tiny' (random weights) when no weights are given"
    )
    model: str | None = Field(
        None,
        description="a local folder or file, or a hub id org/name[@revision] (downloaded; HF_HOME, HF_TOKEN)",
    )
    base_model: str | None = Field(
        None, description="hub id of the bf16 repository an FP8 hub model's text encoder and VAE come from"
    )
    weights: Path | None = Field(None, description="diffusers-layout folder or folder of BFL files")
    transformer: Path | None = Field(None, description="BFL / FP8 transformer single file")
    vae: Path | None = Field(None, description="BFL ae.safetensors")
    text_encoder: Path | None = Field(None, description="Qwen3 folder")
    model_id: str | None = Field(None, description="API model id (default flux-2-<preset>)")
    random_weights: bool = Field(
        False, description="the preset's real architecture with random weights (benchmarks; images are noise)"
    )

    api_keys: SecretStr | None = Field(None, description="comma-separated API keys (KLEIN_API_KEYS)")
    api_keys_file: Path | None = Field(
        None, description="file of API keys, e.g. a mounted Secret; re-read on change"
    )
    require_api_keys: bool | None = Field(
        None, description="refuse to start without keys; default: required unless bound to loopback"
    )

    storage: StorageOptions = Field(default_factory=StorageOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    text_embedder: TextEmbedderOptions = Field(default_factory=TextEmbedderOptions)
    transformer_stage: FlowTransformerOptions = Field(default_factory=FlowTransformerOptions)
    codec: CodecOptions = Field(default_factory=CodecOptions)
    prices: dict[str, Price] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="per model id: {first_mp, per_mp, lora_per_mp} in credits (JSON in KLEIN_PRICES)",
    )
    telemetry: TelemetryOptions = Field(default_factory=TelemetryOptions)
    safety: SafetyOptions = Field(default_factory=SafetyOptions)
    provenance: ProvenanceOptions = Field(default_factory=ProvenanceOptions)
    lora: LoraSettings = Field(default_factory=LoraSettings)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str | None) -> str | None:
        from klein.config import PRESETS

        if name is not None and name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        return name

    @model_validator(mode="after")
    def _one_source(self):
        if self.preset is None and not any((self.model, self.weights, self.transformer)):
            self.preset = "tiny"
        if self.random_weights and any(
            (self.model, self.weights, self.transformer, self.vae, self.text_encoder)
        ):
            raise ValueError("random_weights: give a preset, not weights")
        if self.model and any((self.weights, self.transformer, self.vae, self.text_encoder)):
            raise ValueError("model: give either a model or weights files, not both")
        if self.lora.enabled and self.transformer_stage.fast.freeze:
            raise ValueError(f"transformer_stage.fast.freeze with lora.enabled: {FREEZE_WITH_LORA}")
        return self

    def key_ring(self) -> KeyRing:
        keys = parse_keys(self.api_keys.get_secret_value()) if self.api_keys else []
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file} does not exist")
        return KeyRing.from_keys(keys, self.api_keys_file)

    def model_source(self) -> ModelSource:
        """Where the weights are (a hub model is downloaded now, where it is not in the cache)."""
        if self.model:
            return ModelSource.from_name(self.model, self.base_model, self.preset)
        if any((self.weights, self.transformer, self.vae, self.text_encoder)):
            return ModelSource.from_paths(
                self.weights, self.transformer, self.vae, self.text_encoder, self.preset
            )
        if self.random_weights:
            return ModelSource.random_weights(self.preset)
        return ModelSource.preset(self.preset)

    def price(self, model_id: str) -> Price:
        if model_id not in self.prices:
            raise ValueError(f"no price for model {model_id!r}; set prices.{model_id} (KLEIN_PRICES)")
        return self.prices[model_id]


def reference() -> list[tuple[str, str, str]]:
    """Every setting as (KLEIN_* variable, default, description), from the models themselves, so
    that `klein settings` cannot drift from the code. Nested sections are walked (`__` nests);
    a secret's default is never shown."""
    import types
    import typing

    import pydantic_core
    from pydantic import BaseModel

    def section(annotation):
        """The settings model a field nests (`X` or `X | None`); None for a value (`dict[str, X]`
        included: its keys are the user's, not names of settings)."""
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        for arg in typing.get_args(annotation) if union else (annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
        return None

    def shown(field) -> str:
        if field.annotation is SecretStr or SecretStr in typing.get_args(field.annotation):
            return "(secret)"
        value = pydantic_core.to_jsonable_python(field.get_default(call_default_factory=True))
        return "" if value is None else json.dumps(value) if isinstance(value, dict | list) else str(value)

    rows = []

    def walk(model, prefix: str) -> None:
        for name, field in model.model_fields.items():
            variable = prefix + name.upper()
            sub = section(field.annotation)
            if sub is not None:
                walk(sub, variable + "__")
            else:
                rows.append((variable, shown(field), field.description or ""))

    walk(Settings, "KLEIN_")
    return rows


# KLEIN_* variables that are not settings: the load generator's (serve/locustfile.py, `klein loadtest`)
# and the test suite's.
LOAD_VARIABLES = frozenset(
    {
        "KLEIN_API_KEY",
        "KLEIN_DURATION_S",
        "KLEIN_EDIT_SHARE",
        "KLEIN_JOB_DEADLINE_S",
        "KLEIN_LOAD_MODEL",
        "KLEIN_PEAK_USERS",
        "KLEIN_REFERENCE_SIZES",
        "KLEIN_REPEAT_SHARE",
        "KLEIN_SHAPE",
        "KLEIN_SIZES",
        "KLEIN_STATS_FILE",
        "KLEIN_SYNC_SHARE",
        "KLEIN_TEST_ARTIFACTS",
    }
)


def unknown_variables(environ=None) -> list[str]:
    """KLEIN_* environment variables that set nothing (misspelt: KLEIN_INGRES__MAX_JOBS_IN_FLIGHT),
    which the settings would otherwise ignore without a word."""
    unknown = []
    for name in sorted(os.environ if environ is None else environ):
        if not name.startswith("KLEIN_") or name in LOAD_VARIABLES:
            continue
        model: type[BaseModel] = Settings
        for part in name.removeprefix("KLEIN_").lower().split("__"):
            field = model.model_fields.get(part)
            if field is None:
                unknown.append(name)
                break
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                break  # a value (or a table such as prices): what follows is its own
            model = field.annotation
    return unknown
