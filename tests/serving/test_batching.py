"""A busy stage batches what arrived while it worked, even when requests arrive one at a time.

Ray Serve forms a @serve.batch batch as soon as an item is queued, before the running batch ends;
without the stages' gate (deployments/stage.py `gated`), requests that arrive at different moments
queue as batches of one and a loaded stage never batches. Here the first batch is held on the
worker thread while more requests arrive one by one; they must run as one batch after it."""

from __future__ import annotations

import asyncio
import threading

from deployments.jobs.records import Status
from deployments.stages.text_embedder import TextEmbedder, TextEmbedderOptions
from klein import ModelSource
from tests.serving.inprocess import _fresh_batch_queues, build, submit_job


def _hold_first_call(obj, name: str) -> tuple[threading.Event, threading.Event]:
    """Make obj.<name> block on its first call until released; returns (entered, release)."""
    real = getattr(obj, name)
    entered, release = threading.Event(), threading.Event()

    def held(*args):
        if not entered.is_set():
            entered.set()
            assert release.wait(30), "never released"
        return real(*args)

    setattr(obj, name, held)
    return entered, release


def _arrivals(stage) -> list:
    """Count the requests that reached the stage (its `through`, where a request waits for a running
    batch to end): the test then spaces its arrivals by their actually arriving, not by a sleep that
    a loaded machine outlasts on the way there (embedding, storage)."""
    real, arrived = stage.through, []

    async def through(*args):
        arrived.append(args)
        return await real(*args)

    stage.through = through
    return arrived


async def _until(done, what: str = "the first batch never started") -> None:
    for _ in range(3000):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


def test_embedder_batches_requests_that_arrived_one_by_one():
    async def go():
        _fresh_batch_queues()
        te = TextEmbedder(ModelSource.preset("tiny"), TextEmbedderOptions(max_batch_size=8, cache_mb=0))
        entered, release = _hold_first_call(te, "embed_now")
        arrived = _arrivals(te)
        first = asyncio.create_task(te.embed("first"))
        await _until(entered.is_set)
        later = []
        for n, prompt in enumerate(("second", "third", "fourth"), start=2):
            later.append(asyncio.create_task(te.embed(prompt)))
            await _until(lambda n=n: len(arrived) == n, f"request {n} never reached the stage")
            await asyncio.sleep(0.02)  # separate arrivals, not one burst
        release.set()
        out = await asyncio.gather(first, *later)
        assert [tuple(e.shape) for e in out] == [tuple(out[0].shape)] * 4
        assert list(te.batch_sizes) == [1, 3]

    asyncio.run(go())


def test_transformer_batches_jobs_that_arrived_one_by_one(tmp_path):
    async def go():
        ingress = build(str(tmp_path))
        transformer = ingress.service.stages.transformer.obj
        entered, release = _hold_first_call(transformer, "_start")

        async def job(seed):
            job, _ = await submit_job(ingress, prompt=f"p{seed}", width=64, height=64, seed=seed, steps=None,
                                          guidance=None, safety_tolerance=2, output_format="png",
                                          images=[])  # fmt: skip
            await ingress.service.run(job, fresh=True)
            return await ingress.service.store.get(job.id)

        arrived = _arrivals(transformer)
        first = asyncio.create_task(job(0))
        await _until(entered.is_set)
        later = []
        for seed in (1, 2, 3):
            later.append(asyncio.create_task(job(seed)))
            await _until(lambda n=seed + 1: len(arrived) == n, f"job {seed} never reached the transformer")
            await asyncio.sleep(0.02)
        release.set()
        jobs = await asyncio.gather(first, *later)
        assert [j.status for j in jobs] == [Status.READY] * 4
        assert list(transformer.batch_sizes) == [1, 3]

    asyncio.run(go())
