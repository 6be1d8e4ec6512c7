"""The object-store interface the layers above S3 depend on.

Owns what a store is to the rest of modelfs: object versions and how they
are named in the cache (`ObjectVersion.identity`), listings, the
`ObjectStore` protocol, and the counters every store keeps. The S3
implementation is `modelfs.s3.origin.S3Store`; an in-memory one for unit
tests is `modelfs.testing.memory.MemoryStore`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .stats import LATENCY_BUCKETS, StoreStats

# The largest object modelfs serves: 1 PiB, twenty times S3's own limit
# (50 TB). A size above it (from a manifest or a hostile listing) is input
# that would overflow the kernel's file size (2^63) or make per-chunk work
# without bound; such an object is refused, never served.
MAX_OBJECT_SIZE = 1 << 50
# How long a GET's time to its response's headers counts toward the origin's
# distance (`first_byte_floor`, the least of them). A near origin can look far
# (a mount's first GETs on new connections, the cores busy, a capped link
# queueing the fetch's own GETs: 16-42 ms from the gateway here, against
# 3.4-6 ms quiet) but a far one never looks near, so the least over minutes
# is the distance; an origin that moved (a failover) is seen as it is within
# the window. The last 32 GETs (1 GiB at 32 MiB each) were all slow behind a
# 2 Gbit/s cap or on two busy cores.
FIRST_BYTE_WINDOW = 300.0
FIRST_BYTE_SAMPLES = 1024  # kept at most, the newest


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
    # (when, seconds from sending a GET to its response's headers), newest last.
    first_bytes: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=FIRST_BYTE_SAMPLES), repr=False
    )
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

    def first_byte(self, seconds: float, now: float | None = None) -> None:
        """A GET's response headers came `seconds` after it was sent."""
        with self.lock:
            self.first_bytes.append((time.monotonic() if now is None else now, seconds))

    def first_byte_floor(self, now: float | None = None) -> float | None:
        """The least time to first byte of the GETs of the last
        FIRST_BYTE_WINDOW seconds (None without any): how far the origin
        is, less any queueing on either side."""
        since = (time.monotonic() if now is None else now) - FIRST_BYTE_WINDOW
        with self.lock:
            while self.first_bytes and self.first_bytes[0][0] < since:
                self.first_bytes.popleft()
            return min(s for _, s in self.first_bytes) if self.first_bytes else None

    def snapshot(self) -> StoreStats:
        floor = self.first_byte_floor()
        with self.lock:
            return StoreStats(
                list_requests=self.list_requests,
                get_requests=self.get_requests,
                get_bytes=self.get_bytes,
                retries=self.retries,
                in_flight=self.in_flight,
                get_results=dict(self.get_results),
                list_results=dict(self.list_results),
                latency_counts=list(self.latency_counts),
                latency_sum=self.latency_sum,
                first_byte_floor=floor,
            )


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

    def probe(self, prefix: str, *, allow_empty: bool = True) -> Listing | None:
        """Fail fast with a precise error if the bucket cannot be listed, or
        (unless `allow_empty`) if nothing is under the prefix. Returns the
        prefix's first level (a Delimiter='/' listing) when the probe's one
        request held all of it, so the mount's first lookup need not list
        again; None otherwise."""
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


def epoch_ns(when: Any) -> int:
    """A timezone-aware datetime as integer nanoseconds since the epoch
    (exact: no float rounding of the microseconds)."""
    import datetime

    delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    micros: int = delta // datetime.timedelta(microseconds=1)
    return micros * 1000
