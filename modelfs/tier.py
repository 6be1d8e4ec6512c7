"""The shared cache tier: chunks kept on an S3-compatible bucket that many
nodes read before they go to the origin (``--shared-cache s3://B/P``).

Owns the tier's object layout, its checksummed object format, the herd
control (leases) and the bounded background uploads. The chunk cache asks
it for a chunk after a local miss and hands it what it fetched from the
origin; nothing here can make a read fail: every tier failure is counted
and answered with "not here", so the caller goes to the origin.

Layout under PREFIX, all derived from the origin's identity:

  PREFIX/<sha256(bucket/key)[:32]>/<sha256(etag, size)[:32]>-<chunk size>/<n>
  ... /<n>.lease      while one node fetches chunk n from the origin

A tier object is a 48-byte header (magic, format, chunk length, xxh3-64 of
the chunk, the first 24 bytes of the sha256 of its own key) and the chunk.
A reader checks all of it, so a corrupt, truncated or misplaced object is
never served; it is deleted, so the next node puts a good one there.

Herd control: a node that misses the tier PUTs ``<n>.lease`` with
``If-None-Match: *`` (a body holding an expiry time). The one that creates
it looks at the tier once more, then fetches from the origin, and its upload
(queued ahead of other uploads) deletes the lease when done. The others
poll the tier for the chunk with growing pauses until the lease expires or
disappears; then they try to take it themselves, or fetch from the origin
after ``lease`` seconds. Stores that ignore If-None-Match (found by a probe
on first use: two creates of one key that both succeed) get no herd
control: every node that misses fetches from the origin and uploads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio
import xxhash

from .config import DEFAULT_SHARED_CACHE_LEASE
from .errors import StoreError
from .s3.errors import label
from .stats import TierStats

if TYPE_CHECKING:
    from .store import ObjectVersion

log = logging.getLogger(__name__)

MAGIC = b"MFSC"
TIER_FORMAT = 1
_HEADER = struct.Struct(">4sHHQQ24s")  # magic, format, reserved, length, xxh3, key digest
HEADER_SIZE = _HEADER.size
POLL_FIRST, POLL_MAX = 0.02, 0.25
DOWN_FIRST, DOWN_MAX = 1.0, 30.0  # seconds the tier is skipped after a failure
UPLOAD_WORKERS = 4


class TierError(StoreError):
    """The tier failed; never fatal, the caller goes to the origin."""


class TierStore(Protocol):
    """Blocking object operations on the tier bucket."""

    def get(self, key: str) -> bytes | None:
        """The object, or None if there is none."""
        ...

    def put(self, key: str, body: bytes, *, exclusive: bool = False) -> bool:
        """Store `body`; with `exclusive` only if the key does not exist
        (If-None-Match: *), returning False when it does."""
        ...

    def delete(self, key: str) -> None: ...


def frame(tier_key: str, data: bytes | bytearray, digest: int) -> bytes:
    return _HEADER.pack(MAGIC, TIER_FORMAT, 0, len(data), digest, _key_digest(tier_key)) + data


def unframe(tier_key: str, body: bytes, length: int) -> bytes | None:
    """The chunk inside a tier object, or None if anything about it is wrong."""
    if len(body) != HEADER_SIZE + length:
        return None
    magic, fmt, _, n, digest, kd = _HEADER.unpack_from(body)
    data = body[HEADER_SIZE:]
    if (magic, fmt, n, kd) != (MAGIC, TIER_FORMAT, length, _key_digest(tier_key)):
        return None
    return data if xxhash.xxh3_64_intdigest(data) == digest else None


def _key_digest(tier_key: str) -> bytes:
    return hashlib.sha256(tier_key.encode()).digest()[:24]


@dataclass
class TierCounters:
    hits: int = 0
    hit_bytes: int = 0
    misses: int = 0
    corrupt: int = 0
    uploads: int = 0
    upload_bytes: int = 0
    uploads_dropped: int = 0  # the upload queue was full
    upload_failures: int = 0
    leases_won: int = 0
    lease_waits: int = 0  # another node held the lease: waited for its upload
    lease_wait_hits: int = 0  # ... and the chunk arrived in the tier
    lease_timeouts: int = 0  # ... and it did not: fetched from the origin anyway
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The counters, for `SharedTier.snapshot`."""
        with self.lock:
            out = {k: v for k, v in self.__dict__.items() if k not in ("lock", "errors")}
            out["errors"] = dict(self.errors)
            return out


@dataclass
class _Upload:
    key: str
    body: bytes
    lease: str | None  # the lease key to delete once stored


