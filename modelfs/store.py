"""The object-store client: the only module that talks to S3.

It owns its operations, all blocking (callers run them in worker threads):
listing one directory level, listing a whole prefix with each object's
VersionId (for snapshots), asking an object's current version, ranged reads
pinned to one object version, reading a small document (a manifest), and a
start-up access probe. Every botocore/boto3 failure is translated here into a
`modelfs.errors` exception, so no layer above ever sees a ClientError.

`modelfs.testing.memory.MemoryStore` implements the same interface in memory
for unit tests of the layers above.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import (
    AccessDenied,
    BadResponse,
    EmptySource,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchObject,
    ObjectChanged,
    OutOfFileDescriptors,
    RetriesExhausted,
    SourceIsObject,
    StoreError,
)

if TYPE_CHECKING:
    from .config import MountConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectVersion:
    """What pins one version of an object: ETag and size (mtime as fallback).

    Some servers send no ETag (the JuiceFS gateway without --keep-etag). Then
    the identity falls back to (bucket, key, size, LastModified): two objects
    written in the same second must never share cache entries, so the place
    is part of it. Ranged GETs carry If-Unmodified-Since instead of If-Match,
    and every response's total size and Last-Modified are compared with the
    pinned ones; an overwrite with the same size within the same second
    cannot be detected in that mode (docs/semantics.md).
    """

    etag: str | None
    size: int
    mtime_ns: int
    # "bucket/key" of the object this version was listed at; part of the
    # identity only without an ETag (with one, equal ETags and sizes are the
    # same bytes, wherever they live).
    origin: str = ""
    # The S3 VersionId, when the version was listed from a versioned bucket
    # (snapshots): GETs then name it, and read this version even after the
    # key was overwritten or deleted. Not part of the identity: equal ETags
    # and sizes are equal bytes, whatever their version.
    version_id: str | None = None

    def identity(self) -> bytes:
        """16 bytes naming this content version in the chunk cache."""
        where = f"mtime:{self.mtime_ns}\0at:{self.origin}"
        tag = f"etag:{self.etag}" if self.etag else where
        return hashlib.sha256(f"{tag}\0size:{self.size}".encode()).digest()[:16]


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    version: ObjectVersion


@dataclass
class Tree:
    """Every object under a prefix (no delimiter), with VersionIds when the
    bucket keeps versions (`versioned`)."""

    objects: list[ObjectInfo]
    versioned: bool


@dataclass
class Listing:
    """One level of a ListObjectsV2 listing with Delimiter='/'."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)


# Upper bounds (seconds) of the GET latency histogram; +Inf is implied.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class StoreCounters:
    """What was asked of the origin and what it sent; read by stats and metrics.

    Plain integers under a lock, updated once per request: the metrics
    module exports them at scrape time, so the store never imports
    prometheus-client.
    """

    list_requests: int = 0
    get_requests: int = 0
    get_bytes: int = 0
    retries: int = 0
    in_flight: int = 0
    # result ("ok", "stale", "not_found", "denied", "unreachable", "error") -> count
    get_results: dict[str, int] = field(default_factory=dict)
    list_results: dict[str, int] = field(default_factory=dict)  # the same results, for listings
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_get(self, nbytes: int) -> None:
        with self.lock:
            self.get_requests += 1
            self.get_bytes += nbytes

    def add_list(self, result: str = "ok") -> None:
        with self.lock:
            self.list_requests += 1
            self.list_results[result] = self.list_results.get(result, 0) + 1

    def start_get(self) -> None:
        with self.lock:
            self.in_flight += 1

    def end_get(self, result: str, seconds: float, retries: int = 0) -> None:
        i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        with self.lock:
            self.in_flight -= 1
            self.retries += retries
            self.get_results[result] = self.get_results.get(result, 0) + 1
            self.latency_counts[i] += 1
            self.latency_sum += seconds

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "list_requests": self.list_requests,
                "get_requests": self.get_requests,
                "get_bytes": self.get_bytes,
                "retries": self.retries,
                "in_flight": self.in_flight,
                "get_results": dict(self.get_results),
                "list_results": dict(self.list_results),
                "latency_counts": list(self.latency_counts),
                "latency_sum": self.latency_sum,
            }


