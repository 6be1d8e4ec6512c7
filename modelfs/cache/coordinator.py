"""The chunk cache's coordinator: fetch-once, verify-on-every-disk-read
access to object bytes, walking the miss path in one direction (memory →
disk → range lock → disk → tier → origin → store; docs/chunk_cache.md).

It owns the miss path and write-behind, and nothing else; each of the
rest has one owner, built here and never calling back up:

* ``states.ChunkStates``   in flight, storing, pinned (single flight per chunk);
* ``objects.ObjectTable``  open object versions and their payload files;
* ``chunks.DiskChunks``    verified disk reads, range locks, store = payload then record;
* ``writer.IndexWriter``   group commit, recency, bytes recorded;
* ``space.SpaceBudget``    --cache-size, --min-free-space, eviction;
* ``fetcher.Fetcher``      tier then origin, one chunk or a run per GET;
* ``runs.Runs``            coalesced background GETs;
* ``pool.BufferPool``      every chunk in memory; ``slots.FetchSlots`` GET slots;
* ``counters``             counters, the read-ahead ledger, the storage warning.

A read is always served from bytes that were checksummed after they were
read from the payload file (or that just came from the origin). All of this
runs on the trio thread; blocking work runs in worker threads behind
capacity limiters.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import lmdb
import trio

from ..config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FETCH_CONCURRENCY,
    DEFAULT_MEMORY_CACHE,
)
from ..errors import CacheError, single_domain_error
from ..stats import CacheStats
from ..store import ObjectStore, ObjectVersion
from .chunks import Hook
from .fetcher import Tier, TierShare
from .index import Victim
from .objects import CachedObject
from .parts import CacheParts, open_parts
from .pool import Slab
from .runs import Arrived, Wanted
from .slots import Priority, Ticket
from .states import ChunkState

log = logging.getLogger(__name__)

TOUCH_FLUSH_INTERVAL = 2.0

Buffer = bytes | bytearray | memoryview


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
        tier: Tier | None = None,
        before_commit: Hook | None = None,
    ) -> None:
        self.root, self.store, self.tier = root, store, tier
        p = open_parts(
            root,
            store,
            capacity=capacity,
            min_free=min_free,
            fetch_concurrency=fetch_concurrency,
            disk_concurrency=disk_concurrency,
            memory_cache=memory_cache,
            chunk_size=chunk_size,
            tier=tier,
            before_commit=before_commit,
        )
        self._member, self.index, self.payload = p.member, p.index, p.payload
        self.counters, self.ledger, self.warn, self.writer = p.counters, p.ledger, p.warn, p.writer
        self.pool, self.slots, self.states, self.space = p.pool, p.slots, p.states, p.space
        self.chunks, self.objects, self.fetcher, self.runs = p.chunks, p.objects, p.fetcher, p.runs
        self._miss = MissPath(p, fetch_concurrency)

    def close(self) -> None:
        try:
            self.writer.flush_touches_sync()
        except (OSError, lmdb.Error) as exc:
            self.warn(exc)  # recency is a hint; losing it loses no data
        self.payload.close_all()
        try:
            self.index.close()
        except lmdb.Error as exc:
            self.warn(exc)
        self._member.close()

    def alone(self) -> bool:
        """Whether no other process (or other ChunkCache) uses the directory."""
        return self._member.alone()

    @property
    def capacity(self) -> int:
        return self.space.capacity

    @property
    def used(self) -> int:
        """Bytes the index records (as of this process's last commit or eviction)."""
        return self.writer.used

    @property
    def served_bytes(self) -> int:
        """Bytes handed to readers so far."""
        return self.counters.hit_bytes + self.counters.miss_bytes

    @property
    def memory_bytes(self) -> int:
        """Size of the memory cache of recent chunks (the buffer pool)."""
        return self.pool.size

    # -- objects ---------------------------------------------------------
    def open_object(self, key: str, version: ObjectVersion, chunk_size: int) -> CachedObject:
        return self.objects.open(key, version, chunk_size)

    def retain(self, obj: CachedObject) -> None:
        self.objects.retain(obj)

    def close_object(self, obj: CachedObject) -> None:
        self.objects.close(obj)

    def cached_bytes(self, obj: CachedObject) -> int:
        """Bytes of `obj` recorded on disk (an index scan: call it in a thread)."""
        return self.index.cached_bytes(obj.obj_id)

    def version_cached_bytes(self, version: ObjectVersion) -> int:
        """Bytes of a version recorded on disk (an index scan: call it in a thread)."""
        return self.index.cached_bytes(version.identity())

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
            view = _cut(obj, offset, size, slabs)
            self.pool.release_after_reply(slabs[0])
            return view
        try:
            return bytes(_cut(obj, offset, size, slabs)) if slabs else b""
        finally:
            for slab in slabs:
                self.pool.release(slab)

    @contextlib.asynccontextmanager
    async def view(self, obj: CachedObject, offset: int, size: int) -> AsyncIterator[Buffer]:
        """Like `read`, but the bytes stay valid (held) until the block ends."""
        slabs = await self._hold(obj, offset, size, Priority.DEMAND)
        try:
            yield _cut(obj, offset, size, slabs) if slabs else b""
        finally:
            for slab in slabs:
                self.pool.release(slab)

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
            slab, from_origin = await self._miss.get(obj, n, priority)
            held[n] = slab
            if from_origin:
                fetched.add(n)

        try:
            with self.states.pinned(obj.obj_id, chunks):
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
            for n in chunks:
                self.writer.touch((obj.obj_id, n))
                self.ledger.used((obj.obj_id, n))
            miss = sum(
                min(end, (n + 1) * obj.chunk_size) - max(offset, n * obj.chunk_size)
                for n in fetched
            )
            self.counters.miss_bytes += miss
            self.counters.hit_bytes += end - offset - miss
        return [held[n] for n in chunks]

    # -- what background work asks (prefetch.ChunkSource) ----------------
    def is_ready(self, obj: CachedObject, n: int) -> bool:
        """Being loaded or held in memory: nothing for read-ahead to do."""
        return self.states.ready((obj.obj_id, n))

    def on_disk(self, obj: CachedObject, n: int) -> bool:
        return self.chunks.on_disk(obj, n)

    def hold(self, obj: CachedObject, n: int) -> Slab | None:
        """Chunk `n`'s slab if it is in memory, kept from eviction until
        `let_go`: prefetch on open keeps what it fetched ahead of a reader
        until the reader has read it."""
        return self.states.in_memory((obj.obj_id, n))

    def let_go(self, slab: Slab) -> None:
        self.pool.release(slab)

    def chunk_state(self, obj: CachedObject, n: int) -> ChunkState:
        if self.is_ready(obj, n):
            return ChunkState.READY
        return ChunkState.ON_DISK if self.on_disk(obj, n) else ChunkState.MISSING

    def run_length(self, obj: CachedObject) -> int:
        """How many chunks of `obj` one coalesced GET fetches at most."""
        return self.runs.run_length(obj)

    def origin_first_byte(self) -> float | None:
        """The origin's least recent time to first byte (None: no GET yet)."""
        return self.store.counters.first_byte_floor()

    async def ensure_run(
        self,
        obj: CachedObject,
        chunks: list[int],
        priority: Priority = Priority.BACKGROUND,
        arrived: Arrived | None = None,
        wanted: Wanted | None = None,
    ) -> int:
        """Background work: load consecutive `chunks`, the missing ones in
        coalesced GETs (see runs.py). Returns how many came from the origin.
        With a shared tier, chunk by chunk (the tier is read per chunk).
        `arrived(n)`, if given, is called the moment chunk n is in memory,
        while it cannot have been evicted yet (see `ensure`); a chunk that
        `wanted` turns down when its turn comes is skipped."""
        if self.tier is not None or len(chunks) == 1 or obj.chunk_size > self.pool.slab_size:
            return sum(
                [
                    await self.ensure(obj, n, priority=priority, arrived=arrived)
                    for n in chunks
                    if wanted is None or wanted(n)
                ]
            )
        one = functools.partial(self.ensure, priority=priority, arrived=arrived)
        return await self.runs.ensure_run(
            obj,
            chunks,
            one,
            self._miss.store_run_chunk,
            priority=priority,
            arrived=arrived,
            wanted=wanted,
        )

    async def ensure(
        self,
        obj: CachedObject,
        n: int,
        *,
        priority: Priority = Priority.BACKGROUND,
        arrived: Arrived | None = None,
    ) -> bool:
        """Load chunk `n` into memory (and the disk cache), fetching it at
        most once; True when the bytes had to come from the origin. By
        default background work: it queues behind demand reads for a fetch
        slot, unless a reader starts waiting for it. `arrived(n)` runs while
        this call still holds the slab: once it lets go, the chunk is the
        memory cache's to drop (prefetch on open holds it there first)."""
        if self.is_ready(obj, n):
            if arrived is not None:
                arrived(n)  # in memory, or in flight: the caller looks which
            return False
        slab, from_origin = await self._miss.get(obj, n, priority)
        try:
            if arrived is not None:
                arrived(n)
        finally:
            self.pool.release(slab)
        return from_origin

    # -- eviction, for `modelfs cache` and tests -------------------------
    async def shrink_to(self, target: int) -> tuple[int, int]:
        return await self.space.shrink_to(target)

    async def drop(self, victims: list[Victim]) -> None:
        await self.space.drop(victims)

    # -- lifetime ----------------------------------------------------------
    async def settle(self, timeout: float) -> None:
        """Let coalesced GETs in progress finish and store what they
        fetched (readers got those chunks before they were on disk), for at
        most `timeout` seconds; start no new ones. Called at unmount, so a
        remount finds on disk everything this mount served."""
        self.runs.settling = True
        with trio.move_on_after(timeout):
            await self.stored()

    async def stored(self) -> None:
        """Return once no chunk that was fetched waits for its payload write
        and index commit."""
        while self.runs.running or self.states.storing_count:
            await trio.sleep(0.01)

    async def run_background(self, *, write_behind: bool = True) -> None:
        """Periodic chores and write-behind stores; runs until cancelled
        (call `settle` first). Without `write_behind` a reader waits for its
        chunk's write (`pull`: a Ctrl-C must not lose chunks already
        fetched). The shared tier's upload workers run here too."""
        async with trio.open_nursery() as nursery:
            self._miss.behind = nursery if write_behind else None
            try:
                if self.tier is not None:
                    nursery.start_soon(self.tier.run_uploads)
                while True:
                    await trio.sleep(TOUCH_FLUSH_INTERVAL)
                    try:
                        await self.writer.flush_touches()
                    except (OSError, lmdb.Error) as exc:
                        self.warn(exc)
                    except Exception:
                        log.exception("cannot record chunk recency in the index")
            finally:
                self._miss.behind = None

    def stats(self) -> CacheStats:
        return CacheStats(
            **self.index.stats(),
            capacity_bytes=self.capacity,
            prefetch_pending_bytes=self.ledger.pending_bytes,
            open_objects=len(self.objects),
            # Chunks fetched (or claimed by a coalesced GET) whose payload
            # write and index commit have not finished: 0 once everything a
            # reader got is on disk. Each chunk counts once.
            pending_writes=self.states.storing_count + self.runs.claimed,
            memory_bytes=self.pool.size,
            memory_cached_bytes=self.pool.cached_bytes,
            memory_overflow_chunks=self.pool.overflow_chunks,
            **vars(self.counters),
        )


class MissPath:
    """The miss path of one chunk, in one direction (memory → disk → range
    lock → disk → tier or origin → store), and the write-behind task that
    stores what was fetched after its readers have it. `ChunkCache` is its
    only caller; it calls only the parts below it."""

    def __init__(self, p: CacheParts, fetch_concurrency: int) -> None:
        self.states, self.pool, self.slots, self.chunks = p.states, p.pool, p.slots, p.chunks
        self.fetcher, self.objects, self.counters, self.ledger = (
            p.fetcher,
            p.objects,
            p.counters,
            p.ledger,
        )
        self.reserve = p.reserve
        self.fetch_concurrency = fetch_concurrency
        # Where stores of fetched chunks run after their readers got the
        # bytes; set while `ChunkCache.run_background` runs (else inline).
        self.behind: trio.Nursery | None = None

    async def get(self, obj: CachedObject, n: int, priority: Priority) -> tuple[Slab, bool]:
        """Chunk `n`'s slab, held for the caller, and whether its bytes came
        from the origin. Background work that has to load the chunk first
        waits for an idle slab, so readers always find one."""
        if priority != Priority.DEMAND and not self.states.ready((obj.obj_id, n)):
            await self.pool.wait_idle(self.reserve)
        key = (obj.obj_id, n)
        while True:
            slab = self.states.in_memory(key)
            if slab is not None:
                return slab, False
            flight = self.states.flight(key)
            if flight is not None:
                joined = await self.states.join(flight, priority)
                if joined is not None:
                    return joined
                continue  # an eviction, or an owner that was cancelled: look again
            ticket = Ticket(priority)
            flight = self.states.start(key, ticket)
            slab = None
            try:
                slab, flight.fetched = await self._load(obj, n, ticket)
                return slab, flight.fetched
            except BaseException as exc:
                flight.error = exc
                raise
            finally:
                self.states.end(key)
                flight.land(self.pool, slab)

    async def _load(self, obj: CachedObject, n: int, ticket: Ticket) -> tuple[Slab, bool]:
        """Chunk `n` from disk if it verifies, else from the tier or the
        origin (stored behind the reader), in a slab held for the caller.
        The fetch waits for a slot with `ticket`'s priority, which readers
        joining the flight raise."""
        key = (obj.obj_id, n)
        start, end = obj.chunk_span(n)
        slab = await self.chunks.load(obj, n, corrupt_is_news=True)
        if slab is not None:
            return slab, False
        self.counters.misses += 1
        locked = await self.chunks.range_lock(obj, n)
        handed_over = False
        try:
            # Another process may have stored it while we looked or waited.
            slab = await self.chunks.load(obj, n, corrupt_is_news=False)
            if slab is not None:
                self.counters.peer_chunks += 1
                return slab, False
            self.ledger.wasted(key)  # fetched ahead once, evicted before any read used it
            async with self.slots.held(ticket):
                slab, digest, share = await self.fetcher.fetch(obj, n)
            self.counters.fetched_chunks += 1
            if ticket.priority != Priority.DEMAND:  # no reader waited for it
                self.ledger.fetched(key, end - start)
            self.pool.publish(key, slab, end - start)
            self.states.begin_store(key, slab)
            self.pool.hold(slab)  # the store's hold
            self.objects.retain(obj)
            handed_over = True
            # Write-behind: the reader gets the bytes now. The backlog is
            # bounded: past it, the reader waits for the write as before (a
            # slow disk slows reads, not RAM).
            if self.behind is not None and self.states.storing_count <= self.fetch_concurrency:
                self.behind.start_soon(self._store, obj, n, slab, digest, share, locked)
            else:
                try:
                    await self._store(obj, n, slab, digest, share, locked)
                except BaseException:
                    self.pool.release(slab)  # the reader's hold: it gets nothing
                    raise
            return slab, True
        finally:
            if locked and not handed_over:
                self.chunks.unlock(obj, n)

    def store_run_chunk(
        self, obj: CachedObject, n: int, slab: Slab, digest: int, fallback: trio.Nursery
    ) -> None:
        """A chunk of a coalesced GET arrived (runs.py has begun its store
        and hands over its slab hold and range lock): store it behind."""
        self.objects.retain(obj)
        (self.behind or fallback).start_soon(self._store, obj, n, slab, digest, None, True)

    async def _store(
        self,
        obj: CachedObject,
        n: int,
        slab: Slab,
        digest: int,
        share: TierShare | None,
        locked: bool,
    ) -> None:
        """Store a fetched chunk that readers already have, then let go of
        everything handed over with it. The one `finally` always ends the
        storing state, shares the chunk with the tier or gives its lease
        back, releases the slab, the range lock and the object."""
        stored = completed = False
        try:
            stored = await self.chunks.store(obj, n, slab, digest)
            completed = True
        except Exception:
            # A bug here must not end the mount; the chunk is fetched again.
            log.exception("storing chunk %d of %s failed", n, obj.key)
        finally:
            if not stored:
                self.counters.uncached_chunks += 1
            if share is not None:
                if completed:
                    share.upload(slab.data, digest)
                else:
                    await share.give_back()
            self.states.end_store((obj.obj_id, n))
            self.pool.release(slab)
            if locked:
                self.chunks.unlock(obj, n)
            self.objects.close(obj)
