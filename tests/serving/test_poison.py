"""A poisoned request — one that makes its stage raise — fails alone: each stage (text embedder,
flow transformer, codec's classifier) falls back to one-by-one when a batch fails, so the poisoned
job ends in Error and its batch-mates end Ready with the images they would have had alone."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from deployments.jobs.records import Status
from tests.serving.inprocess import build, submit_job


async def _jobs(ingress, specs):
    jobs = []
    for prompt, seed in specs:
        job, _ = await submit_job(ingress, prompt=prompt, width=64, height=64, seed=seed, steps=None, guidance=None,
                                      safety_tolerance=2, output_format="png", images=[])  # fmt: skip
        jobs.append(job)
    return jobs


async def _image(ingress, job_id):
    job = await ingress.service.store.get(job_id)
    return np.asarray(Image.open(io.BytesIO(await ingress.service.storage.get(job.result.key))))


def _poison(ingress, stage: str, batches: list[int]):
    """Make `stage` raise for any batch that holds the poisoned request; record batch sizes tried."""
    if stage == "embed":
        te = ingress.service.stages.embedder.obj
        te._embed_batch.set_batch_wait_timeout_s(0.2)
        real = te.embedder

        def embedder(prompts):
            batches.append(len(prompts))
            if any("POISON" in p for p in prompts):
                raise RuntimeError("tokenizer choked")
            return real(prompts)

        te.embedder = embedder
    elif stage == "denoise":
        ft = ingress.service.stages.transformer.obj
        ft._batched.set_batch_wait_timeout_s(0.5)
        real = ft._run_group

        async def run_group(items):
            batches.append(len(items))
            if any(it.params.seed == 666 for it in items):
                raise RuntimeError("NaNs in the latents")
            return await real(items)

        ft._run_group = run_group
    else:
        codec = ingress.service.stages.codec.obj
        codec._finish_batch.set_batch_wait_timeout_s(0.5)
        real = codec.post.flagged

        def flagged(images, params):
            batches.append(len(images))
            if any(p.seed == 666 for p in params):
                raise RuntimeError("classifier failed on this image")
            return real(images, params)

        codec.post.flagged = flagged


@pytest.mark.slow  # three stages started per case
@pytest.mark.parametrize("stage", ["embed", "denoise", "codec"])
def test_poisoned_request_fails_alone(tmp_path, stage):
    clean = build(tmp_path / "clean")
    ingress = build(tmp_path / "data")
    batches: list[int] = []
    _poison(ingress, stage, batches)
    poison = ("POISON the well", 7) if stage == "embed" else ("a fox", 666)
    specs = [("a fox", 1), poison, ("a hare", 2), ("a lynx", 3)]

    async def go():
        jobs = await _jobs(ingress, specs)
        await asyncio.gather(*(ingress.service.run(j) for j in jobs))
        statuses = [(await ingress.service.store.get(j.id)).status for j in jobs]
        assert statuses == [Status.READY, Status.ERROR, Status.READY, Status.READY], statuses
        assert max(batches) > 1, batches  # the poisoned request did share a batch
        usage = await ingress.service.storage.list("usage")
        assert len(usage) == 3 and not any(jobs[1].id in k for k in usage)  # the failure is not billed
        # batch-mates got exactly the images they get alone
        ref = await _jobs(clean, [specs[0], specs[3]])
        for j in ref:
            await clean.service.run(j)
        assert np.array_equal(await _image(ingress, jobs[0].id), await _image(clean, ref[0].id))
        assert np.array_equal(await _image(ingress, jobs[3].id), await _image(clean, ref[1].id))

    asyncio.run(go())


def test_a_poisoned_job_retried_leaves_the_replica_healthy_a_broken_one_does_not(tmp_path):
    """The ingress runs a failing job up to max_attempts times; that one job failing again and again
    must not mark the transformer unhealthy (Serve would restart it, killing its other batches).
    Requests for three different jobs failing in a row do; a success clears the count. The failure
    comes from the denoising steps, where a device fails (setting up a batch does not touch it)."""
    ingress = build(tmp_path / "data")
    ft = ingress.service.stages.transformer.obj
    real, broken = ft._start, {"all": False}
    tries: list[int] = []

    def start(items, lora=None, hook=None):
        steps, poisoned = real(items, lora, hook), broken["all"] or any(it.params.seed == 666 for it in items)
        tries.append(len(items))

        def failing():
            for out in steps:
                if poisoned:
                    raise RuntimeError("NaNs in the latents")
                yield out

        return failing()

    ft._start = start

    async def go():
        (poisoned,) = await _jobs(ingress, [("a fox", 666)])
        await ingress.service.run(poisoned)
        assert (await ingress.service.store.get(poisoned.id)).status == Status.ERROR
        assert tries == [1] * ingress.service.options.max_attempts and len(tries) >= 3
        await ft.check_health()  # one job, however often it failed

        broken["all"] = True  # now every request fails, whichever job
        others = await _jobs(ingress, [("a hare", 2), ("a lynx", 3)])
        for job in others:
            await ingress.service.run(job)
        with pytest.raises(RuntimeError, match="3 different jobs failed"):
            await ft.check_health()

        broken["all"] = False
        (clean,) = await _jobs(ingress, [("an owl", 4)])
        await ingress.service.run(clean)
        assert (await ingress.service.store.get(clean.id)).status == Status.READY
        await ft.check_health()

    asyncio.run(go())


def test_a_codec_whose_decoder_fails_every_image_turns_unhealthy(tmp_path):
    """The codec catches each image's decode failure (its batch-mates go on), so its health is
    judged per request: three different jobs failing to decode mark it unhealthy."""
    ingress = build(tmp_path / "data")
    codec = ingress.service.stages.codec.obj

    def decode(z):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async def go():
        (first,) = await _jobs(ingress, [("a fox", 1)])
        await ingress.service.run(first)
        await codec.check_health()
        codec.vae.decode = decode
        jobs = await _jobs(ingress, [("a hare", 2), ("a lynx", 3), ("an owl", 4)])
        for job in jobs[:2]:
            await ingress.service.run(job)
        await codec.check_health()  # two different jobs so far
        await ingress.service.run(jobs[2])
        assert (await ingress.service.store.get(jobs[2].id)).status == Status.ERROR
        with pytest.raises(RuntimeError, match="3 different jobs failed"):
            await codec.check_health()

    asyncio.run(go())


def test_an_unreadable_reference_fails_only_the_edit_that_needs_it(tmp_path):
    """With C2PA on, the codec reads each edit's references (its ingredients) for the batch; a read
    that fails must fail that edit alone, not its batch-mates (a text-to-image job needs none)."""
    from deployments.stages.payloads import FinishParams
    from deployments.storage import StorageError

    ingress = build(tmp_path / "data")
    codec = ingress.service.stages.codec.obj

    def params(job, keys):
        return FinishParams(job, f"images/{job}.png", "png", "p", "m", 1, input_keys=tuple(keys))

    async def go():
        await codec.storage.put("inputs/a/0", b"ref a")
        await codec.storage.put("inputs/b/0", b"ref b")
        real = codec.storage.get

        async def get(key, retry_s=None):
            if key == "inputs/b/0":
                raise StorageError("s3 get_object failed: connection reset")
            return await real(key, retry_s)

        codec.storage.get = get
        out = await codec._ingredients(
            [params("a", ["inputs/a/0"]), params("b", ["inputs/b/0"]), params("c", [])]
        )
        assert out[0] == [b"ref a"] and isinstance(out[1], StorageError) and out[2] == []

    asyncio.run(go())


def test_the_embedder_judges_each_prompt(tmp_path):
    """The embedder's health counts failed prompts, one poisoned prompt once however often it is
    retried: three different failing prompts in a row mark it unhealthy."""
    ingress = build(tmp_path / "data")
    te = ingress.service.stages.embedder.obj
    real, broken = te.embedder, {"all": False}

    def embedder(prompts):
        if broken["all"] or any("POISON" in p for p in prompts):
            raise RuntimeError("tokenizer choked")
        return real(prompts)

    te.embedder = embedder

    async def go():
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await te.embed("POISON the well")
        await te.check_health()
        broken["all"] = True
        for prompt in ("a hare", "a lynx"):
            with pytest.raises(RuntimeError):
                await te.embed(prompt)
        with pytest.raises(RuntimeError, match="3 different jobs failed"):
            await te.check_health()

    asyncio.run(go())


def test_a_failing_cancel_check_does_not_fail_the_denoise(tmp_path):
    """The transformer's cancel check reads storage; when storage is down it counts as "not
    cancelled" and the jobs go on (it must not fail the group and then each one-by-one retry)."""
    from deployments.storage import StorageError

    ingress = build(tmp_path / "data")

    async def down(job_ids):
        raise StorageError("s3 get_object failed: connection refused")

    ingress.service.stages.transformer.obj.cancel = down

    async def go():
        jobs = await _jobs(ingress, [("a fox", 1), ("a hare", 2)])
        await asyncio.gather(*(ingress.service.run(j) for j in jobs))
        assert [(await ingress.service.store.get(j.id)).status for j in jobs] == [Status.READY] * 2

    asyncio.run(go())