# Error codes S3-compatible servers use for "try again later".
RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
    }
)
BACKOFF_BASE = 0.1  # seconds; doubles per attempt, full jitter
BACKOFF_CAP = 5.0
# A retry is not started with less than this left of --retry-timeout.
MIN_ATTEMPT = 0.5
# The start-up probe: an endpoint that does not answer fails the mount
# within PROBE_TIMEOUT seconds (docs/semantics.md).
PROBE_TIMEOUT = 10.0
PROBE_CONNECT_TIMEOUT = 3.0
PROBE_READ_TIMEOUT = 4.0


class _Retry(Exception):
    """Internal: a GET failed in a way a later attempt may not."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


def result_of(exc: BaseException | None) -> str:
    """The `result` label of a finished request."""
    if exc is None:
        return "ok"
    for kind, label in (
        (RetriesExhausted, "gave_up"),
        (BadResponse, "bad_response"),
        (OutOfFileDescriptors, "out_of_fds"),
        (ObjectChanged, "stale"),
        (NoSuchObject, "not_found"),
        (AccessDenied, "denied"),
        (EndpointUnreachable, "unreachable"),
    ):
        if isinstance(exc, kind):
            return label
    return "error"


# Called by a GET's thread as soon as buffer i of its range is full.
Deliver = Callable[[int], None]


class ObjectStore(Protocol):
    counters: StoreCounters

    def list_dir(self, prefix: str) -> Listing: ...

    def get_into(
        self,
        key: str,
        version: ObjectVersion,
        start: int,
        bufs: Sequence[memoryview],
        deliver: Deliver | None = None,
    ) -> None:
        """Bytes from `start` on, in one request, into the buffers in order
        (each takes as many bytes as it is long); `deliver(i)`, if given, is
        called in this thread as soon as buffer i is full. Fails with
        ObjectChanged if the object is no longer `version`; on a failure the
        buffers already delivered stay delivered."""
        ...

    def probe(self, prefix: str, *, allow_empty: bool = True) -> None:
        """Fail fast with a precise error if the bucket cannot be listed, or
        (unless `allow_empty`) if nothing is under the prefix."""
        ...

    def list_tree(self, prefix: str) -> Tree:
        """Every object under `prefix`, each with its current version
        (VersionId included where the bucket keeps versions)."""
        ...

    def current(self, key: str) -> ObjectVersion | None:
        """The key's current version (None if it does not exist)."""
        ...


def empty_source_message(bucket: str, prefix: str) -> str:
    return f"no objects under s3://{bucket}/{prefix}"


def _strip_etag(etag: str | None) -> str | None:
    return etag if etag else None


def epoch_ns(when: Any) -> int:
    """A timezone-aware datetime as integer nanoseconds since the epoch
    (exact: no float rounding of the microseconds)."""
    import datetime

    delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    micros: int = delta // datetime.timedelta(microseconds=1)
    return micros * 1000


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def check_response(
    what: str, version: ObjectVersion, start: int, end: int, resp: dict[str, Any]
) -> None:
    """Accept a ranged GET's response only if it is exactly bytes [start, end)
    of the pinned version: status 206 with that Content-Range (or 200 for a
    whole-object range), that length, the pinned total size and, without an
    ETag, the pinned Last-Modified second. A changed object raises
    ObjectChanged (ESTALE); anything else malformed raises BadResponse."""
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    length = resp.get("ContentLength")
    crange = resp.get("ContentRange")
    if status == 206 and crange:
        m = _CONTENT_RANGE.match(str(crange).strip())
        if m is None:
            raise BadResponse(f"{what}: unparsable Content-Range {crange!r}")
        total = m.group(3)
        if total != "*" and int(total) != version.size:
            raise ObjectChanged(
                f"{what}: object changed since it was opened (size {total}, was {version.size})"
            )
        if (int(m.group(1)), int(m.group(2)) + 1) != (start, end):
            raise BadResponse(f"{what}: the endpoint sent {crange!r} instead")
    elif status == 200 and start == 0 and end == version.size:
        pass  # the whole object, which is what was asked for
    elif status == 200:
        raise BadResponse(
            f"{what}: the endpoint ignored the Range header (HTTP 200 with the whole "
            "object); a proxy in between may be stripping it"
        )
    else:
        raise BadResponse(f"{what}: unexpected HTTP {status} without a Content-Range")
    if length is not None and int(length) != end - start:
        if status == 200:
            raise ObjectChanged(
                f"{what}: object changed since it was opened (size {length}, was {version.size})"
            )
        raise BadResponse(f"{what}: {length} bytes announced for a {end - start}-byte range")
    got_etag = resp.get("ETag")
    if version.etag and got_etag and got_etag != version.etag:
        # A server that ignores If-Match hands us another version.
        raise ObjectChanged(f"{what}: object changed since it was opened")
    got_vid = resp.get("VersionId")
    if version.version_id and got_vid and got_vid != version.version_id:
        raise BadResponse(f"{what}: the endpoint sent version {got_vid} instead")
    modified = resp.get("LastModified")
    # HTTP dates carry whole seconds; listings may carry milliseconds.
    if (
        not version.etag
        and modified is not None
        and epoch_ns(modified) // 10**9 != version.mtime_ns // 10**9
    ):
        raise ObjectChanged(f"{what}: object changed since it was opened (Last-Modified)")


