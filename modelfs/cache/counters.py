"""What the chunk cache counts and reports: its counters, the ledger of
chunks fetched ahead of readers (used or wasted), and the one warning a
mount gives when the cache cannot be written.

Every part of the cache counts into the one `CacheCounters` it is given;
`ChunkCache.stats` turns it into the typed `CacheStats` snapshot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

ChunkKey = tuple[bytes, int]

log = logging.getLogger(__name__)


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


class PrefetchLedger:
    """Chunks fetched from the origin by background work (read-ahead,
    prefetch on open) that no read has used yet. A read that uses one
    counts it used; an eviction or a fetch again before any read counts it
    wasted."""

    def __init__(self, counters: CacheCounters) -> None:
        self._counters = counters
        self._pending: dict[ChunkKey, int] = {}

    def fetched(self, key: ChunkKey, length: int) -> None:
        self._pending[key] = length
        self._counters.prefetch_fetched_bytes += length

    def used(self, key: ChunkKey) -> None:
        self._counters.prefetch_used_bytes += self._pending.pop(key, 0)

    def wasted(self, key: ChunkKey) -> None:
        self._counters.prefetch_wasted_bytes += self._pending.pop(key, 0)

    @property
    def pending_bytes(self) -> int:
        return sum(self._pending.values())


class StorageWarning:
    """The one warning per mount that the cache cannot be written (a full
    disk flaps as the LRU frees space: once is enough)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.warned = False

    def __call__(self, exc: BaseException) -> None:
        if self.warned:
            return
        self.warned = True
        log.warning(
            "cannot write to the cache in %s (%s); serving reads from the origin "
            "without caching while it cannot",
            self.root,
            exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
        )
