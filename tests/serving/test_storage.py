"""Storage backends: S3 (against rclone serve s3, SigV4 enforced) and the local directory."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from deployments.storage import (
    PreconditionFailed,
    StorageError,
    StorageOptions,
    check_key,
    open_storage,
)
from deployments.storage.local import LocalStorage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3):
    if request.param == "local":
        return open_storage(StorageOptions(root=tmp_path / "data"))
    return open_storage(StorageOptions(**s3.options(bucket=f"t{int(time.time() * 1e6)}")))


def test_the_local_root_defaults_to_the_users_data_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert StorageOptions().root == tmp_path / "xdg" / "klein-serve"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert StorageOptions().root == tmp_path / "home" / ".local" / "share" / "klein-serve"
    assert StorageOptions(root="elsewhere").root == Path("elsewhere")


def test_round_trip_list_delete(storage):
    async def go():
        await storage.put("jobs/a.json", b'{"x": 1}', "application/json")
        await storage.put("jobs/b.json", b"{}")
        await storage.put("images/2026/11/22/c.png", b"png")
        assert await storage.get("jobs/a.json") == b'{"x": 1}'
        assert await storage.get("jobs/missing.json") is None
        assert sorted(await storage.list("jobs")) == ["jobs/a.json", "jobs/b.json"]
        assert await storage.list("nothing") == []
        await storage.delete("jobs/a.json")
        await storage.delete("jobs/a.json")  # idempotent
        assert await storage.list("jobs/") == ["jobs/b.json"]

    asyncio.run(go())
    storage.check()


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "a/../../b", "/abs", "a//b", "", "a/./b", "x" * 600, "a\\b", "a b"]
)
def test_keys_cannot_escape(storage, key):
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        asyncio.run(storage.put(key, b"x"))


def test_urls_fetch_and_expire(storage, tmp_path):
    asyncio.run(storage.put("images/x.png", b"\x89PNG-bytes", "image/png"))
    if isinstance(storage, LocalStorage):
        url = storage.url("images/x.png", "http://h", 600)
        q = dict(p.split("=") for p in url.split("?")[1].split("&"))
        assert storage.verify("images/x.png", int(q["expires"]), q["signature"])
        assert not storage.verify("images/y.png", int(q["expires"]), q["signature"])
        assert not storage.verify(
            "images/x.png", int(time.time()) - 1, storage.signature("images/x.png", int(time.time()) - 1)
        )
        # the signing key is shared by every process using the same root
        assert LocalStorage(storage.root).signature("k", 1) == storage.signature("k", 1)
    else:
        url = storage.url("images/x.png", "unused", 600)
        assert httpx.get(url).content == b"\x89PNG-bytes"
        short = storage.url("images/x.png", "unused", 1)
        time.sleep(2.1)
        assert httpx.get(short).status_code in (400, 403)  # presigned URLs expire (rclone answers 400)


@pytest.mark.slow
def test_s3_bad_credentials_and_missing_bucket(s3):
    bad = open_storage(
        StorageOptions(**{**s3.options(), "secret_access_key": "wrong", "create_bucket": False})
    )
    with pytest.raises(StorageError):
        asyncio.run(bad.put("jobs/x.json", b"{}"))
    missing = open_storage(StorageOptions(**{**s3.options(bucket="no-such-bucket"), "create_bucket": False}))
    with pytest.raises(StorageError):
        missing.check()


def test_s3_a_body_read_that_breaks_off_is_retried(s3):
    """get_object can succeed and the body's read fail (a connection reset mid-stream): that is a
    storage failure like any other, retried, not an unexpected exception that fails the caller."""
    from botocore.exceptions import ResponseStreamingError

    storage = open_storage(StorageOptions(**s3.options(bucket=f"t{int(time.time() * 1e6)}")))
    asyncio.run(storage.put("inputs/j/0", b"reference bytes"))
    real, broken = storage.client.get_object, [True]

    class Breaks:
        def read(self):
            raise ResponseStreamingError(error="connection reset by peer")

    def get_object(**kw):
        if broken:
            broken.pop()
            return {"Body": Breaks()}
        return real(**kw)

    storage.client.get_object = get_object
    assert asyncio.run(storage.get("inputs/j/0")) == b"reference bytes"
    assert not broken


def test_s3_a_5xx_that_botocore_fails_to_parse_is_retried(s3):
    """botocore can trip over its own parsing of a 5xx error response (seen under load against
    rclone: `'StreamingChecksumBody' object has no attribute 'strip'`): a failed call, retried, not
    an AttributeError that answers the client 500."""
    storage = open_storage(StorageOptions(**s3.options(bucket=f"t{int(time.time() * 1e6)}")))
    asyncio.run(storage.put("jobs/x.json", b"{}"))
    real, broken = storage.client.get_object, [True]

    def get_object(**kw):
        if broken:
            broken.pop()
            raise AttributeError("'StreamingChecksumBody' object has no attribute 'strip'")
        return real(**kw)

    storage.client.get_object = get_object
    assert asyncio.run(storage.get("jobs/x.json")) == b"{}"
    assert not broken


@pytest.fixture(params=["local", "s3-moto"])
def enforcing(request, tmp_path):
    """Backends that enforce conditional writes: the local directory, and S3 as moto implements it
    (AWS's semantics: 412 PreconditionFailed; rclone's server ignores the headers, tested below)."""
    if request.param == "local":
        yield open_storage(StorageOptions(root=tmp_path / "data"))
        return
    from moto import mock_aws

    with mock_aws():
        yield open_storage(
            StorageOptions(
                backend="s3", bucket="klein", access_key_id="k", secret_access_key="s", create_bucket=True
            )
        )


def test_conditional_writes_are_compare_and_swap(enforcing):
    storage = enforcing

    async def go():
        first = await storage.put("jobs/c.json", b"1", if_none_match=True)
        with pytest.raises(PreconditionFailed):  # create-only, and it exists
            await storage.put("jobs/c.json", b"other", if_none_match=True)
        assert await storage.get_versioned("jobs/c.json") == (b"1", first)
        second = await storage.put("jobs/c.json", b"2", if_match=first)
        assert second != first
        with pytest.raises(PreconditionFailed):  # over a version that is no longer there
            await storage.put("jobs/c.json", b"3", if_match=first)
        with pytest.raises(PreconditionFailed):  # over a version of an object that does not exist
            await storage.put("jobs/none.json", b"3", if_match=first)
        assert await storage.get("jobs/c.json") == b"2"
        # a write whose try landed but whose answer was lost is retried, fails its own condition, and
        # finds its own bytes there: done, not refused. Without a lost answer, the same bytes are refused.
        real, lost = storage._put, [True]

        def answer_lost(*args):
            etag = real(*args)
            if lost:
                raise StorageError(f"connection reset after the write ({lost.pop()})")
            return etag

        storage.retry_s, storage._put = 5.0, answer_lost
        third = await storage.put("jobs/c.json", b"3", if_match=second)
        assert not lost and (b"3", third) == await storage.get_versioned("jobs/c.json")
        with pytest.raises(PreconditionFailed):
            await storage.put("jobs/c.json", b"3", if_match=second)
        # racing swaps over one version, from threads: exactly one lands
        racers = [storage.put("jobs/c.json", f"r{i}".encode(), if_match=third) for i in range(8)]
        results = await asyncio.gather(*racers, return_exceptions=True)
        won = [r for r in results if not isinstance(r, PreconditionFailed)]
        assert len(won) == 1 and isinstance(won[0], str), results
        assert (await storage.get_versioned("jobs/c.json"))[1] == won[0]

    asyncio.run(go())
    assert storage.supports_conditional_writes()


def test_an_s3_server_that_ignores_conditional_writes_is_found_out(s3, caplog):
    """rclone's S3 server accepts If-Match / If-None-Match and ignores them: the probe says so (and
    warns), and writes carry on as before conditions existed."""
    storage = open_storage(StorageOptions(**s3.options(bucket=f"t{int(time.time() * 1e6)}")))
    with caplog.at_level("WARNING", logger="deployments.storage"):
        assert not storage.supports_conditional_writes()
    assert "ignored conditional writes" in caplog.text
    assert asyncio.run(storage.list("probe")) == []  # the probe cleans up after itself

    async def go():
        etag = await storage.put("jobs/c.json", b"1", if_none_match=True)
        await storage.put("jobs/c.json", b"2", if_match=etag)
        await storage.put("jobs/c.json", b"3", if_match=etag)  # stale, and accepted: nothing enforces it
        assert await storage.get("jobs/c.json") == b"3"

    asyncio.run(go())


def _s3_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")  # fmt: skip


def test_s3_conditional_writes_where_the_server_refuses_or_races(caplog):
    """A 409 ConditionalRequestConflict (AWS: a concurrent conditional write, retry) is retried, not
    taken for a lost race; a server that refuses the conditional headers outright (4xx/501) is
    written to without them, and warned about."""
    from moto import mock_aws

    with mock_aws():
        storage = open_storage(
            StorageOptions(
                backend="s3", bucket="klein", access_key_id="k", secret_access_key="s", create_bucket=True
            )
        )
        real, conflicts = storage.client.put_object, [_s3_error("ConditionalRequestConflict", 409)]

        def racing(**kw):
            if conflicts and "IfMatch" in kw:
                raise conflicts.pop()
            return real(**kw)

        storage.client.put_object = racing
        first = asyncio.run(storage.put("jobs/c.json", b"1", if_none_match=True))
        assert asyncio.run(storage.put("jobs/c.json", b"2", if_match=first)) and not conflicts
        assert asyncio.run(storage.get("jobs/c.json")) == b"2"

        refusing = open_storage(
            StorageOptions(backend="s3", bucket="klein", access_key_id="k", secret_access_key="s")
        )
        real = refusing.client.put_object

        def refuse(**kw):
            if "IfMatch" in kw or "IfNoneMatch" in kw:
                raise _s3_error("NotImplemented", 501)
            return real(**kw)

        refusing.client.put_object = refuse
        with caplog.at_level("WARNING", logger="deployments.storage"):
            assert asyncio.run(refusing.put("jobs/c.json", b"3", if_match="stale")) is not None
        assert "rejected conditional writes, so they are sent without" in caplog.text
        assert asyncio.run(refusing.get("jobs/c.json")) == b"3" and not refusing.supports_conditional_writes()
        assert asyncio.run(refusing.list("probe")) == []


def test_the_local_backends_os_errors_are_storage_errors(tmp_path):
    """An object that cannot be read (here: a directory where a file should be, EISDIR; in life
    EIO, EMFILE, EACCES...) is the backend failing, retried and answered 503 as such, not a
    500 from an OSError nothing catches."""
    from deployments.storage import StorageError
    from deployments.storage.local import LocalStorage

    local = LocalStorage(tmp_path / "root")
    (tmp_path / "root" / "jobs" / "x.json").mkdir(parents=True)
    (tmp_path / "root" / "pending" / "k" / "x" / "y").mkdir(parents=True)
    with pytest.raises(StorageError, match="local get jobs/x.json"):
        local._get("jobs/x.json")
    with pytest.raises(StorageError, match="local delete pending/k/x"):
        local._delete("pending/k/x")
