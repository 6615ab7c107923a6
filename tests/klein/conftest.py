"""klein's own pipelines on the tiny weights diffusers saved (tests/conftest.py), for the parity tests."""

from __future__ import annotations

import pytest

from klein import ModelSource, Pipeline


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return Pipeline(ModelSource.from_paths(tiny_dir))


@pytest.fixture(scope="module")
def ours_base(tiny_base_dir):
    return Pipeline(ModelSource.from_paths(tiny_base_dir))
