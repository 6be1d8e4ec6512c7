"""The origin store through boto3: the `ObjectStore` a mount, a pull and
`modelfs snapshot` read the bucket with.

Owns listing (one level, or a whole prefix with VersionIds), HEAD of the
current version, small documents (manifests) and the start-up probe. The
ranged GET, its retries and deadline are `s3.ranged`'s; the checks every
response passes and the body's receive are `s3.response`'s. Errors are
sorted by `modelfs.s3.errors`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import (
    EmptySource,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchObject,
    SourceIsObject,
    StoreError,
)
from ..store import (
    Deliver,
    Listing,
    ObjectInfo,
    ObjectVersion,
    StoreCounters,
    Tree,
    empty_source_message,
    epoch_ns,
)
from . import client as s3client
from .errors import label, not_s3, status_and_code, translate
from .ranged import RangedGet
from .settings import S3Settings

log = logging.getLogger(__name__)

# The start-up probe: an endpoint that does not answer fails the mount
# within PROBE_TIMEOUT seconds (docs/semantics.md).
PROBE_TIMEOUT = 10.0
PROBE_CONNECT_TIMEOUT = 3.0
PROBE_READ_TIMEOUT = 4.0


def _strip_etag(etag: str | None) -> str | None:
    return etag if etag else None


class S3Store:
    """The origin bucket through boto3. One client per timeout pair, shared
    by all worker threads."""

    def __init__(self, settings: S3Settings, bucket: str) -> None:
        self.bucket = bucket
        self.counters = StoreCounters()
        self._endpoint = settings.endpoint_name
        boto_session = s3client.session(settings)

        def client(connect: float, read: float, retries: dict[str, Any]) -> Any:
            return s3client.client(
                boto_session,
                settings,
                connect_timeout=connect,
                read_timeout=read,
                retries=retries,
            )

        self._client = client(
            settings.connect_timeout,
            settings.read_timeout,
            {"mode": "standard", "max_attempts": 5},
        )

        # Ranged GETs retry in s3.ranged itself: it resumes from the last
        # byte received and bounds the total time, which botocore's retries
        # (whole request again, attempts rather than time) cannot do.
        self._ranged = RangedGet(
            bucket,
            self._endpoint,
            lambda connect, read: client(connect, read, {"total_max_attempts": 1}),
            (settings.connect_timeout, settings.read_timeout),
            settings.retry_timeout,
            self.counters,
        )
        # The start-up probe must answer "unreachable" within PROBE_TIMEOUT:
        # short timeouts, one attempt, retried by `probe` while time is left.
        self._probe_client = client(
            PROBE_CONNECT_TIMEOUT, PROBE_READ_TIMEOUT, {"total_max_attempts": 1}
        )
        # When the probe's listing was sent, and when its response was in
        # (before botocore parses it: a first parse is slow, and not the
        # origin's time). Handlers return None: a value would replace the
        # request's response.
        self._probe_times = [0.0, 0.0]
        events = self._probe_client.meta.events
        events.register("before-send.s3.ListObjectsV2", lambda **_: self._probe_at(0))
        events.register("before-parse.s3.ListObjectsV2", lambda **_: self._probe_at(1))

    def _probe_at(self, i: int) -> None:
        self._probe_times[i] = time.monotonic()

    @property
    def retry_timeout(self) -> float:
        return self._ranged.retry_timeout

    def _translate(self, exc: Exception, what: str) -> StoreError:
        return translate(exc, what, self.bucket, self._endpoint)

    # -- operations -------------------------------------------------------
    def probe(self, prefix: str, *, allow_empty: bool = True) -> Listing | None:
        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            try:
                # A whole first page, not MaxKeys=1: for a model's directory
                # it is the whole first level, which the mount's first lookup
                # then takes instead of listing again (one round trip less
                # before the first byte).
                resp = self._probe_client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/"
                )
                # The mount's one request, on an idle link: a first sample
                # of the origin's distance for the first file's fetch (its
                # first GETs, several at once, cold, looked far from the
                # gateway on this host). A listing is, as a rule, no quicker
                # to answer than a GET: a far origin does not look near by it.
                sent, answered = self._probe_times
                if answered > sent:  # both events came for this attempt
                    self.counters.first_byte(answered - sent)
                break
            except Exception as exc:
                err = self._translate(exc, f"listing s3://{self.bucket}/{prefix}")
                worth_again = isinstance(err, EndpointUnreachable) or type(err) is StoreError
                left = deadline - time.monotonic()
                if not worth_again or left < PROBE_CONNECT_TIMEOUT + PROBE_READ_TIMEOUT + 0.5:
                    raise err from None
                time.sleep(0.5)
        # An HTML page with status 200 parses as an empty listing: a real one
        # always names its bucket and says whether it is truncated.
        if "IsTruncated" not in resp and "Name" not in resp:
            ctype = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("content-type")
            raise not_s3(self._endpoint, f"HTTP 200, {ctype or 'no content type'}")
        if not resp.get("Contents") and not resp.get("CommonPrefixes"):
            if prefix:
                self._refuse_object_source(prefix.rstrip("/"))
            if not allow_empty:
                raise EmptySource(empty_source_message(self.bucket, prefix))
        self.counters.add_list()
        if resp.get("IsTruncated"):
            return None
        return self._add_page(Listing(), resp)

    def _refuse_object_source(self, key: str) -> None:
        """An empty prefix that is the key of an object: the user named a
        file, which would mount as an empty directory."""
        try:
            resp = self._probe_client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        except Exception:
            return  # the first listing worked; this one is only a hint
        if any(o.get("Key") == key for o in resp.get("Contents", ())):
            parent = key.rpartition("/")[0]
            raise SourceIsObject(
                f"s3://{self.bucket}/{key} is an object, not a prefix; mount the "
                f"prefix that holds it (s3://{self.bucket}/{parent})"
            )

    def list_dir(self, prefix: str) -> Listing:
        out = Listing()
        kwargs: dict[str, Any] = dict(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        try:
            while True:
                try:
                    resp = self._client.list_objects_v2(**kwargs)
                except Exception as exc:
                    error = self._translate(exc, f"listing s3://{self.bucket}/{prefix}")
                    self.counters.add_list(label(error))
                    raise error from None
                self.counters.add_list()
                self._add_page(out, resp)
                token = resp.get("NextContinuationToken")
                if not resp.get("IsTruncated") or not token:
                    return out
                kwargs["ContinuationToken"] = token
        except StoreError:
            raise
        except Exception as exc:
            raise self._translate(exc, f"listing s3://{self.bucket}/{prefix}") from None

    def _add_page(self, out: Listing, page: dict[str, Any]) -> Listing:
        """`out` with one Delimiter='/' ListObjectsV2 page added."""
        out.objects.extend(self._info(obj) for obj in page.get("Contents", ()))
        out.prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", ()))
        return out

    def list_tree(self, prefix: str) -> Tree:
        """ListObjectVersions, keeping each key's latest version (a key whose
        latest entry is a delete marker does not exist). A store without
        versions answers it with VersionId "null" (kept as None); one that
        does not implement it, or credentials without s3:ListBucketVersions,
        fall back to ListObjectsV2 without VersionIds (If-Match still pins
        each object's ETag)."""
        what = f"listing s3://{self.bucket}/{prefix}"
        try:
            return self._list_versions(prefix)
        except StoreError as exc:
            if isinstance(exc, EndpointUnreachable | NoSuchBucket):
                raise
            log.info("%s with versions failed (%s); listing without VersionIds", what, exc)
        objects: list[ObjectInfo] = []
        for page in self._pages("list_objects_v2", what, Bucket=self.bucket, Prefix=prefix):
            objects += (self._info(obj) for obj in page.get("Contents", ()))
        return Tree(objects, versioned=False)

    def _list_versions(self, prefix: str) -> Tree:
        objects: list[ObjectInfo] = []
        what = f"listing versions of s3://{self.bucket}/{prefix}"
        for page in self._pages("list_object_versions", what, Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Versions", ()):
                if obj.get("IsLatest"):
                    vid = obj.get("VersionId")
                    objects.append(self._info(obj, None if vid in (None, "", "null") else vid))
        return Tree(objects, versioned=any(o.version.version_id for o in objects))

    def _info(self, obj: dict[str, Any], version_id: str | None = None) -> ObjectInfo:
        return ObjectInfo(
            obj["Key"],
            ObjectVersion(
                etag=_strip_etag(obj.get("ETag")),
                size=int(obj["Size"]),
                mtime_ns=epoch_ns(obj["LastModified"]),
                origin=f"{self.bucket}/{obj['Key']}",
                version_id=version_id,
            ),
        )

    def _pages(self, operation: str, what: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The pages of a listing, each counted as one listing request."""
        try:
            for page in self._client.get_paginator(operation).paginate(**kwargs):
                self.counters.add_list()
                yield page
        except Exception as exc:
            error = self._translate(exc, what)
            self.counters.add_list(label(error))
            raise error from None

    def current(self, key: str) -> ObjectVersion | None:
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            error = self._translate(exc, f"s3://{self.bucket}/{key}")
            if isinstance(error, NoSuchObject):
                return None
            raise error from None
        vid = resp.get("VersionId")
        return ObjectVersion(
            etag=_strip_etag(resp.get("ETag")),
            size=int(resp.get("ContentLength", 0)),
            mtime_ns=epoch_ns(resp["LastModified"]) if resp.get("LastModified") else 0,
            origin=f"{self.bucket}/{key}",
            version_id=None if vid in (None, "", "null") else vid,
        )

    def has_version(self, key: str, version_id: str) -> bool:
        """Whether that version of the key can still be read (a HEAD by
        VersionId: a version removed since answers 404)."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=key, VersionId=version_id)
            return True
        except Exception as exc:
            # A HEAD's 404 has no body to say NoSuchVersion (and some
            # servers send an HTML one): the status is the answer.
            if status_and_code(exc)[0] == 404:
                return False
            raise self._translate(exc, f"s3://{self.bucket}/{key} version {version_id}") from None

    def read_document(self, bucket: str, key: str, limit: int) -> bytes:
        """A small object read whole (a manifest), refused above `limit` bytes."""
        what = f"s3://{bucket}/{key}"
        try:
            resp = self._client.get_object(Bucket=bucket, Key=key)
            if int(resp.get("ContentLength") or 0) > limit:
                resp["Body"].close()
                raise StoreError(f"{what} is larger than {limit} bytes; not a manifest")
            return bytes(resp["Body"].read())
        except StoreError:
            raise
        except Exception as exc:
            raise translate(exc, what, bucket, self._endpoint) from None

    def get_into(
        self,
        key: str,
        version: ObjectVersion,
        start: int,
        bufs: Sequence[memoryview],
        deliver: Deliver | None = None,
    ) -> None:
        """One GET of the buffers' total length from `start`, pinned to
        `version` (s3.ranged: retries, resumes, the --retry-timeout bound,
        the response checks of s3.response)."""
        self._ranged.get(key, version, start, bufs, deliver)
