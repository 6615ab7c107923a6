"""FLUX.2 [klein] in plain PyTorch: configs, transformer, text embedder, VAE, sampler, checkpoints."""

from klein.config import PRESETS, ModelSpec, get_preset
from klein.fast import FastPath
from klein.loader import DTYPES, ModelSource
from klein.pipeline import Pipeline
from klein.request import GenerationRequest, InvalidRequest

__all__ = [
    "DTYPES",
    "PRESETS",
    "FastPath",
    "GenerationRequest",
    "InvalidRequest",
    "ModelSource",
    "ModelSpec",
    "Pipeline",
    "get_preset",
]
