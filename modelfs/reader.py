"""Open-file handles: one per FUSE open, pinned to one object version.

A handle owns its pinned `CachedObject` and its staleness: once the store
reports that the object changed (HTTP 412), every later read on the handle
fails with `ObjectChanged`, even for chunks still cached, so one handle never
returns bytes of two versions. Read-ahead is delegated to the object's shared `Prefetcher`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import Buffer, CachedObject, ChunkCache
from .errors import ObjectChanged
from .prefetch import OpenPrefetch, ReadAhead


@dataclass
class OpenFile:
    fh: int
    inode: int
    obj: CachedObject
    cache: ChunkCache
    readahead: ReadAhead | None = None
    open_prefetch: OpenPrefetch | None = None
    stale: bool = False
    stale_warned: bool = False  # the one warning of a stale handle was logged

    async def read(self, offset: int, size: int) -> Buffer:
        if self.stale:
            raise ObjectChanged(f"{self.obj.key} changed since it was opened")
        whole = self.open_prefetch is not None and self.open_prefetch.paces(self.obj)
        if self.readahead is not None and not whole:
            # Issued before the demand read, so both proceed in parallel.
            self.readahead.on_read(self.obj, offset, size)
        try:
            data = await self.cache.read(self.obj, offset, size)
        except ObjectChanged:
            self.stale = True
            raise
        if self.open_prefetch is not None:
            # Told once the bytes are in memory: a chunk read in part is kept
            # there for the rest of it (see prefetch._Lead.on_read).
            self.open_prefetch.on_read(self.obj, offset, size)
        return data

    def close(self) -> None:
        self.cache.close_object(self.obj)
