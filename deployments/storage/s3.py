"""The S3-compatible backend (boto3), with a probe of whether the server honours conditional writes."""

from __future__ import annotations

import contextlib
import functools
import secrets
import threading

from deployments.storage.base import (
    PreconditionFailed,
    Storage,
    StorageError,
    StorageOptions,
    check_key,
    log,
)


class S3Storage(Storage):
    def __init__(self, o: StorageOptions):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = o.bucket, o.prefix
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        creds = {}
        if o.access_key_id and o.secret_access_key:
            creds = {
                "aws_access_key_id": o.access_key_id.get_secret_value(),
                "aws_secret_access_key": o.secret_access_key.get_secret_value(),
            }
        config = Config(
            s3={"addressing_style": "path" if o.path_style else "virtual"},
            signature_version="s3v4",
            retries={"max_attempts": 2, "mode": "standard"},  # one quick retry; outages: Storage._retrying
            connect_timeout=5,
            read_timeout=30,
        )
        self.client = boto3.client(
            "s3", endpoint_url=o.endpoint_url, region_name=o.region, config=config, **creds
        )
        self.call_timeout_s = 2 * (5 + 30)  # botocore's two attempts, each its connect and read timeout
        self._conditions: str | None = None  # "enforced", "ignored" or "rejected": probed on first use
        self._probe_lock = threading.Lock()
        if o.create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self):
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def _call(self, fn, missing_ok: bool = True, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            conditional = "IfMatch" in kw or "IfNoneMatch" in kw
            if conditional and code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                raise PreconditionFailed(f"s3 {kw['Key']}: {code}") from None  # (409: a retryable race)
            if missing_ok and code in ("NoSuchKey", "404"):
                return None
            raise StorageError(f"s3 {fn.__name__} failed: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"s3 {fn.__name__} failed: {e}") from e
        except (AttributeError, TypeError, ValueError) as e:
            # botocore's own parsing can fail on an odd error response (seen here: a streaming
            # checksum body it then tried to .strip()): a failed call like any other, retried
            raise StorageError(f"s3 {fn.__name__} failed: {type(e).__name__}: {e}") from e

    def _put(self, key, data, content_type, if_match=None, if_none_match=False):
        condition = {"IfMatch": if_match} if if_match is not None else {}
        if if_none_match:
            condition["IfNoneMatch"] = "*"
        if condition and self._probe() == "rejected":
            condition = {}  # the server refuses the headers: write as before conditions existed
        r = self._call(
            self.client.put_object, Key=self.prefix + key, Body=data, ContentType=content_type, **condition
        )
        return r["ETag"]

    def _get(self, key):
        def get_object(**kw):  # the body is read inside: a failed read is a StorageError, retried alike
            r = self.client.get_object(**kw)
            return r["Body"].read(), r["ETag"]

        return self._call(get_object, Key=self.prefix + key)

    def _delete(self, key):
        self._call(self.client.delete_object, Key=self.prefix + key)

    def _list(self, prefix):
        keys, token = [], None
        while True:
            kw = {"Prefix": self.prefix + prefix, **({"ContinuationToken": token} if token else {})}
            r = self._call(self.client.list_objects_v2, **kw) or {}
            keys += [o["Key"][len(self.prefix) :] for o in r.get("Contents", [])]
            token = r.get("NextContinuationToken")
            if not token:
                return keys

    def url(self, key, base_url, expires_s):
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + check_key(key)},
            ExpiresIn=expires_s,
        )

    def check(self):
        self._call(self.client.head_bucket, missing_ok=False)

    def supports_conditional_writes(self):
        return self._probe() == "enforced"

    def _probe(self) -> str:
        """S3 has conditional writes (If-Match / If-None-Match on PUT, since 2024); some S3-compatible
        servers ignore the headers (rclone's does) and a few may refuse them. Probed once, on first
        use: over an existing object, a create-only write and a write over a wrong version must both
        be refused. A StorageError (server down) leaves it for the next call."""
        if self._conditions is not None:  # decided: every conditional write asks, no lock needed
            return self._conditions
        with self._probe_lock:
            if self._conditions is None:
                self._conditions = self._try_conditions()
                if self._conditions != "enforced":
                    log.warning(
                        "the S3 server %s conditional writes%s: one job can get two runners (racing "
                        "reapers or Idempotency-Key twins), though it is billed once",
                        self._conditions,
                        ", so they are sent without" if self._conditions == "rejected" else "",
                    )
            return self._conditions

    def _try_conditions(self) -> str:
        key = f"{self.prefix}probe/conditional-writes-{secrets.token_hex(8)}"
        put = functools.partial(self._call, self.client.put_object, Key=key, ContentType="text/plain")
        verdicts = set()
        try:
            put(Body=b"1")
            for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0"'}):
                try:
                    put(Body=b"2", **condition)
                    verdicts.add("ignored")
                except PreconditionFailed:
                    verdicts.add("enforced")
                except StorageError as e:  # a 4xx or 501 answer refuses the header; others are outages
                    response = getattr(e.__cause__, "response", {})
                    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if not (400 <= status < 500 or status == 501):
                        raise
                    verdicts.add("rejected")
        finally:
            with contextlib.suppress(StorageError):
                self._call(self.client.delete_object, Key=key)
        return next(v for v in ("rejected", "ignored", "enforced") if v in verdicts)
