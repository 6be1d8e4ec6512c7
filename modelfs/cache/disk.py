"""Chunks on disk: reading one back and checking it, recording one written,
evicting some. The rules every process sharing a cache directory follows
(the mount's coordinator and ``modelfs cache verify``/``gc`` alike):

* a chunk is read whole and checked against the xxh3-64 its index record
  holds before any byte of it is used;
* a chunk's payload is written before its index record (so the index never
  claims bytes that are not in the file), and its record is removed before
  its hole is punched;
* whoever writes or evicts a chunk holds its byte range's OFD lock, so
  another process that wants the chunk waits and then finds it on disk.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from typing import cast

import xxhash

from .index import CacheIndex, Victim
from .payload import DIRECT_ALIGN, PayloadFile, PayloadStore


def _native_xxh3() -> Callable[[int, int], int] | None:
    """XXH3-64 from the system's libxxhash (apt itself depends on it), called
    through ctypes, which releases the GIL for the call: hashing an 8 MiB
    chunk (~1.3 ms) then stalls no FUSE reply. Used only if it agrees with
    the xxhash module, whose digests the index holds."""
    try:
        lib = ctypes.CDLL("libxxhash.so.0")
        fn = lib.XXH3_64bits
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_size_t]
    probe = bytearray(range(256)) * 300
    addr = ctypes.addressof(ctypes.c_char.from_buffer(probe))
    if fn(addr, len(probe)) != xxhash.xxh3_64_intdigest(probe):
        return None
    return cast(Callable[[int, int], int], fn)


_xxh3 = _native_xxh3()
_NATIVE_MIN = 64 << 10  # below this the ctypes call costs more than the GIL


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The xxh3-64 the index records for a chunk."""
    if _xxh3 is not None and len(data) >= _NATIVE_MIN:
        try:
            anchor = ctypes.c_char.from_buffer(data)  # writable buffers only
        except (TypeError, ValueError):
            pass
        else:
            try:
                return _xxh3(ctypes.addressof(anchor), len(data))
            finally:
                del anchor
    return xxhash.xxh3_64_intdigest(data)


def read_chunk(pf: PayloadFile, buf: memoryview, length: int, offset: int) -> tuple[int, int]:
    """Read a chunk into `buf` (page-aligned, with room for `length`
    rounded up to a block): (bytes read, their checksum). Runs in a worker
    thread, checksum included."""
    got = pf.read_into(buf, length, offset, aligned=True)
    return got, checksum(buf[:got])


def chunk_ok(pf: PayloadFile, v: Victim, digest: int, chunk_size: int) -> bool:
    """Whether chunk `v` in `pf` has the bytes its record says (`modelfs
    cache verify`: a scratch buffer of its own per chunk)."""
    rounded = -(-v.length // DIRECT_ALIGN) * DIRECT_ALIGN
    with mmap.mmap(-1, max(rounded, DIRECT_ALIGN)) as scratch:
        view = memoryview(scratch)
        try:
            got, sum_ = read_chunk(pf, view, v.length, v.chunk * chunk_size)
        finally:
            view.release()
    return got == v.length and sum_ == digest


# A victim with its payload file (None: there is none) and chunk size
# (0: the object's record is gone).
_Locked = tuple[Victim, "PayloadFile | None", int]


def evict(
    index: CacheIndex, payload: PayloadStore, victims: list[Victim], alone: Callable[[], bool]
) -> list[Victim]:
    """Lock each victim's range (skipping those another process holds),
    remove the records, punch the holes, unlock."""
    locked: list[_Locked] = []
    files: dict[bytes, tuple[PayloadFile | None, int]] = {}
    try:
        for v in victims:
            pf, cs = _payload_of(index, payload, files, v.obj_id)
            if pf is not None and cs and not pf.try_lock(v.chunk * cs, v.length):
                continue
            locked.append((v, pf, cs))
        empty = index.remove([v for v, _, _ in locked])
        for v, pf, cs in locked:
            if pf is not None and cs:
                payload.punch(pf, v.chunk * cs, v.length)
    finally:
        _unlock(payload, locked, files)
    # Another process may have the file open and be about to store into
    # it; unlinking it would strand those bytes. Empty files are left to
    # a later eviction or `modelfs cache gc` that runs alone.
    if empty and alone():
        for obj_id in empty:
            payload.remove(obj_id)
    return [v for v, _, _ in locked]


def _payload_of(
    index: CacheIndex,
    payload: PayloadStore,
    files: dict[bytes, tuple[PayloadFile | None, int]],
    obj_id: bytes,
) -> tuple[PayloadFile | None, int]:
    """An object's payload file (acquired once per eviction) and chunk size."""
    if obj_id not in files:
        meta = index.object_meta(obj_id)
        chunk_size = int(meta["chunk_size"]) if meta else 0  # type: ignore[call-overload]
        try:
            files[obj_id] = (payload.acquire(obj_id, create=False), chunk_size)
        except FileNotFoundError:
            files[obj_id] = (None, chunk_size)
    return files[obj_id]


def _unlock(
    payload: PayloadStore,
    locked: list[_Locked],
    files: dict[bytes, tuple[PayloadFile | None, int]],
) -> None:
    for v, pf, cs in locked:
        if pf is not None and cs:
            pf.unlock(v.chunk * cs, v.length)
    for obj_id, (pf, _) in files.items():
        if pf is not None:
            payload.release(obj_id)
