"""Shared fixtures: tiny random FLUX.2 [klein] checkpoints written by diffusers in the official
layouts (diffusers folder, BFL single files, FP8 single file). CPU-only and offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from klein.config import TINY, TINY_BASE  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def diffusers_tiny():
    """(diffusers Flux2KleinPipeline, its saved folder) for the distilled tiny preset."""
    from tests.reference import diffusers_pipeline

    return diffusers_pipeline(TINY, seed=0)


@pytest.fixture(scope="session")
def diffusers_tiny_base():
    from tests.reference import diffusers_pipeline

    return diffusers_pipeline(TINY_BASE, seed=10)


@pytest.fixture(scope="session")
def tiny_dir(diffusers_tiny, tmp_path_factory) -> Path:
    """The distilled tiny weights as an official diffusers-layout folder."""
    folder = tmp_path_factory.mktemp("weights") / "tiny-distilled"
    diffusers_tiny.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_base_dir(diffusers_tiny_base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights") / "tiny-base"
    diffusers_tiny_base.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_bfl_dir(tiny_dir, tmp_path_factory) -> Path:
    """The same weights as BFL single files (+ FP8 transformer) beside the Qwen3 folder, as in
    BFL's Hugging Face repos: flux-2-klein-*.safetensors, ae.safetensors, text_encoder/, tokenizer/."""
    import shutil

    from klein.checkpoint import save_fp8_transformer, save_safetensors
    from klein.loader import ModelSource

    folder = tmp_path_factory.mktemp("weights") / "tiny-bfl"
    folder.mkdir()
    src = ModelSource.from_paths(tiny_dir)
    dit = src.load_transformer().state_dict()
    save_safetensors(dit, folder / "flux-2-klein-tiny.safetensors")
    save_fp8_transformer(dit, folder / "flux-2-klein-tiny-fp8.safetensors")
    save_safetensors(src.load_vae().state_dict(), folder / "ae.safetensors")
    shutil.copytree(tiny_dir / "text_encoder", folder / "text_encoder")
    shutil.copytree(tiny_dir / "tokenizer", folder / "tokenizer")
    return folder
