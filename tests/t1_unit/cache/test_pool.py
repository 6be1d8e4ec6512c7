"""Unit tier: `modelfs.cache.pool`, the buffer pool that is also the memory cache."""

from __future__ import annotations

import mmap
import threading

import pytest
import trio

from modelfs.cache.pool import BufferPool

SLAB = 4 * mmap.PAGESIZE


def test_a_slab_is_free_lent_or_cached_and_holders_keep_it() -> None:
    pool = BufferPool(4 * SLAB, SLAB)
    assert pool.idle == 4
    slab = pool.take()
    assert slab is not None and pool.idle == 3
    slab.view[:3] = b"abc"
    pool.publish(("o", 0), slab, 3)
    assert ("o", 0) in pool and pool.cached_bytes == 3
    got = pool.get(("o", 0))
    assert got is slab and bytes(got.data) == b"abc"
    pool.forget(("o", 0))  # evicted from disk: gone from memory...
    assert ("o", 0) not in pool and pool.get(("o", 0)) is None
    assert bytes(slab.data) == b"abc"  # ...but its holders keep the bytes
    pool.release(slab)
    pool.release(slab)
    assert pool.idle == 4


def test_an_idle_cached_slab_is_taken_back_oldest_first() -> None:
    pool = BufferPool(2 * SLAB, SLAB)
    for n in range(2):
        s = pool.take()
        assert s is not None
        pool.publish(("o", n), s, 1)
        pool.release(s)
    assert pool.get(("o", 1)) is not None  # 1 is now the most recent, and held
    again = pool.take()
    assert again is not None
    assert ("o", 0) not in pool and ("o", 1) in pool  # the oldest idle one went


def test_take_leaves_the_reserve_and_readers_get_overflow() -> None:
    pool = BufferPool(4 * SLAB, SLAB)
    held = [pool.take(reserve=2) for _ in range(2)]
    assert all(held) and pool.take(reserve=2) is None
    rest = [pool.take() for _ in range(2)]
    assert all(rest) and pool.idle == 0
    extra = pool.take_or_overflow(SLAB)  # a reader never waits
    assert extra.overflow and pool.overflow_chunks == 1
    big = pool.take_or_overflow(3 * SLAB)  # an object cut at a larger size
    assert big.overflow and len(big.view) >= 3 * SLAB


def test_forget_object_drops_only_that_objects_chunks() -> None:
    pool = BufferPool(4 * SLAB, SLAB)
    for key in ((b"a", 0), (b"a", 1), (b"b", 0)):
        s = pool.take()
        assert s is not None
        pool.publish(key, s, 1)
        pool.release(s)
    pool.forget_object(b"a")
    assert (b"a", 0) not in pool and (b"a", 1) not in pool and (b"b", 0) in pool


def test_wait_idle_returns_when_a_holder_lets_go() -> None:
    pool = BufferPool(SLAB, SLAB)

    async def main() -> None:
        slab = pool.take()
        assert slab is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.wait_idle)
            await trio.sleep(0.01)
            pool.release(slab)
        assert pool.idle == 1

    trio.run(main)


def test_a_slab_size_must_be_whole_pages() -> None:
    with pytest.raises(ValueError):
        BufferPool(SLAB, SLAB + 1)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_the_pool_is_faulted_in_by_a_thread_that_leaves_the_gil() -> None:
    """The mount goes on while the pool's pages are faulted in: the main
    thread runs Python code (and sees the RSS half grown) while the
    prefault thread is in the kernel. mmap.madvise holds the GIL throughout,
    so the main thread saw only "before" and "after"."""
    size = 1 << 30
    before = _rss()
    pool = BufferPool(size, 8 << 20)
    seen: list[int] = []
    while any(t.name == "prefault" and t.is_alive() for t in threading.enumerate()):
        seen.append(_rss() - before)
    assert any(64 << 20 < grown < size - (64 << 20) for grown in seen), seen[:5] + seen[-5:]
    assert _rss() - before >= size - (16 << 20), "the pool was not faulted in whole"
    assert pool.size == size


def test_held_overflow_evict_race() -> None:
    """A chunk fetched into an overflow slab (every pool slab held) is found
    by readers while anyone holds it: prefetch kept one for its reader, and
    the reader, not finding it, read it back from disk. With its last
    holder it goes, and is never taken back for other bytes."""
    pool = BufferPool(2 * SLAB, SLAB)
    held = [pool.take(), pool.take()]
    extra = pool.take_or_overflow(SLAB)
    assert extra.overflow
    pool.publish(("o", 7), extra, SLAB)
    kept = pool.get(("o", 7))  # prefetch keeps it for the reader
    assert kept is extra
    pool.release(extra)  # the fetch's own hold ends
    assert pool.get(("o", 7)) is extra  # the reader finds it
    pool.release(extra)
    for slab in held:
        assert slab is not None
        pool.release(slab)
    assert pool.take() is not extra and pool.take() is not extra
    pool.release(kept)  # the last holder: it goes
    assert ("o", 7) not in pool
    assert pool.take() is None  # both pool slabs are lent; nothing else
