"""The chunk cache: object bytes fetched once, kept on disk and in memory,
verified on every disk read. One module per part (docs/chunk_cache.md):

* ``directory``   the cache directory: vetting, format file, lock file, defaults;
* ``index``       the LMDB index of cached chunks, recency and space used;
* ``writer``      the index's one writer in a process: group commit, recency;
* ``payload``     payload files (one sparse file per object version) and the
  byte-range locks that are the cross-process single flight;
* ``disk``        chunks on disk: read and verify, evict (shared with
  ``modelfs cache verify``/``gc``);
* ``chunks``      a mount's disk side: verified loads, range locks, store;
* ``space``       the space budget and eviction;
* ``pool``        the buffer pool, which is also the memory cache;
* ``slots``       fetch slots and priorities;
* ``states``      chunk states in one process (in flight, storing, pinned);
* ``objects``     open object versions;
* ``fetcher``     tier, then origin, into pool slabs; ``runs`` coalesced GETs;
* ``counters``    counters, the read-ahead ledger, the storage warning;
* ``coordinator`` `ChunkCache`, which walks the miss path.
"""

from .coordinator import Buffer, ChunkCache
from .objects import CachedObject
from .slots import Priority
from .states import ChunkState

__all__ = ["Buffer", "CachedObject", "ChunkCache", "ChunkState", "Priority"]
