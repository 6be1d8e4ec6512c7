"""The cache's space budget: how much it may hold (--cache-size), the free
space it leaves (--min-free-space), and eviction to keep both.

Eviction never touches a chunk this process is using (`ChunkStates.busy`:
pinned by a read, being loaded, or being stored), claims its victims in
memory before leaving the trio thread, and then runs `disk.evict` as the
index writer: range locks are only tried, under the writer (lock order in
docs/chunk_cache.md). Used by a mount and by `modelfs cache gc|clear|verify
--repair`, which run it without an origin (`ChunkStates` None).
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import trio

from ..config import format_size
from . import directory, disk
from .counters import CacheCounters, PrefetchLedger
from .index import Victim
from .payload import PayloadStore
from .pool import BufferPool
from .states import ChunkStates
from .writer import IndexWriter

log = logging.getLogger(__name__)

# The free space seen by statvfs is trusted this long (less what we wrote),
# except within FREE_MARGIN of the --min-free-space guard, where every store
# asks again (other processes may be filling the disk).
FREE_REFRESH = 0.5
FREE_MARGIN = 1 << 30


class SpaceBudget:
    def __init__(
        self,
        root: Path,
        writer: IndexWriter,
        payload: PayloadStore,
        alone: Callable[[], bool],
        counters: CacheCounters,
        *,
        capacity: int,
        min_free: int,
        states: ChunkStates | None = None,
        pool: BufferPool | None = None,
        ledger: PrefetchLedger | None = None,
    ) -> None:
        self.root = root
        self.writer = writer
        self.payload = payload
        self.alone = alone
        self.counters = counters
        self.capacity = capacity
        self.min_free = min_free
        self.states, self.pool, self.ledger = states, pool, ledger
        self.reserved = 0  # bytes of chunks being stored
        self._free_seen, self._free_at, self._written = 0, -math.inf, 0

    # -- storing -----------------------------------------------------------
    async def reserve(self, incoming: int) -> None:
        """Room for `incoming` more bytes (counted as reserved until
        `release`), or OSError(ENOSPC) when the free-space guard cannot be
        met (the disk is full of other things)."""
        self.reserved += incoming
        try:
            if not await self._make_room(incoming):
                raise OSError(
                    errno.ENOSPC,
                    f"less than --min-free-space ({format_size(self.min_free)}) free",
                )
        except BaseException:
            self.reserved -= incoming
            raise

    def wrote(self, length: int) -> None:
        """Bytes written since the last statvfs (the estimate subtracts them)."""
        self._written += length

    def release(self, incoming: int) -> None:
        self.reserved -= incoming

    async def after_store(self, length: int) -> None:
        """Several chunks are stored at once (write-behind, coalesced GETs);
        when every older chunk was in use as room was made, the cache went
        over its size: evict again now that reads moved on."""
        over = self.writer.used - self.capacity
        if over > 0:
            await self.evict(over, over + 64 * length)

    async def _make_room(self, incoming: int) -> bool:
        # `reserved` counts every chunk being stored, this one included.
        over = self.writer.used + self.reserved - self.capacity
        short = 0
        if self.min_free:
            short = self.min_free + self.reserved - await self._free()
            if short > -FREE_MARGIN:
                # Near the guard the estimate is not good enough: another
                # process may have written since the last statvfs.
                short = self.min_free + self.reserved - await self._free(exact=True)
        need = max(over, short)
        if need > 0:
            # Ask for some slack: busy chunks are skipped.
            await self.evict(need, need + 64 * incoming)
        return short <= 0 or await self._free(exact=True) >= self.min_free + self.reserved

    async def _free(self, *, exact: bool = False) -> int:
        """Free bytes on the cache's filesystem: a statvfs at most every
        FREE_REFRESH seconds (or when `exact`), less what this process
        wrote since."""
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

    # -- eviction ----------------------------------------------------------
    async def shrink_to(self, target: int) -> tuple[int, int]:
        """Evict least-recently-used chunks until at most `target` bytes are
        cached (busy chunks are kept). Returns (chunks, bytes) evicted."""
        self.writer.used = self.writer.index.used()
        over = self.writer.used - target
        if over <= 0:
            return 0, 0
        return await self.evict(over, over)

    async def evict(self, over: int, ask: int) -> tuple[int, int]:
        await self.writer.flush_touches()
        candidates = await self.writer.run(self.writer.index.oldest, ask)
        victims = []
        freed = 0
        for v in candidates:
            if self.states is not None and self.states.busy((v.obj_id, v.chunk)):
                continue
            victims.append(v)
            freed += v.length
            if freed >= over:
                break
        if not victims:
            log.debug("cache over capacity by %d bytes, every old chunk is in use", over)
            return 0, 0
        done = await self.remove(victims)
        freed = sum(v.length for v in done)
        log.debug("evicted %d chunks (%d bytes)", len(done), freed)
        return len(done), freed

    async def drop(self, victims: list[Victim]) -> None:
        """Forget chunks found bad on disk (``modelfs cache verify --repair``)."""
        states = self.states
        await self.remove([v for v in victims if not (states and states.busy((v.obj_id, v.chunk)))])

    async def remove(self, victims: list[Victim]) -> list[Victim]:
        """Evict chunks; returns those evicted (another process fetching or
        evicting one keeps it)."""
        keys = [(v.obj_id, v.chunk) for v in victims]
        for key in keys:
            self.writer.forget(key)
            if self.pool is not None:
                self.pool.forget(key)
            if self.ledger is not None:
                self.ledger.wasted(key)
        # Claimed before leaving the trio thread: a reader that wants one now
        # waits for the eviction, then loads it again.
        flights = self.states.claim(keys) if self.states is not None else {}
        try:
            done = await self.writer.run(
                disk.evict, self.writer.index, self.payload, victims, self.alone
            )
        finally:
            if self.states is not None:
                self.states.unclaim(flights)
        self.counters.evicted_chunks += len(done)
        self.counters.evicted_bytes += sum(v.length for v in done)
        self.writer.used = max(0, self.writer.used - sum(v.length for v in done))
        return done