def _out_of_fds(what: str) -> OutOfFileDescriptors:
    return OutOfFileDescriptors(
        f"{what}: this process has too many open files (EMFILE); "
        "raise its limit (ulimit -n, LimitNOFILE=)"
    )


def _emfile(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is this process running out of fds."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
            return True
        if "Too many open files" in str(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None)]
    return False


def not_s3(endpoint: str, detail: str) -> BadResponse:
    return BadResponse(
        f"the endpoint {endpoint} did not answer like S3 ({detail}); check --endpoint-url"
    )


def translate_error(exc: Exception, what: str, bucket: str, endpoint: str) -> StoreError:
    """A botocore/boto3 failure as a modelfs StoreError."""
    import botocore.exceptions as bex

    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        msg = err.get("Message") or code
        ctype = str(meta.get("HTTPHeaders", {}).get("content-type", ""))
        if "html" in ctype.lower():
            return not_s3(endpoint, f"HTTP {status}, {ctype}")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectChanged(f"{what}: object changed since it was opened")
        if code == "NoSuchVersion":
            return ObjectChanged(f"{what}: the pinned version no longer exists")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NoSuchObject(f"{what}: no such key")
        if code == "NoSuchBucket":
            return NoSuchBucket(f"bucket {bucket!r} does not exist at {endpoint}")
        if (
            code
            in (
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "InvalidToken",
                "ExpiredToken",
                "403",
            )
            or status == 403
        ):
            return AccessDenied(
                f"access denied to bucket {bucket!r} ({code}: {msg}); check the credentials"
            )
        if code in ("", str(status)) and not err.get("Message"):
            # No S3 error document: something else answered.
            return not_s3(endpoint, f"HTTP {status} without an S3 error")
        return StoreError(f"{what}: {code or status}: {msg}")
    if isinstance(exc, bex.NoCredentialsError):
        return AccessDenied(
            "no AWS credentials found (environment, shared config/profile or web identity)"
        )
    if isinstance(exc, bex.PartialCredentialsError | bex.ProfileNotFound):
        return AccessDenied(f"bad AWS credentials configuration: {exc}")
    if isinstance(
        exc, bex.EndpointConnectionError | bex.ConnectTimeoutError | bex.ConnectionClosedError
    ):
        return EndpointUnreachable(f"cannot reach {endpoint}: {exc}")
    if isinstance(exc, bex.ReadTimeoutError):
        return EndpointUnreachable(f"{endpoint} did not answer in time: {exc}")
    if isinstance(exc, bex.ResponseParserError):
        return not_s3(endpoint, "its answer is not S3's XML")
    if isinstance(exc, bex.BotoCoreError):
        return StoreError(f"{what}: {exc}")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}")


