"""Compiled code shared through storage (deployments.stages.compile_cache): a replica that starts
after another one loads what that one compiled and finds its graphs instead of compiling them. Each
replica is a process of its own with an empty inductor cache, as on a fresh pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPLICA = """
import asyncio, hashlib, json, sys
from deployments.stages.compile_cache import CompileCache
from deployments.stages.text_embedder import TextEmbedder, TextEmbedderOptions
from deployments.storage import StorageOptions
from klein import ModelSource

fast = {"compile": True, "share_compiled": True, "warmup_sizes": ["64x64"], "warmup_batch_sizes": [1]}
stage = TextEmbedder(ModelSource.preset("tiny"), TextEmbedderOptions(fast=fast, cache_mb=0),
                     compile_cache=CompileCache(StorageOptions(root=sys.argv[1])))
(embedding,) = stage.on_worker(stage.embed_now, ["a lighthouse at dusk"])  # compiled code, warmed shape
stats = asyncio.run(stage.stats())["fast_path"]
print(json.dumps(stats | {"embedding": hashlib.sha256(embedding.numpy().tobytes()).hexdigest()}))
"""


def _replica(root: Path, inductor_cache: Path) -> dict:
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    r = subprocess.run([sys.executable, "-c", REPLICA, str(root)], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[2], timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two processes compile with inductor
def test_a_replica_loads_what_an_earlier_one_compiled(tmp_path):
    root = tmp_path / "storage"
    first = _replica(root, tmp_path / "inductor-1")
    (key,) = [p for p in root.rglob("*.bin")]
    assert key.relative_to(root).parts[:2] == ("compile-cache", "TextEmbedder")
    assert "nothing to load; 0 graphs found, 1 compiled; saving" in first["compile_cache"], first
    second = _replica(root, tmp_path / "inductor-2")
    assert "MB; 1 graphs found, 0 compiled" in second["compile_cache"], second
    assert "saving" not in second["compile_cache"] and second["eager_calls"] == 0
    assert first["embedding"] == second["embedding"]


def test_an_unreadable_cache_is_logged_and_warm_up_goes_on(tmp_path, caplog):
    """What is at the key cannot be read (cut short, or framed by another torch): the replica says
    so and warms up by compiling; a storage that fails does not stop it either."""
    import torch

    from deployments.stages.compile_cache import CompileCache
    from deployments.storage import StorageError, StorageOptions

    cache = CompileCache(StorageOptions(root=tmp_path))
    where = ("Codec", torch.device("cpu"), torch.float32, {"model": "tiny"})
    key = tmp_path / cache.key(*where)
    key.parent.mkdir(parents=True)
    key.write_bytes(b"not a cache")
    with caplog.at_level("WARNING", logger="deployments.stages.compile_cache"):
        warmed, use = cache.around(*where, lambda: "warmed")
    assert warmed == "warmed" and use.loaded_bytes == 0
    assert "not loaded (ValueError: torch could not read the 11 bytes there)" in str(use) in caplog.text

    async def down(*args, **kwargs):
        raise StorageError("connection refused")

    cache.storage.get_versioned = down
    warmed, use = cache.around(*where, lambda: "warmed")
    assert warmed == "warmed" and "not loaded (StorageError: connection refused)" in str(use)


def test_of_replicas_that_compiled_at_once_the_first_save_stands(tmp_path, caplog):
    """Replicas that found nothing write only where there is still nothing; one that loaded a version
    writes only over that version."""
    import asyncio

    import torch

    from deployments.stages.compile_cache import CacheUse, CompileCache
    from deployments.storage import StorageOptions

    cache = CompileCache(StorageOptions(root=tmp_path))
    use = CacheUse(key=cache.key("Codec", torch.device("cpu"), torch.float32, {}))
    with caplog.at_level("INFO", logger="deployments.stages.compile_cache"):
        cache._upload(use, b"first", None)
        cache._upload(use, b"second", None)
        assert "another replica saved its compiled code first; kept" in caplog.text
        _, etag = asyncio.run(cache.storage.get_versioned(use.key))
        cache._upload(use, b"third", "an older version")
        assert asyncio.run(cache.storage.get(use.key)) == b"first"
        cache._upload(use, b"fourth", etag)
    assert asyncio.run(cache.storage.get(use.key)) == b"fourth"
