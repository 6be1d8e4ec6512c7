"""The chunk cache's coordinator: fetch-once, verify-on-every-disk-read
access to object bytes, walking the miss path in one direction (memory →
disk → range lock → disk → tier → origin → store; docs/chunk_cache.md).

Owns the in-memory state that makes reads cheap and safe; the parts it
drives (directory, index, payload files, disk chunks, buffer pool, fetch
slots) live in their own modules and never call back into it:

* ``_flights``  one in-progress load (disk or origin) or eviction per chunk
  (single-flight: concurrent readers of a missing chunk wait on one GET and
  are each handed a hold on its slab);
* ``_storing``  chunks a reader has whose payload write and commit are
  pending (write-behind), with their slabs;
* ``_pins``     chunks a read is waiting on; eviction skips them;
* ``_touched``  recency updates, written to the index in one batch;
* ``pool``      the buffer pool: the memory every chunk is received into,
  read from disk into and replied from, and the memory cache;
* ``_commits``  chunk records waiting for the next group commit;
* ``_prefetched`` chunks read-ahead fetched from the origin that no read has
  used yet: used ones and evicted ones are counted, for the metrics.

A read is always served from bytes that were checksummed after they were
read from the payload file (or that just came from the origin): a chunk read
from disk is read whole into a slab and checked against the index's
xxh3-64. So corruption that appears while a mount runs, and a chunk another
process evicts under us, are both caught on the next disk read.

Several processes (mounts, ``modelfs pull``, ``modelfs cache``) may share one
cache directory. A chunk's byte range in its payload file is locked (OFD
lock, see payload.py) by whoever fetches and stores it or evicts it; a
fetcher takes the lock and then looks at the index again, so a chunk another
process is fetching is waited for and read from disk rather than fetched
twice. Lock order: range lock, then fetch slot, then the index writer; a
coalesced run holding a slot only tries range locks.

All of that state is touched only from the trio thread; blocking work (S3,
disk, LMDB writes) runs in worker threads behind capacity limiters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import trio

from ..config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FETCH_CONCURRENCY,
    DEFAULT_MEMORY_CACHE,
    MountConfig,
    format_size,
)
from ..errors import CacheError, single_domain_error
from ..s3.tier_bucket import S3Tier
from ..stats import CacheStats
from ..store import ObjectStore, ObjectVersion
from ..tier import UPLOAD_WORKERS, SharedTier
from . import directory, disk
from .disk import checksum
from .index import NewChunk, Victim, open_index
from .payload import PayloadFile, PayloadStore
from .pool import BufferPool, Slab
from .slots import FetchSlots, Priority, Ticket

log = logging.getLogger(__name__)

TOUCH_FLUSH_INTERVAL = 2.0
# Another process fetching a chunk we want: poll its lock this often, and
# after PEER_WAIT fetch it ourselves (a stalled peer must not stall us).
PEER_POLL = 0.01
PEER_WAIT = 30.0
# Background fetches of consecutive chunks (read-ahead, prefetch on open) are
# one GET of up to this many bytes: a server spends less CPU per byte on
# large GETs (the JuiceFS gateway: 1.66 s/GiB at 8 MiB, ~1.2 at 32-64 MiB).
RUN_BYTES = 32 << 20
# The free space seen by statvfs is trusted this long (less what we wrote),
# except within FREE_MARGIN of the --min-free-space guard, where every store
# asks again (other processes may be filling the disk).
FREE_REFRESH = 0.5
FREE_MARGIN = 1 << 30
# Test hook: a path; the daemon touches it and stalls between a chunk's
# payload write and its index commit (kill -9 tests).
STALL_BEFORE_COMMIT_ENV = "MODELFS_TEST_STALL_BEFORE_COMMIT"

ChunkKey = tuple[bytes, int]
Buffer = bytes | bytearray | memoryview


def _release_from_thread(
    token: trio.lowlevel.TrioToken, pool: BufferPool, slabs: list[Slab]
) -> None:
    """Drop a worker thread's hold on slabs it filled, on the trio thread.
    A GET abandoned on cancellation keeps receiving into its slabs until it
    ends; only then may they hold other bytes."""

    def release() -> None:
        for slab in slabs:
            pool.release(slab)

    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(release)


class ChunkState(enum.Enum):
    READY = "ready"  # in memory, or being loaded: nothing to do
    ON_DISK = "on disk"  # recorded in the index: a disk read away
    MISSING = "missing"  # to be fetched


@dataclass
class CachedObject:
    """One pinned object version, shared by every open handle on it."""

    key: str
    version: ObjectVersion
    obj_id: bytes
    chunk_size: int
    file: PayloadFile
    meta: bytes
    handles: int = 0
    prefetcher: Any = None  # set by modelfs.prefetch; lives as long as the object

    @property
    def size(self) -> int:
        return self.version.size

    def chunk_span(self, n: int) -> tuple[int, int]:
        start = n * self.chunk_size
        return start, min(start + self.chunk_size, self.size)


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    slab: Slab | None = None  # None: failed, cancelled, or an eviction
    fetched: bool = False  # the bytes came from the origin, not the disk
    waiters: int = 0  # readers waiting; each is handed a hold on the slab
    ticket: Ticket | None = None  # its place in the queue for a fetch slot

    def land(self, pool: BufferPool, slab: Slab | None) -> None:
        """End the flight: every waiter gets its own hold on `slab`."""
        self.slab = slab
        if slab is not None:
            for _ in range(self.waiters):
                pool.hold(slab)
        self.done.set()


@dataclass
class _Commit:
    chunk: NewChunk
    done: trio.Event = field(default_factory=trio.Event)
    stored: bool = False
    error: Exception | None = None


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    # Bytes handed to readers, by whether their chunk had to come from the origin.
    hit_bytes: int = 0
    miss_bytes: int = 0
    prefetch_fetched_bytes: int = 0
    prefetch_used_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    uncached_chunks: int = 0  # fetched but not stored: the cache could not be written
    fetched_chunks: int = 0
    verified_chunks: int = 0
    peer_chunks: int = 0  # a chunk we missed that another process stored meanwhile
    tier_chunks: int = 0  # a chunk we missed that came from the shared tier
    corrupt_chunks: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    index_commits: int = 0  # transactions that recorded stored chunks


async def _all_at_once(load: Callable[[int], Awaitable[None]], chunks: list[int]) -> None:
    """`load` every chunk at once (a lone one without a nursery, none
    without anything: the common case of a read served from memory); a
    failure of several fails as a one-chunk read does."""
    if len(chunks) <= 1:
        for n in chunks:
            await load(n)
        return
    try:
        async with trio.open_nursery() as nursery:
            for n in chunks:
                nursery.start_soon(load, n)
    except BaseExceptionGroup as group:
        leaf = single_domain_error(group)
        if leaf is None:
            raise
        raise leaf from None


class ChunkCache:
    def __init__(
        self,
        root: Path,
        store: ObjectStore,
        *,
        capacity: int | None = None,
        min_free: int | None = 0,
        fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY,
        disk_concurrency: int = 8,
        memory_cache: int = DEFAULT_MEMORY_CACHE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        tier: SharedTier | None = None,
    ) -> None:
        self.root = root
        self.store = store
        directory.claim(root)
        fs_size = shutil.disk_usage(root).total
        if min_free and min_free >= fs_size:
            raise CacheError(
                f"--min-free-space {format_size(min_free)} is more than the filesystem of "
                f"{root} holds ({format_size(fs_size)})"
            )
        self._member = directory.Membership(root)
        try:
            directory.check_format(root)
            self.index = open_index(root, self._member.alone)
            self.payload = PayloadStore(root)
        except OSError as exc:
            self._member.close()
            raise CacheError(f"cannot use cache directory {root}: {exc.strerror or exc}") from None
        except BaseException:
            self._member.close()
            raise
        finally:
            self._member.set_up()
        self._used = self.index.used()  # kept in memory: refreshed by each commit
        self.min_free = min_free if min_free is not None else directory.default_min_free(root)
        self.capacity = (
            capacity
            if capacity is not None
            else directory.default_capacity(root, self._used, self.min_free)
        )
        self._free_seen, self._free_at, self._written = 0, -math.inf, 0
        self._commits: list[_Commit] = []
        self._committing = False
        self._stall_before_commit = os.environ.get(STALL_BEFORE_COMMIT_ENV)
        self.tier = tier
        self.counters = CacheCounters()
        self._objects: dict[bytes, CachedObject] = {}
        # Objects whose chunks in memory were cut at a size other than the
        # pool's slab size (see `_recut`).
        self._cuts: dict[bytes, int] = {}
        self._flights: dict[ChunkKey, _Flight] = {}
        # Chunks a coalesced GET handed out whose payload write is running:
        # readers take them from here, not from the origin a second time.
        self._storing: dict[ChunkKey, Slab] = {}
        self._segments = 0  # coalesced GETs running (their stores included)
        self._run_chunks = 0  # chunks those GETs have claimed and not yet stored
        self._single_chunks = 0  # one-chunk GETs being received
        self._fetch_concurrency = fetch_concurrency
        # Where demand misses are stored after their reader got the bytes;
        # set while `run_background` runs (else misses are stored inline).
        self._behind: trio.Nursery | None = None
        self._settling = False  # set by `settle`: no new coalesced GETs
        self._pins: Counter[ChunkKey] = Counter()
        self._touched: dict[ChunkKey, None] = {}
        self._prefetched: dict[ChunkKey, int] = {}
        self._reserved = 0
        self._storage_warned = False  # a failed cache write is warned once per mount
        # Slabs are cut at the mount's chunk size; an object cached earlier
        # with a larger one is read through overflow slabs.
        self.pool = BufferPool(memory_cache, chunk_size)
        # Slabs background work leaves idle, so readers find one at once.
        self._reserve = min(4, len(self.pool.slabs) // 4)
        self.slots = FetchSlots(fetch_concurrency)
        # Threads for GETs; never a bottleneck, since a GET needs a slot first.
        self._fetch_limiter = trio.CapacityLimiter(fetch_concurrency)
        self._disk_limiter = trio.CapacityLimiter(disk_concurrency)
        self._index_limiter = trio.CapacityLimiter(1)

    @classmethod
    def for_config(cls, cfg: MountConfig, store: ObjectStore) -> ChunkCache:
        """The cache a mount or a pull with these options uses."""
        tier = None
        if cfg.shared_cache is not None:
            tier = SharedTier(
                S3Tier(
                    cfg.tier_settings(pool=cfg.fetch_concurrency + UPLOAD_WORKERS + 4),
                    cfg.shared_cache.bucket,
                ),
                cfg.shared_cache.prefix,
                cfg.source.bucket,
                lease=cfg.shared_cache_lease,
            )
        return cls(
            cfg.resolved_cache_dir,
            store,
            capacity=cfg.cache_size,
            min_free=cfg.min_free_space,
            fetch_concurrency=cfg.fetch_concurrency,
            memory_cache=cfg.memory_cache,
            chunk_size=cfg.chunk_size,
            tier=tier,
        )

    def close(self) -> None:
        try:
            self._flush_touches_sync()
        except (OSError, lmdb.Error) as exc:
            self._storage_failed(exc)  # recency is a hint; losing it loses no data
        self.payload.close_all()
        try:
            self.index.close()
        except lmdb.Error as exc:
            self._storage_failed(exc)
        self._member.close()

    def alone(self) -> bool:
        """Whether no other process (or other ChunkCache) uses the directory."""
        return self._member.alone()

    # -- objects ---------------------------------------------------------
    def open_object(self, key: str, version: ObjectVersion, chunk_size: int) -> CachedObject:
        obj_id = version.identity()
        obj = self._objects.get(obj_id)
        if obj is None:
            meta = self.index.object_meta(obj_id)
            if meta is not None:
                # Chunks already cached were cut at the size used then.
                chunk_size = int(meta["chunk_size"])  # type: ignore[call-overload]
            meta_bytes = json.dumps(
                {
                    "etag": version.etag,
                    "size": version.size,
                    "mtime_ns": version.mtime_ns,
                    "chunk_size": chunk_size,
                    "key": key,
                    # bucket/key, so `modelfs cache ls` and `verify` can name
                    # the object as s3://bucket/key.
                    "origin": version.origin,
                }
            ).encode()
            self._recut(obj_id, chunk_size)
            pf = self.payload.acquire(obj_id)
            if pf.error is not None:
                self._storage_failed(pf.error)
            obj = CachedObject(key, version, obj_id, chunk_size, pf, meta_bytes)
            self._objects[obj_id] = obj
        obj.handles += 1
        return obj

    def _recut(self, obj_id: bytes, chunk_size: int) -> None:
        """Memory keys a chunk by (object, chunk number): an object opened
        at another chunk size than its chunks in memory were cut at (its
        records were cleared or evicted meanwhile, so the mount's own size
        now applies) must not find those slabs, or chunk 1 at 1 MiB would
        be served the bytes of chunk 1 at 256 KiB. Only objects cut at a
        size other than the pool's are remembered, so this stays small."""
        was = self._cuts.get(obj_id, self.pool.slab_size)
        if was != chunk_size:
            self.pool.forget_object(obj_id)
        if chunk_size == self.pool.slab_size:
            self._cuts.pop(obj_id, None)
        else:
            self._cuts[obj_id] = chunk_size

    def retain(self, obj: CachedObject) -> None:
        obj.handles += 1

    def close_object(self, obj: CachedObject) -> None:
        obj.handles -= 1
        if obj.handles == 0:
            del self._objects[obj.obj_id]
            self.payload.release(obj.obj_id)

    # -- reads -----------------------------------------------------------
    async def read(
        self, obj: CachedObject, offset: int, size: int, *, priority: Priority = Priority.DEMAND
    ) -> Buffer:
        """Bytes [offset, offset+size) of the object, short only at EOF.

        A read inside one chunk is a view of the chunk's pool slab, valid
        until the caller's next checkpoint (pyfuse3 sends it before that);
        use `view` to keep bytes across an await. A read over several
        chunks is a copy. BACKGROUND reads (prefetch looking at a file's
        header) fetch as background work and are not counted as bytes
        served to readers."""
        self.pool.settle_deferred()  # views handed out by earlier steps are sent
        slabs = await self._hold(obj, offset, size, priority)
        if len(slabs) == 1:
            view = self._cut(obj, offset, size, slabs)
            self.pool.release_after_reply(slabs[0])
            return view
        try:
            return bytes(self._cut(obj, offset, size, slabs)) if slabs else b""
        finally:
            for slab in slabs:
                self.pool.release(slab)

    @contextlib.asynccontextmanager
    async def view(self, obj: CachedObject, offset: int, size: int) -> AsyncIterator[Buffer]:
        """Like `read`, but the bytes stay valid (held) until the block ends."""
        slabs = await self._hold(obj, offset, size, Priority.DEMAND)
        try:
            yield self._cut(obj, offset, size, slabs) if slabs else b""
        finally:
            for slab in slabs:
                self.pool.release(slab)

    @staticmethod
    def _cut(obj: CachedObject, offset: int, size: int, slabs: list[Slab]) -> Buffer:
        end = min(offset + size, obj.size)
        first = offset // obj.chunk_size
        parts = []
        for i, slab in enumerate(slabs):
            base = (first + i) * obj.chunk_size
            parts.append(slab.data[max(offset, base) - base : min(end, base + slab.length) - base])
        data: Buffer = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != end - offset:
            raise CacheError(f"{obj.key}: chunk shorter than the object's size says")
        return data

    async def _hold(
        self, obj: CachedObject, offset: int, size: int, priority: Priority
    ) -> list[Slab]:
        """The slabs of the chunks under [offset, offset+size), in order,
        each held for the caller (who releases them)."""
        end = min(offset + size, obj.size)
        if offset >= end:
            return []
        chunks = range(offset // obj.chunk_size, (end - 1) // obj.chunk_size + 1)
        held: dict[int, Slab] = {}
        fetched: set[int] = set()

        async def load(n: int) -> None:
            slab, from_origin = await self._get(obj, n, priority)
            held[n] = slab
            if from_origin:
                fetched.add(n)

        try:
            with self._pinned(obj.obj_id, chunks):
                for n in chunks:
                    slab = self.pool.get((obj.obj_id, n))
                    if slab is not None:
                        held[n] = slab
                todo = [n for n in chunks if n not in held]
                self.counters.hits += len(chunks) - len(todo)
                await _all_at_once(load, todo)
        except BaseException:
            for slab in held.values():
                self.pool.release(slab)
            raise
        if priority == Priority.DEMAND:
            self._count_served(obj, offset, end, chunks, fetched)
        return [held[n] for n in chunks]

    def _count_served(
        self, obj: CachedObject, offset: int, end: int, chunks: range, fetched: set[int]
    ) -> None:
        for n in chunks:
            key = (obj.obj_id, n)
            self._touched[key] = None
            used = self._prefetched.pop(key, 0)
            self.counters.prefetch_used_bytes += used
        miss = sum(
            min(end, (n + 1) * obj.chunk_size) - max(offset, n * obj.chunk_size) for n in fetched
        )
        self.counters.miss_bytes += miss
        self.counters.hit_bytes += end - offset - miss

    @property
    def memory_bytes(self) -> int:
        """Size of the memory cache of recent chunks (the buffer pool)."""
        return self.pool.size

    def is_ready(self, obj: CachedObject, n: int) -> bool:
        """Being loaded or held in memory: nothing for read-ahead to do."""
        key = (obj.obj_id, n)
        return key in self._flights or key in self.pool or key in self._storing

    def run_length(self, obj: CachedObject) -> int:
        """How many chunks of `obj` one coalesced GET fetches at most."""
        return max(1, RUN_BYTES // obj.chunk_size)

    async def ensure_run(self, obj: CachedObject, chunks: list[int]) -> int:
        """Background work: load consecutive `chunks`, fetching the ones
        missing everywhere (memory, disk, other processes) in GETs of up to
        `run_length` chunks, each chunk released to waiting readers the
        moment its bytes are in. One background fetch slot is held per GET
        (one GET at a time). Returns how many came from the origin.

        Without a shared tier only: the tier is read chunk by chunk."""
        if self.tier is not None or len(chunks) == 1 or obj.chunk_size > self.pool.slab_size:
            return sum([await self.ensure(obj, n) for n in chunks])
        fetched, i = 0, 0
        while i < len(chunks):
            await self.pool.wait_idle(self._reserve)
            # The slot comes first, then the claim: a reader never waits on
            # a claimed chunk whose GET is still queued.
            async with self.slots.held(Ticket(Priority.BACKGROUND)):
                segment, slabs = self._claim_segment(obj, chunks[i:])
                if segment:
                    fetched += await self._fetch_segment(obj, segment, slabs)
            if segment:
                i += len(segment)
                continue
            if not self.is_ready(obj, chunks[i]):  # on disk, a peer has its lock, or no slab
                fetched += await self.ensure(obj, chunks[i])
            i += 1
        return fetched

    def _claim_segment(self, obj: CachedObject, chunks: list[int]) -> tuple[list[int], list[Slab]]:
        """The leading chunks of `chunks` that are consecutive, not ready,
        not on disk, and whose range locks this process could take now,
        with a slab taken for each; for each, a flight is registered and
        the lock is held. No await: nothing can change in between."""
        segment: list[int] = []
        slabs: list[Slab] = []
        if self._settling:
            return segment, slabs  # shutting down: no new GETs
        # A run takes what is left of --fetch-concurrency chunks after the
        # other runs and the single-chunk GETs, and at least one chunk: the
        # chunk buffers being received stay under twice --fetch-concurrency
        # however many files are fetched ahead (once with one chunk per GET).
        allowed = self._fetch_concurrency - self._run_chunks - self._single_chunks
        for n in chunks[: min(self.run_length(obj), max(1, allowed))]:
            if segment and n != segment[-1] + 1:
                break
            start, end = obj.chunk_span(n)
            if self.is_ready(obj, n) or self.on_disk(obj, n):
                break
            slab = self.pool.take(reserve=self._reserve)
            if slab is None:
                break
            if not obj.file.try_lock(start, end - start):
                self.pool.release(slab)
                break
            key = (obj.obj_id, n)
            self._flights[key] = _Flight()
            # Fetched ahead once, evicted (by any process) before any read
            # used it: that fetch was wasted.
            self.counters.prefetch_wasted_bytes += self._prefetched.pop(key, 0)
            segment.append(n)
            slabs.append(slab)
        return segment, slabs

    async def _fetch_segment(self, obj: CachedObject, segment: list[int], slabs: list[Slab]) -> int:
        """One GET for the claimed `segment` into its slabs; each chunk is
        handed to its flight as it arrives, then stored (still under its
        range lock, so other processes find it on disk when they get the
        lock). The GET's thread never waits for the trio thread: it posts
        each arrival and goes on receiving."""
        first = segment[0]
        start = first * obj.chunk_size
        lengths = [obj.chunk_span(n)[1] - obj.chunk_span(n)[0] for n in segment]
        bufs = [slab.view[:length] for slab, length in zip(slabs, lengths, strict=True)]
        self.counters.misses += len(segment)
        send, receive = trio.open_memory_channel[tuple[int, int]](float("inf"))
        failure: list[BaseException] = []
        token = trio.lowlevel.current_trio_token()
        for slab in slabs:
            self.pool.hold(slab)  # the GET thread's hold

        def post(item: tuple[int, int]) -> None:
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                send.send_nowait(item)

        def deliver(i: int) -> None:  # in the GET's thread
            digest = checksum(bufs[i])
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(post, (i, digest))

        def receive_body() -> None:
            try:
                self.store.get_into(obj.key, obj.version, start, bufs, deliver)
            finally:
                _release_from_thread(token, self.pool, slabs)

        async def get() -> None:
            try:
                async with send:
                    await trio.to_thread.run_sync(
                        receive_body, limiter=self._fetch_limiter, abandon_on_cancel=True
                    )
            except Exception as exc:
                failure.append(exc)

        async def store(n: int, slab: Slab, digest: int) -> None:
            # Stores run beside the receive loop: a chunk's readers never
            # wait for an earlier chunk's disk write.
            try:
                await self._store_and_share(obj, n, slab, digest, None)
            finally:
                del self._storing[(obj.obj_id, n)]
                self.pool.release(slab)
                self._run_chunks -= 1
                c0, c1 = obj.chunk_span(n)
                obj.file.unlock(c0, c1 - c0)

        left = set(range(len(segment)))
        self._segments += 1
        self._run_chunks += len(segment)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get)
                async with receive:
                    async for i, digest in receive:
                        n, slab = first + i, slabs[i]
                        key = (obj.obj_id, n)
                        self.pool.publish(key, slab, lengths[i])
                        self._storing[key] = slab  # our hold goes with it
                        left.discard(i)
                        self._flights.pop(key).land(self.pool, slab)
                        self._prefetched[key] = lengths[i]
                        self.counters.prefetch_fetched_bytes += lengths[i]
                        self.counters.fetched_chunks += 1
                        nursery.start_soon(store, n, slab, digest)
        finally:
            self._segments -= 1
            self._run_chunks -= len(left)
            error = failure[0] if failure else CacheError(f"{obj.key}: fetch ended early")
            for i in left:
                n = first + i
                flight = self._flights.pop((obj.obj_id, n))
                flight.error = error
                flight.land(self.pool, None)
                self.pool.release(slabs[i])
                c0, c1 = obj.chunk_span(n)
                obj.file.unlock(c0, c1 - c0)
        if left:
            raise error
        return len(segment)

    def on_disk(self, obj: CachedObject, n: int) -> bool:
        return self.index.get(obj.obj_id, n) is not None

    def chunk_state(self, obj: CachedObject, n: int) -> ChunkState:
        if self.is_ready(obj, n):
            return ChunkState.READY
        return ChunkState.ON_DISK if self.on_disk(obj, n) else ChunkState.MISSING

    def cached_bytes(self, obj: CachedObject) -> int:
        """Bytes of `obj` recorded on disk (an index read: call it in a thread)."""
        return self.index.cached_bytes(obj.obj_id)

    @contextlib.contextmanager
    def _pinned(self, obj_id: bytes, chunks: range) -> Iterator[None]:
        keys = [(obj_id, n) for n in chunks]
        self._pins.update(keys)
        try:
            yield
        finally:
            self._pins.subtract(keys)
            for k in keys:
                if self._pins[k] <= 0:
                    del self._pins[k]

    async def ensure(
        self, obj: CachedObject, n: int, *, priority: Priority = Priority.BACKGROUND
    ) -> bool:
        """Load chunk `n` into memory (and the disk cache), fetching it at
        most once; True when the bytes had to come from the origin. By
        default background work (read-ahead, prefetch on open): it queues
        behind demand reads for a fetch slot, unless a reader starts
        waiting for it."""
        if self.is_ready(obj, n):
            return False
        slab, from_origin = await self._get(obj, n, priority)
        self.pool.release(slab)
        return from_origin

    async def _get(self, obj: CachedObject, n: int, priority: Priority) -> tuple[Slab, bool]:
        """Chunk `n`'s slab, held for the caller, and whether its bytes came
        from the origin. Background work that has to load the chunk first
        waits for an idle slab, so readers always find one."""
        if priority == Priority.BACKGROUND and not self.is_ready(obj, n):
            await self.pool.wait_idle(self._reserve)
        return await self._chunk(obj, n, priority)

    async def _chunk(self, obj: CachedObject, n: int, priority: Priority) -> tuple[Slab, bool]:
        """Chunk `n`'s verified bytes in a slab held for the caller, and
        whether they came from the origin."""
        key = (obj.obj_id, n)
        while True:
            slab = self._in_memory(key)
            if slab is not None:
                return slab, False
            flight = self._flights.get(key)
            if flight is not None:
                joined = await self._join(flight, priority)
                if joined is not None:
                    return joined
                continue  # an eviction, or an owner that was cancelled: look again
            ticket = Ticket(priority)
            flight = self._flights[key] = _Flight(ticket=ticket)
            slab = None
            try:
                slab, flight.fetched = await self._load(obj, n, ticket)
                return slab, flight.fetched
            except BaseException as exc:
                flight.error = exc
                raise
            finally:
                del self._flights[key]
                flight.land(self.pool, slab)

    def _in_memory(self, key: tuple[bytes, int]) -> Slab | None:
        """The chunk's slab, held for the caller, if it is in RAM: cached,
        or fetched with its disk write not done yet."""
        slab = self.pool.get(key)
        if slab is None:
            slab = self._storing.get(key)
            if slab is not None:
                self.pool.hold(slab)
        return slab

    async def _join(self, flight: _Flight, priority: Priority) -> tuple[Slab, bool] | None:
        """Wait for another task's load of the chunk: its slab (held for
        us) and whether it came from the origin, or None if it landed
        without one (to look again). A demand reader promotes a queued
        background fetch."""
        flight.waiters += 1
        if priority == Priority.DEMAND and flight.ticket is not None:
            self.slots.promote(flight.ticket)
        try:
            await flight.done.wait()
        except BaseException:
            if not flight.done.is_set():
                flight.waiters -= 1
            elif flight.slab is not None:
                self.pool.release(flight.slab)  # handed to us all the same
            raise
        if flight.slab is not None:
            return flight.slab, flight.fetched
        if flight.error is not None and not isinstance(flight.error, trio.Cancelled):
            raise flight.error
        return None

    async def _load(self, obj: CachedObject, n: int, ticket: Ticket) -> tuple[Slab, bool]:
        """Chunk `n` from disk if it verifies, else from the origin (stored
        on the way when the cache can take it), in a slab held for the
        caller. The fetch waits for a slot with `ticket`'s priority, which
        readers joining the flight raise."""
        key = (obj.obj_id, n)
        start, end = obj.chunk_span(n)
        slab = await self._from_disk(obj, n, corrupt_is_news=True)
        if slab is not None:
            return slab, False
        self.counters.misses += 1
        locked = await self._range_lock(obj, start, end)
        handed_over = False
        try:
            # Another process may have stored it while we looked or waited.
            slab = await self._from_disk(obj, n, corrupt_is_news=False)
            if slab is not None:
                self.counters.peer_chunks += 1
                return slab, False
            # Fetched ahead once, evicted (by any process) before any read
            # used it: that fetch was wasted.
            self.counters.prefetch_wasted_bytes += self._prefetched.pop(key, 0)
            async with self.slots.held(ticket):
                slab, digest, tier_upload = await self._fetch(obj, n)
            self.counters.fetched_chunks += 1
            if ticket.priority == Priority.BACKGROUND:  # no reader waited for it
                self._prefetched[key] = end - start
                self.counters.prefetch_fetched_bytes += end - start
            self.pool.publish(key, slab, end - start)
            behind = self._behind
            # The write-behind backlog is bounded: past it, the reader waits
            # for the write as before (a slow disk slows reads, not RAM).
            if behind is not None and len(self._storing) < self._fetch_concurrency:
                # Write-behind: the reader gets the bytes now; the payload
                # write and the index commit follow, under the range lock
                # (handed over), with the object kept open until then.
                self._storing[key] = slab
                self.pool.hold(slab)  # the store's hold
                self.retain(obj)
                behind.start_soon(self._store_behind, obj, n, slab, digest, tier_upload, locked)
                handed_over = True
            else:
                try:
                    await self._store_and_share(obj, n, slab, digest, tier_upload)
                except BaseException:
                    self.pool.release(slab)
                    raise
            return slab, True
        finally:
            if locked and not handed_over:
                obj.file.unlock(start, end - start)

    async def _store_behind(
        self,
        obj: CachedObject,
        n: int,
        slab: Slab,
        digest: int,
        tier_upload: Callable[[], None] | None,
        locked: bool,
    ) -> None:
        """Store a chunk a reader already has (see `_load`), then give up
        its slab, its range lock and the object reference taken for it."""
        key = (obj.obj_id, n)
        start, end = obj.chunk_span(n)
        try:
            await self._store_and_share(obj, n, slab, digest, tier_upload)
        except Exception:
            # A bug here must not end the mount; the chunk is fetched again.
            log.exception("storing chunk %d of %s failed", n, obj.key)
        finally:
            del self._storing[key]
            self.pool.release(slab)
            if locked:
                obj.file.unlock(start, end - start)
            self.close_object(obj)

    async def _from_disk(self, obj: CachedObject, n: int, *, corrupt_is_news: bool) -> Slab | None:
        """The chunk read from its payload file into a slab (held for the
        caller, and kept in memory) if the index records it and the bytes
        match its checksum; None otherwise."""
        start, end = obj.chunk_span(n)
        rec = self.index.get(obj.obj_id, n)
        if rec is None or rec.length != end - start:
            return None
        slab = self.pool.take_or_overflow(rec.length)
        try:
            # The checksum runs in the worker thread too: hashing 8 MiB on
            # the trio thread would stall every other FUSE reply meanwhile.
            got, digest = await trio.to_thread.run_sync(
                disk.read_chunk, obj.file, slab.view, rec.length, start, limiter=self._disk_limiter
            )
        except OSError as exc:
            self.pool.release(slab)
            self._storage_failed(exc)
            return None
        except BaseException:
            self.pool.release(slab)
            raise
        if got == rec.length and digest == rec.checksum:
            self.counters.verified_chunks += 1
            self.pool.publish((obj.obj_id, n), slab, rec.length)
            return slab
        self.pool.release(slab)
        # Evicted by another process while we read it (and maybe stored
        # again since: a new record has a new tick): a miss, not corruption.
        if self.index.get(obj.obj_id, n) != rec:
            return None
        if corrupt_is_news:
            self.counters.corrupt_chunks += 1
            log.warning(
                "cached chunk %d of %s (bytes %d-%d, etag %s) failed its checksum; "
                "fetching it again",
                n,
                obj.key,
                start,
                end - 1,
                obj.version.etag or "-",
            )
        return None

    async def _range_lock(self, obj: CachedObject, start: int, end: int) -> bool:
        """Take the chunk's range lock, the cross-process single flight:
        True when taken (the caller unlocks), False when another process
        held it past PEER_WAIT (the caller goes ahead without it)."""
        pf = obj.file
        deadline = trio.current_time() + PEER_WAIT
        locked = pf.try_lock(start, end - start)
        while not locked and trio.current_time() < deadline:
            await trio.sleep(PEER_POLL)
            locked = pf.try_lock(start, end - start)
        if not locked:
            log.debug("bytes %d-%d of %s: another process holds them too long", start, end, obj.key)
        return locked

    async def _store_and_share(
        self,
        obj: CachedObject,
        n: int,
        slab: Slab,
        digest: int,
        tier_upload: Callable[[], None] | None,
    ) -> None:
        """Store a fetched chunk (counted as uncached when the cache cannot
        take it), then hand it to the shared tier."""
        if not await self._store(obj, n, slab, digest):
            self.counters.uncached_chunks += 1
        if tier_upload is not None:
            tier_upload()

    async def _store(self, obj: CachedObject, n: int, slab: Slab, digest: int) -> bool:
        """Write a fetched chunk to the cache; False when it could not."""
        data = slab.data
        self._reserved += len(data)
        try:
            if not await self._make_room(len(data)):
                raise OSError(
                    errno.ENOSPC,
                    f"less than --min-free-space ({format_size(self.min_free)}) free",
                )
            await trio.to_thread.run_sync(
                obj.file.pwrite,
                data,
                obj.chunk_span(n)[0],
                limiter=self._disk_limiter,
            )
            self._written += len(data)
            if self._stall_before_commit:
                # Test hook (tests/t3_mounted/test_crash.py): the payload is written, the
                # index does not know it; the test kills the daemon here.
                Path(self._stall_before_commit).touch()
                await trio.sleep_forever()
            stored = await self._record(
                NewChunk(obj.obj_id, n, len(data), digest, obj.meta, obj.chunk_size)
            )
            # Several chunks are stored at once (write-behind, coalesced
            # GETs); when every older chunk was in use as room was made, the
            # cache went over its size: evict again now that reads moved on.
            over = self._used - self.capacity
            if over > 0:
                await self._evict(over, over + 64 * len(data))
            return stored
        except (OSError, lmdb.Error) as exc:
            # Disk full, quota, a read-only or vanished cache directory, a
            # full index: serve this read from memory and carry on uncached.
            self._storage_failed(exc)
            return False
        finally:
            self._reserved -= len(data)

    async def _record(self, chunk: NewChunk) -> bool:
        """Record a chunk whose payload is written (group commit): chunks
        stored meanwhile wait and go into the next transaction together,
        so the index's commit and fdatasync are paid once per batch. The
        first to find no commit running commits, shielded from
        cancellation so no waiter is left without one."""
        entry = _Commit(chunk)
        self._commits.append(entry)
        if not self._committing:
            self._committing = True
            try:
                with trio.CancelScope(shield=True):
                    while self._commits:
                        await self._commit_batch()
            finally:
                self._committing = False
        await entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.stored

    async def _commit_batch(self) -> None:
        batch, self._commits = self._commits, []
        try:
            results, self._used = await trio.to_thread.run_sync(
                self.index.put_many, [e.chunk for e in batch], limiter=self._index_limiter
            )
            for e, stored in zip(batch, results, strict=True):
                e.stored = stored
            self.counters.index_commits += 1
        except Exception as exc:
            for e in batch:
                e.error = exc
        finally:
            for e in batch:
                e.done.set()

    def _storage_failed(self, exc: BaseException) -> None:
        if not self._storage_warned:  # once per mount: a full disk flaps as LRU frees space
            self._storage_warned = True
            log.warning(
                "cannot write to the cache in %s (%s); serving reads from the origin "
                "without caching while it cannot",
                self.root,
                exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
            )

    async def _fetch(
        self, obj: CachedObject, n: int
    ) -> tuple[Slab, int, Callable[[], None] | None]:
        """Chunk `n` from the shared tier or the origin: (slab held for the
        caller, checksum, what to call to upload it to the tier once stored
        locally)."""
        start, end = obj.chunk_span(n)
        tier = self.tier
        if tier is None:
            slab, digest = await self._from_origin(obj, start, end)
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
        try:
            slab, digest = await self._from_origin(obj, start, end)
        except BaseException:
            if lease is not None:
                tier.abandon(lease)
            raise
        # The tier's upload queue outlives the slab: it gets a copy.
        return slab, digest, lambda: tier.upload(tier_key, bytes(slab.data), digest, lease)

    async def _from_origin(self, obj: CachedObject, start: int, end: int) -> tuple[Slab, int]:
        """Bytes [start, end) of `obj` from the origin, received into a
        slab held for the caller, and their checksum."""
        slab = self.pool.take_or_overflow(end - start)
        buf = slab.view[: end - start]
        self.pool.hold(slab)  # the GET thread's hold
        token = trio.lowlevel.current_trio_token()

        def receive() -> int:
            try:
                self.store.get_into(obj.key, obj.version, start, [buf])
                return checksum(buf)
            finally:
                _release_from_thread(token, self.pool, [slab])

        self._single_chunks += 1
        try:
            digest = await trio.to_thread.run_sync(
                receive,
                limiter=self._fetch_limiter,
                # A GET may stall for the whole retry timeout: shutdown (and
                # a cancelled read) must not wait for it. The thread keeps
                # its hold on the slab until it ends; it writes nothing else.
                abandon_on_cancel=True,
            )
        except BaseException:
            self.pool.release(slab)
            raise
        finally:
            self._single_chunks -= 1
        return slab, digest

    # -- eviction --------------------------------------------------------
    async def _make_room(self, incoming: int) -> bool:
        """Evict so that `incoming` more bytes keep the cache within its size
        and leave `min_free` on the filesystem; False when the free-space
        guard cannot be met (the disk is full of other things)."""
        # `_reserved` counts every chunk being stored, this one included.
        over = self._used + self._reserved - self.capacity
        short = 0
        if self.min_free:
            short = self.min_free + self._reserved - await self._free()
            if short > -FREE_MARGIN:
                # Near the guard the estimate is not good enough: another
                # process may have written since the last statvfs.
                short = self.min_free + self._reserved - await self._free(exact=True)
        need = max(over, short)
        if need > 0:
            # Ask for some slack: pinned or busy chunks are skipped.
            await self._evict(need, need + 64 * incoming)
        return short <= 0 or await self._free(exact=True) >= self.min_free + self._reserved

    async def _free(self, *, exact: bool = False) -> int:
        """Free bytes on the cache's filesystem: a statvfs at most every
        FREE_REFRESH seconds (or when `exact`), less what this process
        wrote since. Other processes filling the disk are seen at the next
        refresh."""
        now = time.monotonic()
        if exact or now - self._free_at > FREE_REFRESH:
            # statvfs can block on a sick filesystem: in a thread. Bytes
            # written while it runs are kept in `_written` (counted as not
            # seen by it: the estimate errs towards less free space).
            before = self._written
            seen = await trio.to_thread.run_sync(directory.free_bytes, self.root)
            self._free_seen, self._free_at = seen, now
            self._written -= before
        return self._free_seen - self._written

    @property
    def used(self) -> int:
        """Bytes the index records (as of this process's last commit or eviction)."""
        return self._used

    async def shrink_to(self, target: int) -> tuple[int, int]:
        """Evict least-recently-used chunks until at most `target` bytes are
        cached (chunks being read are kept). Returns (chunks, bytes) evicted."""
        self._used = self.index.used()
        over = self._used - target
        if over <= 0:
            return 0, 0
        return await self._evict(over, over)

    async def _evict(self, over: int, ask: int) -> tuple[int, int]:
        await self.flush_touches()
        candidates = await trio.to_thread.run_sync(
            self.index.oldest, ask, limiter=self._index_limiter
        )
        victims = []
        freed = 0
        for v in candidates:
            key = (v.obj_id, v.chunk)
            if key in self._pins or key in self._flights:
                continue
            victims.append(v)
            freed += v.length
            if freed >= over:
                break
        if not victims:
            log.debug("cache over capacity by %d bytes, every old chunk is in use", over)
            return 0, 0
        done = await self._remove(victims)
        freed = sum(v.length for v in done)
        log.debug("evicted %d chunks (%d bytes)", len(done), freed)
        return len(done), freed

    async def drop(self, victims: list[Victim]) -> None:
        """Forget chunks found bad on disk (``modelfs cache verify --repair``)."""
        await self._remove([v for v in victims if (v.obj_id, v.chunk) not in self._flights])

    async def _remove(self, victims: list[Victim]) -> list[Victim]:
        """Evict chunks; returns those evicted (another process fetching or
        evicting one keeps it)."""
        # Claim the victims before leaving the trio thread: a reader that
        # wants one now waits for the eviction, then loads it again.
        flights = {}
        for v in victims:
            key = (v.obj_id, v.chunk)
            self._touched.pop(key, None)
            self.pool.forget(key)
            self.counters.prefetch_wasted_bytes += self._prefetched.pop(key, 0)
            flights[key] = self._flights[key] = _Flight()
        try:
            done = await trio.to_thread.run_sync(
                disk.evict,
                self.index,
                self.payload,
                victims,
                self.alone,
                limiter=self._index_limiter,
            )
        finally:
            for key, flight in flights.items():
                del self._flights[key]
                flight.done.set()
        self.counters.evicted_chunks += len(done)
        self.counters.evicted_bytes += sum(v.length for v in done)
        self._used = max(0, self._used - sum(v.length for v in done))
        return done

    # -- recency ---------------------------------------------------------
    async def flush_touches(self) -> None:
        if self._touched:
            keys = list(self._touched)
            self._touched.clear()
            await trio.to_thread.run_sync(self.index.touch, keys, limiter=self._index_limiter)

    def _flush_touches_sync(self) -> None:
        if self._touched:
            self.index.touch(list(self._touched))
            self._touched.clear()

    async def settle(self, timeout: float) -> None:
        """Let coalesced GETs in progress finish and store what they
        fetched (readers got those chunks before they were on disk), for at
        most `timeout` seconds; start no new ones. Called at unmount, so a
        remount finds on disk everything this mount served."""
        self._settling = True
        with trio.move_on_after(timeout):
            await self.stored()

    async def stored(self) -> None:
        """Return once no chunk that was fetched waits for its payload write
        and index commit (coalesced GETs and write-behind of demand misses)."""
        while self._segments or self._storing:
            await trio.sleep(0.01)

    async def run_background(self, *, write_behind: bool = True) -> None:
        """Periodic chores, write-behind stores and the shared tier's
        uploads; runs until cancelled (call `settle` first). Without
        `write_behind` a reader waits for its chunk's write (`pull`: a
        Ctrl-C must not lose chunks already fetched)."""
        async with trio.open_nursery() as nursery:
            self._behind = nursery if write_behind else None
            try:
                if self.tier is not None:
                    nursery.start_soon(self.tier.run_uploads)
                await self._chores()
            finally:
                self._behind = None

    async def _chores(self) -> None:
        while True:
            await trio.sleep(TOUCH_FLUSH_INTERVAL)
            try:
                await self.flush_touches()
            except (OSError, lmdb.Error) as exc:
                self._storage_failed(exc)
            except Exception:
                log.exception("cannot record chunk recency in the index")

    def stats(self) -> CacheStats:
        return CacheStats(
            **self.index.stats(),
            capacity_bytes=self.capacity,
            prefetch_pending_bytes=sum(self._prefetched.values()),
            open_objects=len(self._objects),
            # Chunks fetched (or being fetched by a coalesced GET) whose
            # payload write and index commit have not finished: 0 once
            # everything a reader got is on disk.
            pending_writes=len(self._storing) + self._run_chunks,
            memory_bytes=self.pool.size,
            memory_cached_bytes=self.pool.cached_bytes,
            memory_overflow_chunks=self.pool.overflow_chunks,
            **dataclasses.asdict(self.counters),
        )