def boto3_session(cfg: MountConfig, profile: str | None = None) -> Any:
    """The boto3 session for these options: credentials come from boto3's
    chain (environment, shared files, web identity, instance metadata);
    --credentials-file only replaces which shared-credentials file it reads.
    `profile` overrides --profile (the shared tier's own)."""
    import boto3
    import botocore.session

    profile = profile or cfg.profile
    try:
        core = botocore.session.Session()
        if cfg.credentials_file is not None:
            core.set_config_variable("credentials_file", str(cfg.credentials_file))
        return boto3.Session(botocore_session=core, profile_name=profile, region_name=cfg.region)
    except Exception as exc:  # ProfileNotFound and friends
        raise AccessDenied(f"cannot load AWS profile {profile!r}: {exc}") from exc


def make_client(
    session: Any,
    endpoint_url: str | None,
    cfg: MountConfig,
    pool: int,
    connect_timeout: float,
    read_timeout: float,
    retries: dict[str, Any],
    *,
    unsigned: bool = False,
) -> Any:
    import botocore
    import botocore.config

    # --no-sign-request: anonymous requests, for public buckets; no
    # credentials are looked for.
    signing = {"signature_version": botocore.UNSIGNED} if unsigned else {}
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        config=botocore.config.Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries=retries,
            max_pool_connections=pool,
            s3={"addressing_style": cfg.addressing_style},
            tcp_keepalive=True,
            **checksum_settings(session, endpoint_url),
            **signing,
        ),
    )


def checksum_settings(session: Any, endpoint_url: str | None) -> dict[str, str]:
    """boto3 >= 1.36 adds CRC checksum headers to every PUT and asks for
    checksums on GETs; several S3-compatible stores reject or mishandle them
    (the shared tier PUTs chunks). Against a custom endpoint modelfs sends
    them only when an operation requires it, unless the user chose
    otherwise (AWS_REQUEST_CHECKSUM_CALCULATION,
    AWS_RESPONSE_CHECKSUM_VALIDATION, or the same keys in the AWS config)."""
    if endpoint_url is None:
        return {}
    try:
        profile = session._session.get_scoped_config()
    except Exception:  # a profile that does not exist fails later, clearly
        profile = {}
    out = {}
    for key, env in (
        ("request_checksum_calculation", "AWS_REQUEST_CHECKSUM_CALCULATION"),
        ("response_checksum_validation", "AWS_RESPONSE_CHECKSUM_VALIDATION"),
    ):
        if env not in os.environ and key not in profile:
            out[key] = "when_required"
    return out


