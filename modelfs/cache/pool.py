"""The buffer pool: every chunk the daemon holds in memory lives in it.

One anonymous mapping of ``--memory-cache`` bytes, cut into slabs of one
chunk each, page-aligned and touched once (behind the start-up). A slab is
in turn the buffer a GET body is received into (``recv_into``), the buffer a disk
chunk is read into (O_DIRECT), the source of its payload write (O_DIRECT,
no bounce copy) and of the FUSE replies that read it. So the hot path
allocates no chunk-sized memory, and the daemon's RSS is the pool plus a
constant, whatever the number of files, readers or prefetches.

A slab is, at any time, in exactly one of three states:

* **free**: on the free list, holding nothing;
* **cached**: holding a verified chunk, in the LRU, with ``refs`` holders
  (readers replying from it, a payload write, a thread still receiving);
  with no holder it can be taken back for other bytes, oldest first;
* **lent**: taken (``key`` is None), being filled; ``refs`` counts the
  holders, and the slab returns to the free list when the last one lets go.

Only the trio thread calls into the pool; a worker thread that fills or
writes a slab holds a reference that is dropped back on the trio thread.
When every slab is held, a reader that must not wait gets an overflow slab
of its own (counted); background work waits for a slab instead. A filled
overflow slab is cached like the others while it has holders, never taken
back for other bytes, and dropped (and unmapped) with its last holder.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from collections import OrderedDict
from collections.abc import Hashable

import trio

PAGE = mmap.PAGESIZE
# madvise(MADV_POPULATE_WRITE), Linux 5.14: fault every page in at once.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class Slab:
    """One chunk-sized, page-aligned buffer."""

    __slots__ = ("view", "length", "refs", "key", "overflow")

    def __init__(self, view: memoryview, overflow: bool = False) -> None:
        self.view = view
        self.length = 0  # bytes of the chunk it holds
        self.refs = 0
        self.key: Hashable | None = None  # the chunk held (set once filled and verified)
        self.overflow = overflow

    @property
    def data(self) -> memoryview:
        return self.view[: self.length]


def _prefault(mm: mmap.mmap) -> None:
    """Touch every page ahead of the first receive: a first touch costs a
    page fault per page, and on a ballooned VM much more. Where the kernel
    has MADV_POPULATE_WRITE (Linux 5.14), which faults pages in without
    changing what they hold, it runs in a thread of its own, so the mount
    does not wait for it (50 ms per 128 MiB here, more on a VM whose memory
    the host took back); a slab used before its turn is faulted in by its
    first write, as it would be anyway. Older kernels get zeros written
    now, before any slab holds data."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE, 0, PAGE)
    except (OSError, ValueError):
        zero = bytes(1 << 20)
        for off in range(0, len(mm), len(zero)):
            n = min(len(zero), len(mm) - off)
            mm[off : off + n] = zero[:n]
        return

    def populate() -> None:
        # Through ctypes, not mm.madvise: the mmap module holds the GIL for
        # the whole call (50 ms per 128 MiB, the mount stalled behind it).
        # `pinned` exports the mapping, so it cannot be unmapped meanwhile.
        pinned = ctypes.c_char.from_buffer(mm)
        _libc.madvise(ctypes.addressof(pinned), len(mm), _MADV_POPULATE_WRITE)
        del pinned

    threading.Thread(target=populate, name="prefault", daemon=True).start()