class SharedTier:
    """The tier as the chunk cache sees it. Blocking calls run in threads."""

    def __init__(
        self,
        store: TierStore,
        prefix: str,
        origin_bucket: str,
        *,
        lease: float = DEFAULT_SHARED_CACHE_LEASE,
        upload_queue_bytes: int = 128 << 20,
    ) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.origin_bucket = origin_bucket
        self.lease_seconds = lease
        self.counters = TierCounters()
        self.conditional: bool | None = None  # If-None-Match honoured? None: not probed yet
        self._probe_lock = trio.Lock()
        self._node = f"{socket.gethostname()}:{os.getpid()}"
        self._down_until = 0.0
        self._down_for = 0.0
        self._queue: list[_Upload] = []
        self._queued_bytes = 0
        self._queue_limit = upload_queue_bytes
        self._drop_warned = False  # the first dropped upload is logged
        self._workers = trio.lowlevel.ParkingLot()
        self._active = 0  # uploads being sent
        self._limiter = trio.CapacityLimiter(UPLOAD_WORKERS + 16)

    # -- keys ------------------------------------------------------------
    def chunk_key(self, key: str, version: ObjectVersion, chunk_size: int, n: int) -> str:
        origin = hashlib.sha256(f"{self.origin_bucket}/{key}".encode()).hexdigest()[:32]
        ident = version.identity().hex()
        base = f"{origin}/{ident}-{chunk_size}/{n}"
        return f"{self.prefix}/{base}" if self.prefix else base

    # -- health ----------------------------------------------------------
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException, what: str) -> None:
        kind = label(exc)
        self.counters.error(kind)
        first = self._down_for == 0
        self._down_for = min(DOWN_MAX, self._down_for * 2 or DOWN_FIRST)
        self._down_until = time.monotonic() + self._down_for
        if first:  # once per outage
            log.warning(
                "shared cache: %s failed (%s); reading from the origin, trying it again in %.1f s",
                what,
                exc,
                self._down_for,
            )
        else:
            log.debug("shared cache: %s failed again (%s)", what, exc)

    def _ok(self) -> None:
        if self._down_for:
            log.info("shared cache answers again")
        self._down_for = 0.0

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking tier call; TierError on any failure (counted)."""
        try:
            result = await trio.to_thread.run_sync(
                lambda: fn(*args, **kwargs), limiter=self._limiter, abandon_on_cancel=True
            )
        except Exception as exc:
            self._failed(exc, what)
            raise TierError(str(exc)) from None
        self._ok()
        return result

    # -- reads -----------------------------------------------------------
    async def read(self, tier_key: str, length: int) -> bytes | None:
        """The chunk from the tier if it is there and intact."""
        if not self.available():
            return None
        try:
            body = await self._call(f"GET {tier_key}", self.store.get, tier_key)
        except TierError:
            return None
        if body is None:
            return None
        data = unframe(tier_key, body, length)
        if data is None:
            self.counters.corrupt += 1
            log.warning("shared cache object %s is corrupt; deleting it", tier_key)
            try:
                await self._call(f"DELETE {tier_key}", self.store.delete, tier_key)
            except TierError:
                pass
            return None
        self.counters.hits += 1
        self.counters.hit_bytes += len(data)
        return data

    async def claim(self, tier_key: str, length: int) -> tuple[bytes | None, str | None]:
        """After a tier miss: (chunk, None) if it arrived from another node,
        (None, lease key) if this node should fetch it from the origin under
        a lease, (None, None) to fetch it without one."""
        self.counters.misses += 1
        if not self.available():
            return None, None
        try:
            if not await self._herd_control():
                return None, None
            return await self._claim_under_lease(tier_key, length)
        except TierError:
            return None, None

    async def _herd_control(self) -> bool:
        """Whether the tier honours If-None-Match (probed once, however many
        chunks miss at once)."""
        if self.conditional is None:
            async with self._probe_lock:
                if self.conditional is None:
                    await self._probe()
        return bool(self.conditional)

    async def _claim_under_lease(
        self, tier_key: str, length: int
    ) -> tuple[bytes | None, str | None]:
        lease_key = tier_key + ".lease"
        deadline = trio.current_time() + self.lease_seconds
        pause = POLL_FIRST
        waited = False
        while True:
            if await self._take_lease(lease_key):
                self.counters.leases_won += 1
                # Someone may have uploaded it since our miss.
                data = await self.read(tier_key, length)
                if data is not None:
                    await self._drop_lease(lease_key)
                    return data, None
                return None, lease_key
            if not waited:
                waited = True
                self.counters.lease_waits += 1
            data, gone, pause = await self._wait_for_holder(
                tier_key, lease_key, length, deadline, pause
            )
            if data is not None:
                self.counters.lease_wait_hits += 1
                return data, None
            if not gone:
                self.counters.lease_timeouts += 1
                return None, None
            # Its holder gave up or expired: try to take the lease.

    async def _wait_for_holder(
        self, tier_key: str, lease_key: str, length: int, deadline: float, pause: float
    ) -> tuple[bytes | None, bool, float]:
        """Poll, with growing pauses, for another node's upload of the
        chunk: (chunk, _, pause) if it arrived; (None, True, pause) if its
        lease went first; (None, False, pause) at the deadline."""
        while trio.current_time() < deadline:
            await trio.sleep(pause)
            pause = min(POLL_MAX, pause * 2)
            data = await self.read(tier_key, length)
            if data is not None:
                return data, False, pause
            if await self._lease_gone(lease_key):
                return None, True, pause
        return None, False, pause

    async def _take_lease(self, lease_key: str) -> bool:
        body = json.dumps({"node": self._node, "expires": time.time() + self.lease_seconds})
        created: bool = await self._call(
            f"PUT {lease_key}", self.store.put, lease_key, body.encode(), exclusive=True
        )
        return created

    async def _lease_gone(self, lease_key: str) -> bool:
        """Whether the lease no longer stops us: absent, or expired (then it
        is deleted, the holder having died or stalled)."""
        raw = await self._call(f"GET {lease_key}", self.store.get, lease_key)
        if raw is None:
            return True
        try:
            expires = float(json.loads(raw)["expires"])
        except (ValueError, KeyError, TypeError):
            expires = 0.0
        if expires > time.time():
            return False
        await self._drop_lease(lease_key)
        return True

    async def _drop_lease(self, lease_key: str) -> None:
        try:
            await self._call(f"DELETE {lease_key}", self.store.delete, lease_key)
        except TierError:
            pass  # it expires anyway

    async def _probe(self) -> None:
        key = f"{self.prefix}/.modelfs-probe/{uuid.uuid4().hex}".lstrip("/")
        first = await self._call(
            "the conditional-write probe", self.store.put, key, b"1", exclusive=True
        )
        second = await self._call(
            "the conditional-write probe", self.store.put, key, b"2", exclusive=True
        )
        await self._call("the conditional-write probe", self.store.delete, key)
        self.conditional = bool(first and not second)
        if not self.conditional:
            log.info(
                "shared cache: the store ignores If-None-Match; no herd control "
                "(every node that misses a chunk fetches it from the origin)"
            )

    # -- uploads ---------------------------------------------------------
    def upload(
        self, tier_key: str, data: bytes | bytearray, digest: int, lease_key: str | None
    ) -> None:
        """Queue a chunk for the tier; never blocks. A full queue drops it
        (and its lease, so waiting nodes stop waiting)."""
        if not self.available() or self._queued_bytes + len(data) > self._queue_limit:
            # The policy: the tier is best effort. A node that fetches
            # faster than it can upload drops what does not fit (its lease
            # goes back, so waiting nodes fetch at once rather than wait out
            # the lease); other nodes fetch those chunks from the origin.
            # RAM stays bounded; the first drop of a mount says so.
            self.counters.uploads_dropped += 1
            if self.available() and not self._drop_warned:
                self._drop_warned = True
                log.warning(
                    "shared cache: the upload queue is full (%d MiB); chunks this node "
                    "fetches faster than it uploads are not shared (counted as dropped "
                    "uploads in 'modelfs stats'); other nodes fetch them from the origin",
                    self._queue_limit >> 20,
                )
            if lease_key is not None:
                self.abandon(lease_key)
            return
        item = _Upload(tier_key, frame(tier_key, data, digest), lease_key)
        # Chunks other nodes are waiting for go first.
        if lease_key is not None:
            self._queue.insert(0, item)
        else:
            self._queue.append(item)
        self._queued_bytes += len(item.body)
        self._workers.unpark()

    async def give_back(self, lease_key: str) -> None:
        """Delete a lease now (a fetch or store that will not upload, even
        one being cancelled: its caller shields this)."""
        await self._drop_lease(lease_key)

    def abandon(self, lease_key: str) -> None:
        """Give up a lease without uploading (the origin fetch failed)."""
        self._queue.insert(0, _Upload(lease_key, b"", lease_key))
        self._workers.unpark()

    @property
    def pending_uploads(self) -> int:
        return len(self._queue)

    async def run_uploads(self) -> None:
        """Upload workers; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(UPLOAD_WORKERS):
                nursery.start_soon(self._upload_worker)

    async def _upload_worker(self) -> None:
        while True:
            while not self._queue:
                await self._workers.park()
            item = self._queue.pop(0)
            self._active += 1
            try:
                if item.body:
                    try:
                        await self._call(f"PUT {item.key}", self.store.put, item.key, item.body)
                        self.counters.uploads += 1
                        self.counters.upload_bytes += len(item.body) - HEADER_SIZE
                    except TierError:
                        self.counters.upload_failures += 1
                if item.lease is not None:
                    await self._drop_lease(item.lease)
            finally:
                self._active -= 1
                self._queued_bytes -= len(item.body)

    async def drain(self) -> None:
        """Wait until every queued upload has been sent (or has failed)."""
        while self._queue or self._active:
            await trio.sleep(0.05)

    def snapshot(self) -> TierStats:
        return TierStats(
            **self.counters.snapshot(),
            pending_uploads=self.pending_uploads,
            herd_control=self.conditional,
            available=self.available(),
        )
