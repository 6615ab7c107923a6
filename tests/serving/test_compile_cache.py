"""Compiled code shared through storage (deployments.stages.compile_cache): a replica that starts
after another one loads what that one compiled and finds its graphs instead of compiling them. Each
replica is a process of its own with an empty inductor cache, as on a fresh pod
(benchmarks/compile_cache.py starts them)."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # two processes compile with inductor
def test_a_replica_loads_what_an_earlier_one_compiled(tmp_path):
    """benchmarks/compile_cache.py's replicas: the first compiles and saves, the second loads it,
    finds its graph and saves nothing; both embed alike."""
    from benchmarks.compile_cache import run_replicas

    first, second = run_replicas("text_embedder", "tiny", 64, "cpu", 2, tmp_path)
    (key,) = [p for p in tmp_path.rglob("*.bin")]
    assert key.relative_to(tmp_path).parts[:2] == ("compile-cache", "TextEmbedder")
    assert "nothing to load; 0 graphs found, 1 compiled; saving" in first["compile_cache"], first
    assert "MB; 1 graphs found, 0 compiled" in second["compile_cache"], second
    assert "saving" not in second["compile_cache"]
    assert first["check"] == second["check"]


@pytest.mark.slow  # two processes compile with inductor
def test_the_benchmark_measures_the_same_with_klein_alone(tmp_path):
    """`--bare`, for a machine without the service's dependencies (the lent GPU): klein's model set
    up by klein.fast, torch's compiled code kept in a file."""
    from benchmarks.compile_cache import run_replicas

    first, second = run_replicas("codec", "tiny", 64, "cpu", 2, tmp_path, bare=True)
    assert "loaded 0.0 MB; 0 graphs found, 1 compiled; saving" in first["compile_cache"], first
    assert "MB; 1 graphs found, 0 compiled" in second["compile_cache"], second
    assert [p.name for p in tmp_path.iterdir()] == ["codec-cpu.bin"]


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