class BufferPool:
    def __init__(self, total: int, slab_size: int) -> None:
        if slab_size % PAGE:
            raise ValueError(f"slab size {slab_size} is not a multiple of the page size")
        self.slab_size = slab_size
        count = max(1, total // slab_size)
        self._mm = mmap.mmap(-1, count * slab_size)
        _prefault(self._mm)
        whole = memoryview(self._mm)
        self.slabs = [Slab(whole[i * slab_size : (i + 1) * slab_size]) for i in range(count)]
        self._free = list(self.slabs)
        self._lru: OrderedDict[Hashable, Slab] = OrderedDict()
        self._busy = 0  # pool slabs with holders
        self._deferred: list[Slab] = []
        self._freed = trio.Event()
        self.overflow_chunks = 0

    @property
    def size(self) -> int:
        return len(self.slabs) * self.slab_size

    @property
    def idle(self) -> int:
        """Slabs that can be taken now: free, or cached with no holder."""
        return len(self.slabs) - self._busy

    @property
    def cached_bytes(self) -> int:
        return sum(s.length for s in self._lru.values())

    # -- chunks held ------------------------------------------------------
    def get(self, key: Hashable) -> Slab | None:
        """The cached slab of a chunk, with one more holder (the caller)."""
        slab = self._lru.get(key)
        if slab is not None:
            self._lru.move_to_end(key)
            self.hold(slab)
        return slab

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

    def publish(self, key: Hashable, slab: Slab, length: int) -> None:
        """A lent slab now holds the verified chunk `key` (`length` bytes):
        readers may find it. An older slab of the same chunk is dropped (it
        could hold the chunk as cut with another chunk size)."""
        self.forget(key)
        slab.length = length
        # An overflow slab is found like the others while it has holders (a
        # store, prefetch keeping it for a reader): invisible, it was read
        # back from disk while held in memory. It goes with its last holder.
        slab.key = key
        self._lru[key] = slab

    def forget(self, key: Hashable) -> None:
        """Drop a chunk from memory (evicted from disk, replaced); holders
        keep their bytes, the slab is freed after the last one."""
        slab = self._lru.pop(key, None)
        if slab is not None:
            slab.key = None
            if slab.refs == 0:
                self._give_back(slab)

    def forget_object(self, obj_id: bytes) -> None:
        """Forget every chunk of one object (keys are (object, chunk))."""
        for key in [k for k in self._lru if isinstance(k, tuple) and k[0] == obj_id]:
            self.forget(key)

    def clear(self) -> None:
        """Forget every chunk held in memory (readers' holds stay valid)."""
        for key in list(self._lru):
            self.forget(key)

    # -- holders ----------------------------------------------------------
    def hold(self, slab: Slab) -> None:
        if slab.refs == 0 and not slab.overflow:
            self._busy += 1
        slab.refs += 1

    def release(self, slab: Slab) -> None:
        slab.refs -= 1
        if slab.refs:
            return
        if slab.overflow:
            if slab.key is not None and self._lru.get(slab.key) is slab:
                del self._lru[slab.key]
            slab.key = None
        else:
            self._busy -= 1
            if slab.key is None:
                self._give_back(slab)
            else:
                self._wake()

    def release_after_reply(self, slab: Slab) -> None:
        """Let go once the caller's current task step has ended: a FUSE
        read returns a view of the slab, and pyfuse3 sends it in the same
        step. Any later step of any task may release it."""
        self._deferred.append(slab)

    def settle_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for slab in deferred:
            self.release(slab)

    # -- taking -----------------------------------------------------------
    def take(self, *, reserve: int = 0) -> Slab | None:
        """A slab to fill, held once by the caller, leaving at least
        `reserve` slabs idle; None when there is none."""
        self.settle_deferred()
        if self.idle <= reserve:
            return None
        if self._free:
            slab = self._free.pop()
        else:
            slab = next(s for s in self._lru.values() if s.refs == 0)
            del self._lru[slab.key]
            slab.key = None
        slab.length = 0
        self.hold(slab)
        return slab

    def take_or_overflow(self, size: int) -> Slab:
        """A slab for a reader that must not wait: from the pool, or, when
        every slab is held (or `size` is larger than a slab: an object cached
        with a larger chunk size), a mapping of its own, freed after use."""
        slab = self.take() if size <= self.slab_size else None
        if slab is None:
            rounded = -(-size // PAGE) * PAGE
            slab = Slab(memoryview(mmap.mmap(-1, rounded)), overflow=True)
            self.overflow_chunks += 1
            self.hold(slab)
        return slab

    async def wait_idle(self, reserve: int = 0) -> None:
        """Return once more than `reserve` slabs are idle."""
        while True:
            self.settle_deferred()
            if self.idle > reserve:
                return
            event = self._freed
            # Deferred releases are settled by a later step: look again soon
            # even if no release wakes us.
            with contextlib.suppress(trio.TooSlowError), trio.fail_after(0.05):
                await event.wait()

    def _give_back(self, slab: Slab) -> None:
        if slab.overflow:
            return  # not the pool's: freed with its last reference
        slab.length = 0
        self._free.append(slab)
        self._wake()

    def _wake(self) -> None:
        self._freed.set()
        self._freed = trio.Event()
