"""Fetching chunks into pool slabs: from the shared tier, then the origin;
one chunk per GET, or a run of consecutive chunks in one GET.

It never looks at the disk side of the cache: the coordinator decides what
to fetch and stores what comes back. What it needs of the shared tier is
the narrow `Tier` protocol below (read, claim a lease, upload, give a lease
back), so `modelfs/cache/` never imports the tier's classes.

A GET runs in a worker thread that receives straight into slabs. The
thread holds its own reference on each slab, dropped back on the trio
thread when it ends (`_receive_in_thread`): a GET abandoned on
cancellation keeps receiving until it ends, and its slabs must not hold
other bytes before then.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import trio

from ..store import ObjectStore, ObjectVersion
from .counters import CacheCounters
from .disk import checksum
from .objects import CachedObject
from .pool import BufferPool, Slab

log = logging.getLogger(__name__)

T = TypeVar("T")
# Seconds a cancelled store may take to give its tier lease back.
LEASE_GIVE_BACK = 2.0


class Tier(Protocol):
    """What the cache asks of a shared tier (`modelfs.tier.SharedTier`)."""

    def chunk_key(self, key: str, version: ObjectVersion, chunk_size: int, n: int) -> str: ...

    async def read(self, tier_key: str, length: int) -> bytes | None: ...

    async def claim(self, tier_key: str, length: int) -> tuple[bytes | None, str | None]: ...

    def upload(
        self, tier_key: str, data: bytes | bytearray, digest: int, lease_key: str | None
    ) -> None: ...

    async def give_back(self, lease_key: str) -> None: ...

    async def run_uploads(self) -> None: ...


class TierShare:
    """A chunk fetched from the origin that the tier should get once it is
    stored locally, with the lease this node holds for it (if any). Exactly
    one of `upload` and `give_back` must follow."""

    def __init__(self, tier: Tier, tier_key: str, lease: str | None) -> None:
        self.tier, self.tier_key, self.lease = tier, tier_key, lease

    def upload(self, data: memoryview, digest: int) -> None:
        # The tier's upload queue outlives the slab: it gets a copy.
        self.tier.upload(self.tier_key, bytes(data), digest, self.lease)

    async def give_back(self) -> None:
        """Give the lease back now, even while being cancelled (a store
        cancelled at unmount or by Ctrl-C in pull), so other nodes stop
        waiting for a chunk this node will not upload."""
        if self.lease is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(LEASE_GIVE_BACK):
            await self.tier.give_back(self.lease)


def _release_from_thread(
    token: trio.lowlevel.TrioToken, pool: BufferPool, slabs: Sequence[Slab]
) -> None:
    """Drop a worker thread's hold on slabs it filled, on the trio thread."""

    def release() -> None:
        for slab in slabs:
            pool.release(slab)

    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(release)


class Fetcher:
    def __init__(
        self,
        store: ObjectStore,
        pool: BufferPool,
        counters: CacheCounters,
        *,
        tier: Tier | None = None,
        fetch_concurrency: int,
    ) -> None:
        self.store, self.pool, self.counters, self.tier = store, pool, counters, tier
        # Threads for GETs; never a bottleneck, since a GET needs a slot first.
        self.limiter = trio.CapacityLimiter(fetch_concurrency)
        self.single_gets = 0  # one-chunk GETs being received

    async def _receive_in_thread(self, slabs: Sequence[Slab], receive: Callable[[], T]) -> T:
        """`receive()` in a GET thread that holds `slabs` until it ends. A
        GET may stall for the whole retry timeout: shutdown (and a cancelled
        read) must not wait for it, so the thread is abandoned on
        cancellation; it writes nothing but its slabs."""
        token = trio.lowlevel.current_trio_token()
        for slab in slabs:
            self.pool.hold(slab)
        # Who drops the thread's holds: the thread once it has started, or
        # this task when the thread never started (cancelled while waiting
        # for the limiter). The lock makes that decision once.
        lock = threading.Lock()
        state = {"started": False, "given_up": False}

        def in_thread() -> T:
            with lock:
                if state["given_up"]:  # abandoned before it began: touch nothing
                    raise RuntimeError("GET abandoned before it started")
                state["started"] = True
            try:
                return receive()
            finally:
                _release_from_thread(token, self.pool, slabs)

        try:
            return await trio.to_thread.run_sync(
                in_thread, limiter=self.limiter, abandon_on_cancel=True
            )
        except BaseException:
            with lock:
                if not state["started"]:
                    state["given_up"] = True
                    for slab in slabs:
                        self.pool.release(slab)
            raise

    async def fetch(self, obj: CachedObject, n: int) -> tuple[Slab, int, TierShare | None]:
        """Chunk `n` from the shared tier or the origin: (slab held for the
        caller, checksum, the tier share to complete once stored locally)."""
        start, end = obj.chunk_span(n)
        tier = self.tier
        if tier is None:
            slab, digest = await self.from_origin(obj, start, end)
            return slab, digest, None
        tier_key = tier.chunk_key(obj.key, obj.version, obj.chunk_size, n)
        got = await tier.read(tier_key, end - start)
        lease = None
        if got is None:
            got, lease = await tier.claim(tier_key, end - start)
        if got is not None:
            self.counters.tier_chunks += 1
            slab = self.pool.take_or_overflow(len(got))
            slab.view[: len(got)] = got
            return slab, checksum(got), None
        share = TierShare(tier, tier_key, lease)
        try:
            slab, digest = await self.from_origin(obj, start, end)
        except BaseException:
            await share.give_back()
            raise
        return slab, digest, share

    async def from_origin(self, obj: CachedObject, start: int, end: int) -> tuple[Slab, int]:
        """Bytes [start, end) of `obj` from the origin, received into a
        slab held for the caller, and their checksum."""
        slab = self.pool.take_or_overflow(end - start)
        buf = slab.view[: end - start]

        def receive() -> int:
            self.store.get_into(obj.key, obj.version, start, [buf])
            return checksum(buf)

        self.single_gets += 1
        try:
            return slab, await self._receive_in_thread([slab], receive)
        except BaseException:
            self.pool.release(slab)
            raise
        finally:
            self.single_gets -= 1

    async def run(
        self,
        obj: CachedObject,
        start: int,
        slabs: Sequence[Slab],
        lengths: Sequence[int],
        arrived: Callable[[int, int], None],
    ) -> None:
        """One GET from `start` into `slabs` (chunk i gets lengths[i]
        bytes). `arrived(i, checksum)` is called on the trio thread for each
        chunk the moment its bytes are in, before the GET ends, and never
        after this returns. Raises what the GET raised."""
        bufs = [slab.view[:length] for slab, length in zip(slabs, lengths, strict=True)]
        token = trio.lowlevel.current_trio_token()
        live = True

        def post(i: int, digest: int) -> None:
            if live:
                arrived(i, digest)

        def deliver(i: int) -> None:  # in the GET's thread
            digest = checksum(bufs[i])
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(post, i, digest)

        try:
            await self._receive_in_thread(
                slabs, lambda: self.store.get_into(obj.key, obj.version, start, bufs, deliver)
            )
        finally:
            live = False
