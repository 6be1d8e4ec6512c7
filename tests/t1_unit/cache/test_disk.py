"""cache.disk: the checksum the index records, whichever way it is computed."""

from __future__ import annotations

import ctypes.util
import mmap

import pytest
import xxhash

from modelfs.cache import disk

from ...data import pattern


def test_checksum_matches_the_xxhash_module_for_every_kind_of_buffer() -> None:
    data = pattern(5, 0, 3 << 20)
    m = mmap.mmap(-1, len(data))
    m[:] = data
    view = memoryview(m)
    for buf in (data, bytearray(data), view, view[7 : (1 << 20) + 3], view[:100], b""):
        assert disk.checksum(buf) == xxhash.xxh3_64_intdigest(buf)
    view.release()


def test_the_system_libxxhash_is_used_where_it_exists() -> None:
    """Where apt's libxxhash is installed (every Debian/Ubuntu), chunk
    checksums run through it with the GIL released."""
    if ctypes.util.find_library("xxhash") is None:
        pytest.skip("no libxxhash on this machine")
    assert disk._xxh3 is not None
