"""Unit tier: the chunk cache's write-behind and the races around it
(issue 22's defects), each paused at a named moment with the cache's
`before_commit` hook: between a chunk's payload write and its record."""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from modelfs.cache import CachedObject, ChunkCache
from modelfs.fs import Operations
from modelfs.namespace import ROOT_INODE, Namespace
from modelfs.store import ObjectVersion
from modelfs.testing.memory import MemoryStore, MemoryTier
from modelfs.tier import SharedTier

from ...data import pattern

CS = 64 * 1024


class Gate:
    """A `before_commit` hook that holds every store there until opened."""

    def __init__(self) -> None:
        self.reached = 0
        self._arrived: trio.Event | None = None
        self._open: trio.Event | None = None

    async def __call__(self, obj: CachedObject, n: int) -> None:
        if self._open is None:
            self._open = trio.Event()
        self.reached += 1
        if self._arrived is not None:
            self._arrived.set()
        await self._open.wait()

    async def wait_for(self, count: int) -> None:
        while self.reached < count:
            self._arrived = trio.Event()
            await self._arrived.wait()

    def open(self) -> None:
        if self._open is None:
            self._open = trio.Event()
        self._open.set()


def _payload_path(root: Path, version: ObjectVersion) -> Path:
    ident = version.identity().hex()
    return root / "data" / ident[:2] / ident  # the on-disk format (architecture.md)


async def _with_background(cache: ChunkCache, body: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.run_background)
        await body()
        await cache.stored()
        nursery.cancel_scope.cancel()


