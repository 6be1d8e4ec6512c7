"""Object versions open in this process: one `CachedObject` per version,
shared by every handle on it, with its payload file and the chunk size it
is cut at (the one its cached chunks were recorded with, else the mount's).

Also keeps memory honest about chunk sizes: chunks in memory are keyed by
(object, chunk number), so an object opened at another size than its
chunks in memory were cut at drops those first (`_recut`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..store import ObjectVersion
from .counters import StorageWarning
from .index import CacheIndex
from .payload import PayloadFile, PayloadStore
from .pool import BufferPool


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

    @property
    def size(self) -> int:
        return self.version.size

    def chunk_span(self, n: int) -> tuple[int, int]:
        start = n * self.chunk_size
        return start, min(start + self.chunk_size, self.size)


class ObjectTable:
    def __init__(
        self, index: CacheIndex, payload: PayloadStore, pool: BufferPool, warn: StorageWarning
    ) -> None:
        self.index, self.payload, self.pool, self.warn = index, payload, pool, warn
        self._objects: dict[bytes, CachedObject] = {}
        # Objects whose chunks in memory were cut at a size other than the
        # pool's slab size (see `_recut`).
        self._cuts: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def open(self, key: str, version: ObjectVersion, chunk_size: int) -> CachedObject:
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
                self.warn(pf.error)
            obj = CachedObject(key, version, obj_id, chunk_size, pf, meta_bytes)
            self._objects[obj_id] = obj
        obj.handles += 1
        return obj

    def _recut(self, obj_id: bytes, chunk_size: int) -> None:
        """An object opened at another chunk size than its chunks in memory
        were cut at (its records were cleared or evicted meanwhile, so the
        mount's own size now applies) must not find those slabs, or chunk 1
        at 1 MiB would be served the bytes of chunk 1 at 256 KiB. Only
        objects cut at a size other than the pool's are remembered."""
        was = self._cuts.get(obj_id, self.pool.slab_size)
        if was != chunk_size:
            self.pool.forget_object(obj_id)
        if chunk_size == self.pool.slab_size:
            self._cuts.pop(obj_id, None)
        else:
            self._cuts[obj_id] = chunk_size

    @staticmethod
    def retain(obj: CachedObject) -> None:
        obj.handles += 1

    def close(self, obj: CachedObject) -> None:
        obj.handles -= 1
        if obj.handles == 0:
            del self._objects[obj.obj_id]
            self.payload.release(obj.obj_id)
