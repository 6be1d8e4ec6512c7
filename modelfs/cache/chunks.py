"""Chunks on disk as a mount uses them: verified reads into pool slabs, the
range lock that is the cross-process single flight, and `store` (the
payload write, then the record through the index writer's group commit).

It only stores and loads: whether a chunk is fetched, and from where, is
the coordinator's and the fetcher's business.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import lmdb
import trio

from . import disk
from .counters import CacheCounters, StorageWarning
from .index import CacheIndex, NewChunk
from .objects import CachedObject
from .pool import BufferPool, Slab
from .space import SpaceBudget
from .writer import IndexWriter

log = logging.getLogger(__name__)

# Another process fetching a chunk we want: poll its lock this often, and
# after PEER_WAIT fetch it ourselves (a stalled peer must not stall us).
PEER_POLL = 0.01
PEER_WAIT = 30.0
# Test hook: a path; the daemon touches it and stalls between a chunk's
# payload write and its index commit (kill -9 tests).
STALL_BEFORE_COMMIT_ENV = "MODELFS_TEST_STALL_BEFORE_COMMIT"

Hook = Callable[[CachedObject, int], Awaitable[None]]


def _stall_hook_from_env() -> Hook | None:
    path = os.environ.get(STALL_BEFORE_COMMIT_ENV)
    if not path:
        return None

    async def stall(obj: CachedObject, n: int) -> None:
        # tests/t3_mounted/test_crash.py: the payload is written, the index
        # does not know it; the test kills the daemon here.
        Path(path).touch()
        await trio.sleep_forever()

    return stall


class DiskChunks:
    def __init__(
        self,
        pool: BufferPool,
        index: CacheIndex,
        writer: IndexWriter,
        space: SpaceBudget,
        counters: CacheCounters,
        warn: StorageWarning,
        *,
        disk_concurrency: int = 8,
        before_commit: Hook | None = None,
    ) -> None:
        self.pool, self.index, self.writer, self.space = pool, index, writer, space
        self.counters, self.warn = counters, warn
        self.limiter = trio.CapacityLimiter(disk_concurrency)
        # Runs between a chunk's payload write and its record (tests pause
        # or stall a store there).
        self.before_commit = before_commit or _stall_hook_from_env()

    def on_disk(self, obj: CachedObject, n: int) -> bool:
        return self.index.get(obj.obj_id, n) is not None

    async def load(self, obj: CachedObject, n: int, *, corrupt_is_news: bool) -> Slab | None:
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
                disk.read_chunk, obj.file, slab.view, rec.length, start, limiter=self.limiter
            )
        except OSError as exc:
            self.pool.release(slab)
            self.warn(exc)
            return None
        except BaseException:
            self.pool.release(slab)
            raise
        if got == rec.length and digest == rec.checksum:
            self.counters.verified_chunks += 1
            log.debug("chunk %d of %s read from disk", n, obj.key)
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

    async def range_lock(self, obj: CachedObject, n: int) -> bool:
        """Take the chunk's range lock, the cross-process single flight:
        True when taken (the caller unlocks), False when another process
        held it past PEER_WAIT (the caller goes ahead without it)."""
        start, end = obj.chunk_span(n)
        pf = obj.file
        deadline = trio.current_time() + PEER_WAIT
        locked = pf.try_lock(start, end - start)
        while not locked and trio.current_time() < deadline:
            await trio.sleep(PEER_POLL)
            locked = pf.try_lock(start, end - start)
        if not locked:
            log.debug("bytes %d-%d of %s: another process holds them too long", start, end, obj.key)
        return locked

    @staticmethod
    def unlock(obj: CachedObject, n: int) -> None:
        start, end = obj.chunk_span(n)
        obj.file.unlock(start, end - start)

    async def store(self, obj: CachedObject, n: int, slab: Slab, digest: int) -> bool:
        """Write a fetched chunk to the cache: payload first, then its record
        (invariant 1). False, with the one storage warning, when the cache
        cannot take it (full disk, quota, read-only or vanished directory,
        full index): the chunk is then served from memory only."""
        data = slab.data
        try:
            await self.space.reserve(len(data))
        except OSError as exc:
            self.warn(exc)
            return False
        try:
            await trio.to_thread.run_sync(
                obj.file.pwrite, data, obj.chunk_span(n)[0], limiter=self.limiter
            )
            self.space.wrote(len(data))
            if self.before_commit is not None:
                await self.before_commit(obj, n)
            stored = await self.writer.record(
                NewChunk(obj.obj_id, n, len(data), digest, obj.meta, obj.chunk_size)
            )
            await self.space.after_store(len(data))
            return stored
        except (OSError, lmdb.Error) as exc:
            self.warn(exc)
            return False
        finally:
            self.space.release(len(data))
