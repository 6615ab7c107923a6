"""Object storage: the source of truth for jobs, images and usage (docs/architecture.md, "State").

Two backends behind one interface (`base.Storage`): S3-compatible (`s3`, boto3) and a local
directory (`local`, the embedded default, whose "presigned" URLs are HMAC-signed links served by the
ingress). Keys are relative, '/'-separated and validated, so no key can leave its backend's root or
bucket prefix.
"""

from __future__ import annotations

from deployments.storage.base import (
    PreconditionFailed,
    Storage,
    StorageError,
    StorageOptions,
    check_key,
)
from deployments.storage.local import LocalStorage
from deployments.storage.s3 import S3Storage

__all__ = [
    "LocalStorage",
    "PreconditionFailed",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageOptions",
    "check_key",
    "open_storage",
]


def open_storage(o: StorageOptions) -> Storage:
    if o.backend == "s3":
        storage = S3Storage(o)
    else:
        storage = LocalStorage(o.root, o.signing_key.get_secret_value().encode() if o.signing_key else None)
    storage.retry_s = o.retry_s
    return storage
