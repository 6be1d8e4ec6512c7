"""The chunk cache: object bytes fetched once, kept on disk and in memory,
verified on every disk read. One module per part (docs/chunk_cache.md):

* ``directory``   the cache directory: vetting, format file, lock file, defaults;
* ``index``       the LMDB index of cached chunks, recency and space used;
* ``payload``     payload files (one sparse file per object version) and the
  byte-range locks that are the cross-process single flight;
* ``disk``        chunks on disk: read and verify, evict (shared with
  ``modelfs cache verify``/``gc``);
* ``pool``        the buffer pool, which is also the memory cache;
* ``slots``       fetch slots and priorities;
* ``coordinator`` `ChunkCache`, which walks the miss path.
"""

from .coordinator import Buffer, CachedObject, ChunkCache, ChunkState
from .slots import Priority

__all__ = ["Buffer", "CachedObject", "ChunkCache", "ChunkState", "Priority"]
