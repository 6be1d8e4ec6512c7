"""Coalesced GETs: background work (read-ahead, prefetch on open) fetches a
run of consecutive missing chunks in one GET of up to RUN_BYTES, into one
slab per chunk, and hands each chunk to its readers the moment it arrives.

A run takes its fetch slot first, then claims its chunks (a slab, a flight
and a range lock each, the locks only tried: no await in between), so no
reader waits on a claimed chunk whose GET has not started. The slot covers
the GET only: it is released when the GET ends, while the chunks' stores
(the coordinator's write-behind) may still run, so a slow disk never holds
GET slots (docs/chunk_cache.md). What a run needs of the coordinator is
passed in as two callables (`ensure_one`, `store_behind`); it never calls
the coordinator itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ..errors import CacheError
from .chunks import DiskChunks
from .counters import CacheCounters, PrefetchLedger
from .fetcher import Fetcher
from .objects import CachedObject
from .pool import BufferPool, Slab
from .slots import FetchSlots, Priority, Ticket
from .states import ChunkStates

# Background fetches of consecutive chunks are one GET of up to this many
# bytes: a server spends less CPU per byte on large GETs (the JuiceFS
# gateway: 1.66 s/GiB at 8 MiB, ~1.2 at 32-64 MiB).
RUN_BYTES = 32 << 20

EnsureOne = Callable[[CachedObject, int], Awaitable[bool]]
# (object, chunk, slab, checksum, fallback): store a fetched chunk behind
# its readers; the caller has begun its store state, holds the slab and the
# range lock for it, and hands all three over. `fallback` is where to run
# the store when no write-behind task runs (then the run waits for it).
StoreBehind = Callable[[CachedObject, int, Slab, int, trio.Nursery], None]
# Told the number of each chunk the moment it is in memory (a run's chunk as
# it arrives, before its store can end and leave it to eviction).
Arrived = Callable[[int], None]
# Asked of each chunk as its turn comes: whether it is still worth loading
# (prefetch on open: not if a reader has read it meanwhile, which left it in
# memory or on disk; loading it was a disk read for nobody).
Wanted = Callable[[int], bool]


class Runs:
    def __init__(
        self,
        states: ChunkStates,
        pool: BufferPool,
        slots: FetchSlots,
        fetcher: Fetcher,
        chunks: DiskChunks,
        counters: CacheCounters,
        ledger: PrefetchLedger,
        *,
        fetch_concurrency: int,
        reserve: int,
    ) -> None:
        self.states, self.pool, self.slots, self.fetcher = states, pool, slots, fetcher
        self.chunks, self.counters, self.ledger = chunks, counters, ledger
        self.fetch_concurrency = fetch_concurrency
        self.reserve = reserve
        self.settling = False  # shutting down: no new GETs
        self.running = 0  # coalesced GETs running
        self.claimed = 0  # chunks those GETs claimed and have not received yet

    @staticmethod
    def run_length(obj: CachedObject) -> int:
        """How many chunks of `obj` one coalesced GET fetches at most."""
        return max(1, RUN_BYTES // obj.chunk_size)

    async def ensure_run(
        self,
        obj: CachedObject,
        chunks: list[int],
        ensure_one: EnsureOne,
        store_behind: StoreBehind,
        *,
        priority: Priority = Priority.BACKGROUND,
        arrived: Arrived | None = None,
        wanted: Wanted | None = None,
    ) -> int:
        """Load consecutive `chunks`, fetching those missing everywhere in
        runs; chunks on disk (or that cannot be claimed) go one by one
        through `ensure_one` (which tells `arrived` itself). A chunk that
        `wanted` turns down when its turn comes is skipped. Returns how
        many came from the origin."""
        fetched, i = 0, 0
        while i < len(chunks):
            if wanted is not None and not wanted(chunks[i]):
                i += 1
                continue
            await self.pool.wait_idle(self.reserve)
            ticket = Ticket(priority)
            await self.slots.acquire(ticket)
            try:
                segment, slabs = self._claim(obj, chunks[i:])
                if segment:
                    fetched += await self._fetch(obj, segment, slabs, store_behind, arrived)
            finally:
                self.slots.release()
            if segment:
                i += len(segment)
                continue
            if not self.states.ready((obj.obj_id, chunks[i])):
                # On disk, a peer has its lock, or no slab: one at a time.
                fetched += await ensure_one(obj, chunks[i])
            i += 1
        return fetched

    def _claim(self, obj: CachedObject, chunks: list[int]) -> tuple[list[int], list[Slab]]:
        """The leading chunks of `chunks` that are consecutive, not ready,
        not on disk, and whose range locks this process could take now,
        with a slab taken for each; for each, a flight is registered and
        the lock is held. No await: nothing can change in between."""
        segment: list[int] = []
        slabs: list[Slab] = []
        if self.settling:
            return segment, slabs
        # A run takes what is left of --fetch-concurrency chunks after the
        # other runs and the single-chunk GETs, and at least one chunk: the
        # chunk buffers being received stay under twice --fetch-concurrency
        # however many files are fetched ahead.
        allowed = self.fetch_concurrency - self.claimed - self.fetcher.single_gets
        for n in chunks[: min(self.run_length(obj), max(1, allowed))]:
            if segment and n != segment[-1] + 1:
                break
            key = (obj.obj_id, n)
            if self.states.ready(key) or self.chunks.on_disk(obj, n):
                break
            slab = self.pool.take(reserve=self.reserve)
            if slab is None:
                break
            start, end = obj.chunk_span(n)
            if not obj.file.try_lock(start, end - start):
                self.pool.release(slab)
                break
            self.states.start(key)
            # Fetched ahead once, evicted (by any process) before any read
            # used it: that fetch was wasted.
            self.ledger.wasted(key)
            segment.append(n)
            slabs.append(slab)
        return segment, slabs

    async def _fetch(
        self,
        obj: CachedObject,
        segment: list[int],
        slabs: list[Slab],
        store_behind: StoreBehind,
        told: Arrived | None,
    ) -> int:
        """One GET for the claimed `segment`; each chunk is handed to its
        flight as it arrives and its store begins at once (under its range
        lock, so other processes find it on disk when they get the lock)."""
        first = segment[0]
        lengths = [obj.chunk_span(n)[1] - obj.chunk_span(n)[0] for n in segment]
        self.counters.misses += len(segment)
        left = set(range(len(segment)))

        def arrived(i: int, digest: int) -> None:
            n, slab = first + i, slabs[i]
            key = (obj.obj_id, n)
            left.discard(i)
            self.claimed -= 1
            self.pool.publish(key, slab, lengths[i])
            self.states.begin_store(key, slab)  # our hold goes with it
            self.states.end(key).land(self.pool, slab)
            self.ledger.fetched(key, lengths[i])
            self.counters.fetched_chunks += 1
            store_behind(obj, n, slab, digest, fallback)
            if told is not None:
                told(n)

        self.running += 1
        self.claimed += len(segment)
        error: BaseException | None = None
        try:
            async with trio.open_nursery() as fallback:
                try:
                    await self.fetcher.run(obj, first * obj.chunk_size, slabs, lengths, arrived)
                except Exception as exc:
                    error = exc
        finally:
            self.running -= 1
            self.claimed -= len(left)
            failure = error or CacheError(f"{obj.key}: fetch ended early")
            for i in left:
                n = first + i
                flight = self.states.end((obj.obj_id, n))
                flight.error = failure
                flight.land(self.pool, None)
                self.pool.release(slabs[i])
                self.chunks.unlock(obj, n)
        if left:
            raise failure
        return len(segment)
