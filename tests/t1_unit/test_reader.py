"""Unit tier: `modelfs.reader`, one open handle pinned to one version."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from modelfs.cache import ChunkCache
from modelfs.errors import ObjectChanged
from modelfs.reader import OpenFile
from modelfs.testing.memory import MemoryStore

from ..data import pattern

CS = 64 * 1024


def test_a_handle_that_saw_its_object_change_never_reads_again(tmp_path: Path) -> None:
    store = MemoryStore()
    v = store.put("k", pattern(1, 0, 3 * CS))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)

    async def main() -> None:
        h = OpenFile(1, 2, cache.open_object("k", v, CS), cache)
        assert bytes(await h.read(0, 10)) == pattern(1, 0, 10)
        store.put("k", pattern(2, 0, 3 * CS))  # If-Match now fails: 412
        with pytest.raises(ObjectChanged):
            await h.read(CS, 10)
        assert h.stale
        with pytest.raises(ObjectChanged):
            await h.read(0, 10)  # chunk 0 is still cached: refused all the same
        h.close()

    trio.run(main)
    cache.close()
