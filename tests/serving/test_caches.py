"""In-replica caches: prompt embeddings in the TextEmbedder, reference encodings in the Codec."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.stages.base import LRU
from deployments.stages.codec import Codec, CodecOptions
from deployments.stages.text_embedder import TextEmbedder, TextEmbedderOptions
from deployments.storage import StorageOptions
from klein import ModelSource
from tests.serving.inprocess import _fresh_batch_queues


def test_lru_keeps_its_byte_budget_and_drops_the_least_recently_used():
    cache = LRU(10, len)
    cache.put("a", b"xxxx")
    cache.put("b", b"yyyy")
    assert cache.get("a") == b"xxxx"  # a is now the most recent
    cache.put("c", b"zzzz")  # 12 bytes > 10: b goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    cache.put("huge", b"h" * 11)  # larger than the whole budget: not kept
    assert cache.get("huge") is None
    assert cache.stats() == {"cache_entries": 2, "cache_bytes": 8, "hits": 3, "misses": 2}


def test_embedder_serves_repeated_prompts_from_its_cache():
    async def go():
        _fresh_batch_queues()
        te = TextEmbedder(ModelSource.preset("tiny"), TextEmbedderOptions())
        first = await te.embed("a red fox")
        again = await te.embed("a red fox")
        assert torch.equal(first, again)
        stats = await te.stats()
        assert (stats["hits"], stats["misses"], stats["cache_entries"]) == (1, 1, 1)

    asyncio.run(go())


@pytest.mark.slow  # a Codec with its VAE fit, twice
def test_codec_encodes_the_same_references_once(tmp_path):
    """The n images of one OpenAI edit (and repeated edits of one picture) share an encoding."""

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 96, 3), np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    async def go():
        codec = Codec(ModelSource.preset("tiny"), CodecOptions(), StorageOptions(root=str(tmp_path)))
        a, b = png(0), png(1)
        first = await codec.encode([a, b])
        again = await codec.encode([a, b])
        other = await codec.encode([b, a])  # order matters: a different conditioning
        assert torch.equal(first.tokens, again.tokens) and first.shapes == again.shapes
        assert not torch.equal(first.tokens, other.tokens)
        stats = (await codec.stats())["references"]
        assert (stats["hits"], stats["misses"], stats["cache_entries"]) == (1, 2, 2)
        uncached = Codec(
            ModelSource.preset("tiny"), CodecOptions(reference_cache_mb=0), StorageOptions(root=str(tmp_path))
        )
        fresh = await uncached.encode([a, b])
        assert torch.equal(fresh.tokens, first.tokens)  # the cache returns what encoding gives
        assert (await uncached.stats())["references"]["cache_entries"] == 0

    asyncio.run(go())