class S3Store:
    """boto3-backed store. One client, shared by all worker threads."""

    def __init__(self, cfg: MountConfig, *, pool_size: int | None = None) -> None:
        self.bucket = cfg.source.bucket
        self.counters = StoreCounters()
        self._endpoint = cfg.endpoint_url or "the default AWS endpoint"
        session = boto3_session(cfg)
        pool = pool_size or cfg.fetch_concurrency + 4

        def client(connect: float, read: float, retries: dict[str, Any]) -> Any:
            return make_client(
                session,
                cfg.endpoint_url,
                cfg,
                pool,
                connect,
                read,
                retries,
                unsigned=cfg.no_sign_request,
            )

        self._client = client(
            cfg.connect_timeout, cfg.read_timeout, {"mode": "standard", "max_attempts": 5}
        )

        # Ranged GETs retry in `get_into` itself: it resumes from the last
        # byte received and bounds the total time, which botocore's retries
        # (whole request again, attempts rather than time) cannot do.
        def new_get_client(connect: float, read: float) -> Any:
            return client(connect, read, {"total_max_attempts": 1})

        self._new_get_client = new_get_client
        self._timeouts = (cfg.connect_timeout, cfg.read_timeout)
        self._get_clients = {self._timeouts: self._new_get_client(*self._timeouts)}
        self._clients_lock = threading.Lock()
        self.retry_timeout = cfg.retry_timeout
        # The start-up probe must answer "unreachable" within PROBE_TIMEOUT:
        # short timeouts, one attempt, retried by `probe` while time is left.
        self._probe_client = client(
            PROBE_CONNECT_TIMEOUT, PROBE_READ_TIMEOUT, {"total_max_attempts": 1}
        )

    def _get_client_for(self, remaining: float) -> Any:
        """A GET client whose stalls (connect + read timeout) fit in the
        `remaining` seconds of --retry-timeout, so the bound is real: the
        configured timeouts while they fit, else halving steps (a few more
        clients, made once each, used only near the deadline)."""
        connect, read = self._timeouts
        if connect + read > remaining:
            step = 2.0 ** math.floor(math.log2(max(remaining / 2, MIN_ATTEMPT / 2)))
            connect, read = min(connect, step), min(read, step)
        with self._clients_lock:
            got = self._get_clients.get((connect, read))
            if got is None:
                got = self._get_clients[(connect, read)] = self._new_get_client(connect, read)
            return got

    def _translate(self, exc: Exception, what: str) -> StoreError:
        return translate_error(exc, what, self.bucket, self._endpoint)

    # -- operations -------------------------------------------------------
    def probe(self, prefix: str, *, allow_empty: bool = True) -> None:
        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            try:
                resp = self._probe_client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/", MaxKeys=1
                )
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
                    self.counters.add_list(result_of(error))
                    raise error from None
                self.counters.add_list()
                out.objects.extend(self._info(obj) for obj in resp.get("Contents", ()))
                out.prefixes.extend(p["Prefix"] for p in resp.get("CommonPrefixes", ()))
                token = resp.get("NextContinuationToken")
                if not resp.get("IsTruncated") or not token:
                    return out
                kwargs["ContinuationToken"] = token
        except StoreError:
            raise
        except Exception as exc:
            raise self._translate(exc, f"listing s3://{self.bucket}/{prefix}") from None

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
            self.counters.add_list(result_of(error))
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
            raise translate_error(exc, what, bucket, self._endpoint) from None

    def get_into(
        self,
        key: str,
        version: ObjectVersion,
        start: int,
        bufs: Sequence[memoryview],
        deliver: Deliver | None = None,
    ) -> None:
        """One GET of the buffers' total length from `start`, retried with
        backoff and resumed from the last byte received until
        `retry_timeout` runs out (a retry resumes inside the same buffer).

        The body is received straight into the caller's buffers (`recv_into`,
        see `_receive`): no per-piece objects, no joining copy."""
        self._get(key, version, _Sink(start, bufs, deliver))

    def _get(self, key: str, version: ObjectVersion, sink: _Sink) -> None:
        start, end = sink.start, sink.end
        what = f"s3://{self.bucket}/{key} bytes {start}-{end - 1}"
        t0 = time.monotonic()
        deadline = t0 + self.retry_timeout
        self.counters.start_get()
        attempts = 0
        error: StoreError | None = None
        try:
            while True:
                attempts += 1
                try:
                    client = self._get_client_for(deadline - time.monotonic())
                    # Fills the sink to the end of the range, or raises.
                    self._get_once(client, key, version, sink)
                    return
                except _Retry as retry:
                    pause = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempts - 1)))
                    if time.monotonic() + pause + MIN_ATTEMPT > deadline:
                        raise RetriesExhausted(
                            f"{what}: gave up after {attempts} attempts in "
                            f"{time.monotonic() - t0:.1f} s; last error: {retry.error}"
                        ) from None
                    log.debug("GET %s: %s; retrying in %.2f s", what, retry.error, pause)
                    time.sleep(pause)
        except StoreError as exc:
            error = exc
            raise
        finally:
            elapsed = time.monotonic() - t0
            self.counters.end_get(result_of(error), elapsed, attempts - 1)
            log.debug(
                "GET %s bytes=%d-%d etag=%s: %s in %.1f ms%s",
                key,
                start,
                end - 1,
                version.etag or "-",
                result_of(error),
                elapsed * 1000,
                f" after {attempts - 1} retries" if attempts > 1 else "",
            )

    def _get_once(self, client: Any, key: str, version: ObjectVersion, sink: _Sink) -> None:
        """One GET of the part of the sink's range not yet received, into
        the sink as bytes arrive, so a failure mid-body keeps what was
        received. Raises _Retry for what a retry may cure, a StoreError for
        what it cannot."""
        import http.client

        import botocore.exceptions as bex
        import urllib3.exceptions

        start, end = sink.start + sink.received, sink.end
        what = f"s3://{self.bucket}/{key} bytes {start}-{end - 1}"
        kwargs: dict[str, Any] = dict(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        if version.version_id:
            kwargs["VersionId"] = version.version_id
        if version.etag:
            kwargs["IfMatch"] = version.etag
        else:
            import datetime

            # HTTP dates have whole seconds; rounding up keeps a server that
            # compares sub-second mtimes from refusing an unchanged object.
            kwargs["IfUnmodifiedSince"] = datetime.datetime.fromtimestamp(
                -(-version.mtime_ns // 10**9), tz=datetime.UTC
            )
        before = sink.received
        try:
            resp = client.get_object(**kwargs)
            body = resp["Body"]
            try:
                check_response(what, version, start, end, resp)
            except StoreError:
                # Never read a body that is not the range asked for: closing
                # drops the connection instead of draining a whole object.
                body.close()
                raise
            _receive(body, sink)
        except StoreError:
            raise
        except bex.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if status == 416 or code == "InvalidRange":
                # The range lies inside the pinned size: the object shrank.
                raise ObjectChanged(
                    f"{what}: object changed since it was opened (shrank)"
                ) from None
            if status >= 500 or status == 429 or code in RETRYABLE_CODES:
                raise _Retry(StoreError(f"{code or status}")) from None
            raise self._translate(exc, what) from None
        except (
            bex.EndpointConnectionError,
            bex.ConnectTimeoutError,
            bex.ReadTimeoutError,
            bex.ConnectionClosedError,
            bex.ResponseStreamingError,
            bex.IncompleteReadError,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
        ) as exc:
            if _emfile(exc):
                raise _out_of_fds(what) from None
            raise _Retry(StoreError(f"{type(exc).__name__}: {exc}")) from None
        except Exception as exc:
            if _emfile(exc):
                raise _out_of_fds(what) from None
            raise self._translate(exc, what) from None
        finally:
            self.counters.add_get(sink.received - before)
        if sink.received < sink.end - sink.start:
            raise _Retry(
                StoreError(f"body ended after {sink.received - before} of {end - start} bytes")
            )


class _Sink:
    """Where a GET's body goes: the range from `start` across the buffers,
    filled in order across attempts; each full one is handed to `deliver`
    (if any) at once."""

    def __init__(self, start: int, bufs: Sequence[memoryview], deliver: Deliver | None) -> None:
        self.bufs, self.deliver = bufs, deliver
        self.start, self.end = start, start + sum(len(b) for b in bufs)
        self.received = 0
        self._i = 0  # the buffer being filled
        self._off = 0  # bytes of it filled

    def space(self) -> memoryview:
        """The unfilled part of the current buffer (empty when all is in)."""
        while self._i < len(self.bufs) and self._off == len(self.bufs[self._i]):
            self._i, self._off = self._i + 1, 0  # an empty buffer
        if self._i == len(self.bufs):
            return memoryview(b"")
        return self.bufs[self._i][self._off :]

    def filled(self, n: int) -> None:
        self.received += n
        self._off += n
        if self._off == len(self.bufs[self._i]):
            if self.deliver is not None:
                self.deliver(self._i)
            self._i, self._off = self._i + 1, 0


def _receive(body: Any, sink: _Sink) -> None:
    """Receive a response body into the sink.

    botocore's body wraps a urllib3 response whose `readinto` is `read()`
    plus a copy; the http.client response under it has a real `recv_into`.
    Reading that one fills the buffers with no object per piece, and once
    the body is read to its Content-Length the connection is handed back to
    the pool. Anything unexpected (another HTTP stack) falls back to
    `read()` pieces, copied in."""
    import http.client

    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if raw is not None and isinstance(fp, http.client.HTTPResponse):
        try:
            while space := sink.space():
                got = fp.readinto(space)
                if not got:
                    break
                sink.filled(got)
        except BaseException:
            raw.close()  # a half-read connection must not be reused
            raise
        if not sink.space() and fp.isclosed():
            raw.release_conn()
        else:
            raw.close()
        return
    while space := sink.space():
        piece = body.read(min(1 << 20, len(space)))
        if not piece:
            break
        space[: len(piece)] = piece
        sink.filled(len(piece))