# -- defect 1 ---------------------------------------------------------------------
@pytest.mark.allow_log("failed its checksum")
def test_evict_race_eviction_skips_a_chunk_being_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk found corrupt is fetched again and stored behind its reader.
    An eviction that runs between that store's payload write and its
    record must skip the chunk: evicting its old record punches a hole
    under the new bytes, and the new record then names the hole."""
    store = MemoryStore()
    v = store.put("m.bin", pattern(7, 0, 4 * CS))
    root = tmp_path / "c"
    cache = ChunkCache(root, store, chunk_size=CS, capacity=1 << 30)
    trio.run(_read_once, cache, v)
    cache.close()
    with open(_payload_path(root, v), "r+b") as f:
        f.write(b"\xff")  # chunk 0 is now corrupt on disk
    gate = Gate()
    cache = ChunkCache(root, store, chunk_size=CS, capacity=1 << 30, before_commit=gate)
    evicted: list[tuple[int, int]] = []

    async def body() -> None:
        await _read_once(cache, v)  # corrupt: fetched again, stored behind
        await gate.wait_for(1)  # its payload is written, its record is not
        evicted.append(await cache.shrink_to(0))
        gate.open()

    trio.run(_with_background, cache, body)
    cache.close()
    assert evicted == [(0, 0)], "a chunk being stored was evicted"
    gets = len(store.get_log)
    cache = ChunkCache(root, store, chunk_size=CS, capacity=1 << 30)
    trio.run(_read_once, cache, v)
    cache.close()
    assert len(store.get_log) == gets, "the stored chunk was not on disk"
    corrupt = [r for r in caplog.records if "failed its checksum" in r.getMessage()]
    assert len(corrupt) == 1, "the new record named a hole"


async def _read_once(cache: ChunkCache, v: ObjectVersion) -> None:
    obj = cache.open_object("m.bin", v, CS)
    try:
        assert bytes(await cache.read(obj, 0, CS)) == pattern(7, 0, CS)
    finally:
        cache.close_object(obj)


# -- defect 2 ---------------------------------------------------------------------
def test_a_cancelled_store_gives_its_tier_lease_back(tmp_path: Path) -> None:
    """A store cancelled mid-way (Ctrl-C in pull, settle's timeout at
    unmount) must give the tier lease back at once: other nodes would wait
    out --shared-cache-lease for a chunk this node will never upload."""
    store, tier = MemoryStore(), MemoryTier()
    v = store.put("m.bin", pattern(8, 0, 2 * CS))
    gate = Gate()
    shared = SharedTier(tier, "t", "origin", lease=30.0)
    cache = ChunkCache(
        tmp_path / "a", store, chunk_size=CS, capacity=1 << 30, tier=shared, before_commit=gate
    )
    leases_while_storing: list[list[str]] = []

    async def main() -> None:
        obj = cache.open_object("m.bin", v, CS)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                # No write-behind (as in pull): the read waits for its store.
                nursery.start_soon(cache.read, obj, 0, CS)
                await gate.wait_for(1)
                leases_while_storing.append([k for k in tier.objects if k.endswith(".lease")])
                scope.cancel()
        cache.close_object(obj)

    trio.run(main)
    cache.close()
    assert len(leases_while_storing[0]) == 1  # the test means something
    assert [k for k in tier.objects if k.endswith(".lease")] == []


# -- defects 3 and 4 ------------------------------------------------------------------
def _gated_cache(tmp_path: Path, store: MemoryStore, gate: Gate, concurrency: int) -> ChunkCache:
    return ChunkCache(
        tmp_path / "c",
        store,
        chunk_size=CS,
        capacity=1 << 30,
        fetch_concurrency=concurrency,
        memory_cache=32 * CS,
        before_commit=gate,
    )


def test_pending_writes_counts_each_chunk_of_a_run_once(tmp_path: Path) -> None:
    """While a coalesced run's chunks are being stored, `pending_writes`
    counts each once (it counted them twice: storing, and claimed)."""
    store = MemoryStore()
    v = store.put("m.bin", pattern(9, 0, 8 * CS))
    gate = Gate()
    cache = _gated_cache(tmp_path, store, gate, concurrency=4)
    seen: list[int] = []

    async def body() -> None:
        obj = cache.open_object("m.bin", v, CS)
        try:
            assert await cache.ensure_run(obj, [0, 1, 2, 3]) == 4
            await gate.wait_for(4)  # all four written, none recorded
            seen.append(cache.stats().pending_writes)
            gate.open()
        finally:
            cache.close_object(obj)

    trio.run(_with_background, cache, body)
    assert cache.stats().pending_writes == 0
    cache.close()
    assert seen == [4]


def test_a_run_frees_its_fetch_slot_when_its_get_ends(tmp_path: Path) -> None:
    """The slot covers the GET (docs/chunk_cache.md), not the chunks' disk
    writes: with one slot and every store held at the gate, run after run
    still gets its GET (each waited for its stores before, holding the only
    slot, so the second never started)."""
    store = MemoryStore()
    v = store.put("m.bin", pattern(9, 0, 8 * CS))
    gate = Gate()
    cache = _gated_cache(tmp_path, store, gate, concurrency=1)

    async def body() -> None:
        obj = cache.open_object("m.bin", v, CS)
        try:
            with trio.fail_after(20):  # a slot held by a held store never frees
                assert await cache.ensure_run(obj, [0, 1]) == 2
                assert await cache.ensure_run(obj, [2, 3]) == 2
                await gate.wait_for(4)  # all four stores held at once
            gate.open()
        finally:
            cache.close_object(obj)

    trio.run(_with_background, cache, body)
    cache.close()
    assert [start // CS for _, start, _ in store.get_log] == [0, 1, 2, 3]


# -- defect 5 ---------------------------------------------------------------------------
class _ThreadRecordingCache(ChunkCache):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.scanned_in: list[str] = []

    def version_cached_bytes(self, version: ObjectVersion) -> int:
        self.scanned_in.append(threading.current_thread().name)
        return super().version_cached_bytes(version)


def test_cached_xattr_scans_the_index_in_a_worker_thread(tmp_path: Path) -> None:
    """`user.modelfs.cached` scans the object's records in LMDB, as long as
    the object is big: never on the trio thread that answers every request."""
    store = MemoryStore()
    store.put("w.bin", pattern(10, 0, 3 * CS))
    cache = _ThreadRecordingCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    ops = Operations(Namespace(store, "", 60), cache, chunk_size=CS, uid=0, gid=0, ttl=60)

    async def main() -> bytes:
        f = await ops.lookup(ROOT_INODE, b"w.bin", None)  # type: ignore[arg-type]
        return await ops.getxattr(f.st_ino, b"user.modelfs.cached", None)  # type: ignore[arg-type]

    trio_thread = threading.current_thread().name
    assert trio.run(main) == b"0"
    cache.close()
    assert cache.scanned_in and trio_thread not in cache.scanned_in


def test_payload_path_helper_matches_the_cache(tmp_path: Path) -> None:
    """The tests above corrupt payload files by path: the path is right."""
    store = MemoryStore()
    v = store.put("m.bin", pattern(7, 0, 4 * CS))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    trio.run(_read_once, cache, v)
    cache.close()
    assert os.path.getsize(_payload_path(tmp_path / "c", v)) >= CS
