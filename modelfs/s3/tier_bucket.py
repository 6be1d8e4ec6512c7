"""The shared tier's bucket through boto3: get, put (optionally only if
absent, for leases) and delete of whole small objects.

`modelfs.tier.SharedTier` owns what is stored there and why; this module
only talks to the bucket, and sorts its errors with `modelfs.s3.errors`.
"""

from __future__ import annotations

from typing import Any

from ..errors import NoSuchObject, StoreError
from . import client as s3client
from .errors import CONFLICT_CODES, status_and_code, translate
from .settings import S3Settings


class S3Tier:
    """The tier bucket through boto3 (`modelfs.tier.TierStore`); the
    settings carry short timeouts (`MountConfig.tier_settings`): a slow
    tier must cost a read little more than going to the origin."""

    def __init__(self, settings: S3Settings, bucket: str) -> None:
        self.bucket = bucket
        self._client = s3client.client(
            s3client.session(settings), settings, retries={"mode": "standard", "max_attempts": 2}
        )
        self._endpoint = settings.endpoint_name

    def _translate(self, exc: Exception, what: str) -> StoreError:
        return translate(exc, what, self.bucket, self._endpoint)

    def get(self, key: str) -> bytes | None:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            data: bytes = resp["Body"].read()
            return data
        except Exception as exc:
            error = self._translate(exc, f"s3://{self.bucket}/{key}")
            if isinstance(error, NoSuchObject):
                return None
            raise error from None

    def put(self, key: str, body: bytes, *, exclusive: bool = False) -> bool:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body}
        if exclusive:
            kwargs["IfNoneMatch"] = "*"
        try:
            self._client.put_object(**kwargs)
            return True
        except Exception as exc:
            status, code = status_and_code(exc)
            if exclusive and (status == 412 or code in CONFLICT_CODES):
                return False
            raise self._translate(exc, f"s3://{self.bucket}/{key}") from None

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self._translate(exc, f"s3://{self.bucket}/{key}") from None
