"""The one writer of the index in this process: group commit of stored
chunks, recency, and the bytes recorded.

LMDB has one writer at a time anyway; every write of this process goes
through `IndexWriter.limiter` (capacity 1), in a worker thread, so the
trio thread never waits on an `fdatasync`. Reads of the index (a lock-free
lookup in a memory map) stay with their callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from .counters import CacheCounters, ChunkKey
from .index import CacheIndex, NewChunk

T = TypeVar("T")


@dataclass
class _Commit:
    chunk: NewChunk
    done: trio.Event = field(default_factory=trio.Event)
    stored: bool = False
    error: Exception | None = None


class IndexWriter:
    def __init__(self, index: CacheIndex, counters: CacheCounters) -> None:
        self.index = index
        self.counters = counters
        self.limiter = trio.CapacityLimiter(1)
        self.used = index.used()  # kept in memory: refreshed by each commit and eviction
        self._commits: list[_Commit] = []
        self._committing = False
        self._touched: dict[ChunkKey, None] = {}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread, as this process's index writer."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- group commit ------------------------------------------------------
    async def record(self, chunk: NewChunk) -> bool:
        """Record a chunk whose payload is written: chunks stored meanwhile
        wait and go into the next transaction together, so the index's
        commit and fdatasync are paid once per batch. The first to find no
        commit running commits, shielded from cancellation so no waiter is
        left without one. False: the index refused it (another chunk size)."""
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
            results, self.used = await self.run(self.index.put_many, [e.chunk for e in batch])
            for e, stored in zip(batch, results, strict=True):
                e.stored = stored
            self.counters.index_commits += 1
        except Exception as exc:
            for e in batch:
                e.error = exc
        finally:
            for e in batch:
                e.done.set()

    # -- recency -----------------------------------------------------------
    def touch(self, key: ChunkKey) -> None:
        """A read used the chunk: recorded with the next flush, never per read."""
        self._touched[key] = None

    def forget(self, key: ChunkKey) -> None:
        self._touched.pop(key, None)

    async def flush_touches(self) -> None:
        if self._touched:
            keys = list(self._touched)
            self._touched.clear()
            await self.run(self.index.touch, keys)

    def flush_touches_sync(self) -> None:
        if self._touched:
            self.index.touch(list(self._touched))
            self._touched.clear()
