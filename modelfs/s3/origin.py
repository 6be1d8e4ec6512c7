"""The origin store through boto3: the `ObjectStore` a mount, a pull and
`modelfs snapshot` read the bucket with.

Owns listing (one level, or a whole prefix with VersionIds), HEAD of the
current version, ranged GETs pinned to one version and received straight
into the caller's buffers, retries bounded by --retry-timeout, the checks
every response passes before a byte of it is used, and the start-up probe.
Errors are sorted by `modelfs.s3.errors`.
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import (
    BadResponse,
    EmptySource,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchObject,
    ObjectChanged,
    RetriesExhausted,
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
from .errors import classify, label, not_s3, status_and_code, translate
from .settings import S3Settings

log = logging.getLogger(__name__)

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


def _strip_etag(etag: str | None) -> str | None:
    return etag if etag else None


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
    _check_length(what, version, status, end - start, resp)
    got_etag = resp.get("ETag")
    if version.etag and got_etag and got_etag != version.etag:
        # A server that ignores If-Match hands us another version.
        raise ObjectChanged(f"{what}: object changed since it was opened")
    got_vid = resp.get("VersionId")
    if version.version_id and got_vid and got_vid != version.version_id:
        raise BadResponse(f"{what}: the endpoint sent version {got_vid} instead")
    if not got_etag:
        _check_modified(what, version, resp.get("LastModified"))


def _check_length(
    what: str, version: ObjectVersion, status: Any, want: int, resp: dict[str, Any]
) -> None:
    """The body's announced length is the range's: never a chunked body
    (every S3 GET names its length; a proxy or server compressing on the
    fly does not) or a compressed one."""
    length = resp.get("ContentLength")
    encoding = resp.get("ContentEncoding")
    compressed = bool(encoding) and str(encoding).lower() != "identity"
    if length is None:
        raise BadResponse(
            f"{what}: no Content-Length"
            + (f" (Content-Encoding {encoding}: the endpoint compressed it)" if compressed else "")
        )
    if int(length) == want:
        return  # a stored Content-Encoding (object metadata) with the stored bytes is fine
    if compressed:
        raise BadResponse(
            f"{what}: {length} bytes with Content-Encoding {encoding} for a "
            f"{want}-byte range: the endpoint compressed the body"
        )
    if status == 200:
        raise ObjectChanged(
            f"{what}: object changed since it was opened (size {length}, was {version.size})"
        )
    raise BadResponse(f"{what}: {length} bytes announced for a {want}-byte range")


def _check_modified(what: str, version: ObjectVersion, modified: Any) -> None:
    """A response without an ETag is tied to the pinned version by its
    Last-Modified (and, checked before, the total size in Content-Range): a
    server that ignores If-Match and sends no ETag on GETs must not mix two
    versions in one handle. Without either it cannot be tied: refused."""
    if modified is None:
        raise BadResponse(
            f"{what}: the endpoint sent neither an ETag nor a Last-Modified; "
            "cannot tell which version of the object this is"
        )
    # HTTP dates carry whole seconds; listings may carry milliseconds.
    if epoch_ns(modified) // 10**9 != version.mtime_ns // 10**9:
        raise ObjectChanged(f"{what}: object changed since it was opened (Last-Modified)")


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

        # Ranged GETs retry in `get_into` itself: it resumes from the last
        # byte received and bounds the total time, which botocore's retries
        # (whole request again, attempts rather than time) cannot do.
        def new_get_client(connect: float, read: float) -> Any:
            return client(connect, read, {"total_max_attempts": 1})

        self._new_get_client = new_get_client
        self._timeouts = (settings.connect_timeout, settings.read_timeout)
        self._get_clients = {self._timeouts: self._new_get_client(*self._timeouts)}
        self._clients_lock = threading.Lock()
        self.retry_timeout = settings.retry_timeout
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
        return translate(exc, what, self.bucket, self._endpoint)

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
                    self.counters.add_list(label(error))
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
        deadline = sink.deadline = t0 + self.retry_timeout
        sink.what = what
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
            self.counters.end_get(label(error), elapsed, attempts - 1)
            log.debug(
                "GET %s bytes=%d-%d etag=%s: %s in %.1f ms%s",
                key,
                start,
                end - 1,
                version.etag or "-",
                label(error),
                elapsed * 1000,
                f" after {attempts - 1} retries" if attempts > 1 else "",
            )

    def _get_once(self, client: Any, key: str, version: ObjectVersion, sink: _Sink) -> None:
        """One GET of the part of the sink's range not yet received, into
        the sink as bytes arrive, so a failure mid-body keeps what was
        received. Raises _Retry for what a retry may cure, a StoreError for
        what it cannot."""
        start, end = sink.start + sink.received, sink.end
        what = f"s3://{self.bucket}/{key} bytes {start}-{end - 1}"
        before = sink.received
        try:
            resp = client.get_object(**self._get_args(key, version, start, end))
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
        except Exception as exc:
            got = classify(exc, what, self.bucket, self._endpoint)
            raise (_Retry(got.error) if got.retryable else got.error) from None
        finally:
            self.counters.add_get(sink.received - before)
        if sink.received < sink.end - sink.start:
            raise _Retry(
                StoreError(f"body ended after {sink.received - before} of {end - start} bytes")
            )

    def _get_args(self, key: str, version: ObjectVersion, start: int, end: int) -> dict[str, Any]:
        """GetObject's arguments for bytes [start, end) of exactly `version`."""
        args: dict[str, Any] = dict(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        if version.version_id:
            args["VersionId"] = version.version_id
        if version.etag:
            args["IfMatch"] = version.etag
        else:
            # HTTP dates have whole seconds; rounding up keeps a server that
            # compares sub-second mtimes from refusing an unchanged object.
            args["IfUnmodifiedSince"] = datetime.datetime.fromtimestamp(
                -(-version.mtime_ns // 10**9), tz=datetime.UTC
            )
        return args


class _Sink:
    """Where a GET's body goes: the range from `start` across the buffers,
    filled in order across attempts; each full one is handed to `deliver`
    (if any) at once."""

    def __init__(self, start: int, bufs: Sequence[memoryview], deliver: Deliver | None) -> None:
        self.bufs, self.deliver = bufs, deliver
        self.start, self.end = start, start + sum(len(b) for b in bufs)
        self.received = 0
        # --retry-timeout holds for the whole body, not per recv: a body
        # that trickles in a byte at a time never trips the read timeout.
        self.deadline = math.inf
        self.what = "GET"
        self._i = 0  # the buffer being filled
        self._off = 0  # bytes of it filled

    def space(self) -> memoryview:
        """The unfilled part of the current buffer (empty when all is in)."""
        while self._i < len(self.bufs) and self._off == len(self.bufs[self._i]):
            self._i, self._off = self._i + 1, 0  # an empty buffer
        if self._i == len(self.bufs):
            return memoryview(b"")
        return self.bufs[self._i][self._off :]

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise RetriesExhausted(
                f"{self.what}: the body was still arriving when --retry-timeout ran out "
                f"({self.received} of {self.end - self.start} bytes received)"
            )

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
    import io

    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (
        raw is not None
        and isinstance(fp, http.client.HTTPResponse)
        and not fp.chunked
        and fp.length is not None
        and isinstance(fp.fp, io.BufferedReader)
    ):
        try:
            while (space := sink.space()) and fp.length:
                # One recv at most per call (readinto1): a readinto of the
                # whole buffer loops inside C until it is full, so a body
                # that trickles in would never reach the deadline check.
                got = fp.fp.readinto1(space[: fp.length])
                if not got:
                    break
                fp.length -= got
                sink.filled(got)
                sink.check_deadline()
            if not fp.length:
                fp.read()  # the body is read to its length: hand the connection back
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
        sink.check_deadline()
