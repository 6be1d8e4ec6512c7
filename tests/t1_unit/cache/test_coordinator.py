"""Unit tier: the chunk cache over an in-memory store (no S3, no FUSE)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfs.cache import CachedObject, ChunkCache
from modelfs.cache.payload import PayloadFile
from modelfs.errors import CacheFormatError, ObjectChanged, StoreError
from modelfs.store import ObjectVersion
from modelfs.testing.memory import MemoryStore, SlowStore

from ...data import pattern

CS = 64 * 1024  # chunk size for these tests


def _read(cache: ChunkCache, key: str, version: ObjectVersion, off: int, size: int) -> bytes:
    async def main() -> bytes:
        obj = cache.open_object(key, version, CS)
        try:
            return await cache.read(obj, off, size)
        finally:
            cache.close_object(obj)

    return trio.run(main)


def test_reads_are_exact_and_fetch_each_chunk_once(tmp_path: Path) -> None:
    store = MemoryStore()
    data = pattern(1, 0, 10 * CS + 77)
    v = store.put("m/x.bin", data)
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)

    @settings(
        max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(st.integers(0, len(data) + 5), st.integers(0, 3 * CS))
    def check(off: int, size: int) -> None:
        assert _read(cache, "m/x.bin", v, off, size) == data[off : off + size]

    check()
    fetched = [(s, e) for _, s, e in store.get_log]
    assert len(fetched) == len(set(fetched)) <= 11
    assert all(s % CS == 0 and (e - s == CS or e == len(data)) for s, e in fetched)
    cache.close()


def test_concurrent_readers_share_one_get(tmp_path: Path) -> None:
    store = SlowStore()
    data = pattern(2, 0, 3 * CS)
    v = store.put("k", data)
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    results: list[bytes] = []

    async def main() -> None:
        obj = cache.open_object("k", v, CS)
        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(lambda i=i: _collect(cache, obj, i))
        cache.close_object(obj)

    async def _collect(cache: ChunkCache, obj, i: int) -> None:  # type: ignore[no-untyped-def]
        results.append(await cache.read(obj, CS + i * 100, 4096))

    trio.run(main)
    assert len(results) == 10
    assert store.get_log == [("k", CS, 2 * CS)]
    cache.close()


def test_failed_get_reaches_every_waiter_and_is_retried(tmp_path: Path) -> None:
    store = SlowStore()
    v = store.put("k", pattern(3, 0, CS))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    store.fail_next = StoreError("boom")
    errors: list[BaseException] = []

    async def one(obj) -> None:  # type: ignore[no-untyped-def]
        try:
            await cache.read(obj, 0, 10)
        except StoreError as exc:
            errors.append(exc)

    async def main() -> None:
        obj = cache.open_object("k", v, CS)
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one, obj)
        assert await cache.read(obj, 0, 10) == pattern(3, 0, 10)
        cache.close_object(obj)

    trio.run(main)
    assert len(errors) == 3
    cache.close()


def _filled_and_reopened(
    tmp_path: Path, seed: int, nchunks: int, damage: Callable[[Path], None] | None = None
) -> tuple[MemoryStore, ObjectVersion, bytes, ChunkCache]:
    """Cache a whole object, close the cache, optionally damage the payload,
    reopen: what a remount sees. The store's GET log starts empty."""
    store = MemoryStore()
    data = pattern(seed, 0, nchunks * CS)
    v = store.put("k", data)
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    assert _read(cache, "k", v, 0, len(data)) == data
    ident = v.identity().hex()
    path = tmp_path / "c" / "data" / ident[:2] / ident  # the on-disk layout
    cache.close()
    if damage is not None:
        damage(path)
    store.get_log.clear()
    return store, v, data, ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)


def test_reopened_cache_fetches_nothing(tmp_path: Path) -> None:
    store, v, data, cache = _filled_and_reopened(tmp_path, 4, 5)
    assert _read(cache, "k", v, 0, len(data)) == data
    assert store.get_log == []
    assert cache.stats().verified_chunks == 5
    cache.close()


@pytest.mark.allow_log("failed its checksum")
@pytest.mark.parametrize("damage", ["flip", "hole"])
def test_damaged_payload_is_detected_and_refetched(tmp_path: Path, damage: str) -> None:
    def harm(path: Path) -> None:
        with open(path, "r+b") as f:
            if damage == "flip":
                f.seek(CS + 10)
                b = f.read(1)
                f.seek(CS + 10)
                f.write(bytes([b[0] ^ 0xFF]))
            else:  # what a power loss can leave: the index says present, the bytes are gone
                f.truncate(CS)

    store, v, data, cache = _filled_and_reopened(tmp_path, 5, 3, harm)
    assert _read(cache, "k", v, 0, len(data)) == data
    assert cache.stats().corrupt_chunks == (1 if damage == "flip" else 2)
    assert len(store.get_log) == cache.stats().corrupt_chunks
    cache.close()


def test_eviction_keeps_disk_use_under_capacity(tmp_path: Path) -> None:
    store = MemoryStore()
    versions = {f"f{i}": store.put(f"f{i}", pattern(10 + i, 0, 3 * CS)) for i in range(5)}
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=4 * CS)
    for key, v in versions.items():
        assert _read(cache, key, v, 0, 3 * CS) == pattern(int(key[1:]) + 10, 0, 3 * CS)
        assert cache.stats().used_bytes <= 4 * CS
    assert cache.stats().evicted_chunks >= 11
    disk = sum(
        p.stat().st_blocks * 512 for p in (tmp_path / "c" / "data").rglob("*") if p.is_file()
    )
    assert disk <= 4 * CS
    # Fully evicted objects leave no file behind.
    assert len([p for p in (tmp_path / "c" / "data").rglob("*") if p.is_file()]) <= 2
    # LRU: the most recent object is still cached, the first was evicted.
    store.get_log.clear()
    _read(cache, "f4", versions["f4"], 2 * CS, 10)
    assert store.get_log == []
    _read(cache, "f0", versions["f0"], 0, 10)
    assert store.get_log == [("f0", 0, CS)]
    cache.close()


def test_same_content_under_two_keys_is_fetched_once(tmp_path: Path) -> None:
    store = MemoryStore()
    data = pattern(6, 0, 2 * CS)
    va, vb = store.put("a", data), store.put("b", data)
    # ETag and size match; the mtime differs and does not matter.
    assert va.identity() == vb.identity()
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    assert _read(cache, "a", va, 0, len(data)) == data
    assert _read(cache, "b", vb, 0, len(data)) == data
    assert [k for k, _, _ in store.get_log] == ["a", "a"]
    cache.close()


def test_new_version_gets_new_chunks(tmp_path: Path) -> None:
    store = MemoryStore()
    v1 = store.put("k", pattern(7, 0, 2 * CS))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    assert _read(cache, "k", v1, 0, 10) == pattern(7, 0, 10)
    v2 = store.put("k", pattern(8, 0, 2 * CS))
    # The pinned old version: its cached chunk is still served, a missing one
    # cannot be fetched from the changed object.
    assert _read(cache, "k", v1, 0, 10) == pattern(7, 0, 10)
    with pytest.raises(ObjectChanged):
        _read(cache, "k", v1, CS, 10)
    assert _read(cache, "k", v2, 0, 2 * CS) == pattern(8, 0, 2 * CS)
    assert cache.stats().objects == 2  # the old version waits for eviction
    cache.close()


def test_a_read_over_several_failing_chunks_raises_the_domain_error(tmp_path: Path) -> None:
    store = MemoryStore()
    v1 = store.put("k", pattern(7, 0, 3 * CS))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    store.put("k", pattern(8, 0, 3 * CS))
    # Chunks 1 and 2 are fetched in parallel and both fail: the caller gets
    # ObjectChanged (ESTALE), as from a one-chunk read, not an exception group.
    with pytest.raises(ObjectChanged):
        _read(cache, "k", v1, CS + 5, CS)
    cache.close()


def test_chunk_size_of_cached_object_is_kept(tmp_path: Path) -> None:
    store, v, data, cache = _filled_and_reopened(tmp_path, 9, 4)

    async def main() -> bytes:
        obj = cache.open_object("k", v, 4 * CS)  # asks for another chunk size
        assert obj.chunk_size == CS
        return await cache.read(obj, 0, len(data))

    assert trio.run(main) == data and store.get_log == []
    cache.close()


def test_cache_dir_format(tmp_path: Path) -> None:
    store = MemoryStore()
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    cache.close()
    assert oct((tmp_path / "c").stat().st_mode & 0o777) == oct(0o700)
    (tmp_path / "c" / "modelfs-cache.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(CacheFormatError, match="format 2"):
        ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    # The lock was released on the failed open.
    (tmp_path / "c" / "modelfs-cache.json").write_text(json.dumps({"format": 1}))
    ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30).close()


def test_recent_chunks_are_served_from_memory_within_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryStore()
    data = pattern(11, 0, 4 * CS)
    v = store.put("k", data)
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, memory_cache=2 * CS)
    for n in range(4):
        assert _read(cache, "k", v, n * CS, CS) == data[n * CS : (n + 1) * CS]
    assert cache.stats().memory_cached_bytes == 2 * CS
    preads: list[tuple[int, int]] = []
    real = PayloadFile.read_into

    def spy(self: PayloadFile, buf: memoryview, n: int, off: int, *, aligned: bool) -> int:
        preads.append((n, off))
        return real(self, buf, n, off, aligned=aligned)

    monkeypatch.setattr(PayloadFile, "read_into", spy)
    # The two most recent chunks are answered from memory, the older from the
    # file: read whole, so its checksum can be checked, then kept in memory.
    assert _read(cache, "k", v, 2 * CS + 5, CS) == data[2 * CS + 5 : 3 * CS + 5]
    assert preads == []
    assert _read(cache, "k", v, 10, 10) == data[10:20]
    assert _read(cache, "k", v, 30, 10) == data[30:40]
    assert preads == [(CS, 0)]
    cache.close()


@pytest.mark.allow_log("failed its checksum")
def test_corruption_during_a_mount_is_caught_on_the_next_disk_read(tmp_path: Path) -> None:
    """Every read from disk is checked, not only the first one of a mount."""
    store = MemoryStore()
    data = pattern(12, 0, 4 * CS)
    v = store.put("k", data)
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, memory_cache=CS)
    assert _read(cache, "k", v, 0, len(data)) == data
    assert _read(cache, "k", v, 0, 10) == data[:10]  # chunk 0 from disk, verified
    assert len(store.get_log) == 4
    path = next((tmp_path / "c" / "data").glob("*/*"))
    with open(path, "r+b") as f:
        f.seek(5)
        f.write(bytes([data[5] ^ 1]))
    assert _read(cache, "k", v, 2 * CS, 10) == data[2 * CS : 2 * CS + 10]  # pushes chunk 0 out
    assert _read(cache, "k", v, 0, 10) == data[:10]
    assert cache.stats().corrupt_chunks == 1
    assert store.get_log[4:] == [("k", 0, CS)]
    cache.close()


def test_two_caches_on_one_directory_fetch_each_chunk_once(tmp_path: Path) -> None:
    """Two users of one cache directory (as two mounts would be): a chunk one
    is fetching is waited for by the other and read from disk, not fetched
    again; eviction by one never hands the other a wrong byte."""
    store = SlowStore(delay=0.05)
    data = pattern(13, 0, 8 * CS + 5)
    v = store.put("k", data)
    a = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    b = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    assert not a.alone() and not b.alone()

    async def main() -> list[bytes]:
        oa, ob = a.open_object("k", v, CS), b.open_object("k", v, CS)
        out: list[bytes] = [b"", b"", b""]

        async def reader(i: int, cache: ChunkCache, obj: CachedObject, step: int) -> None:
            parts = []
            for off in range(0, len(data), step):
                parts.append(bytes(await cache.read(obj, off, step)))
            out[i] = b"".join(parts)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 0, a, oa, CS // 2)
            nursery.start_soon(reader, 1, b, ob, CS // 3)
            nursery.start_soon(reader, 2, b, ob, 3 * CS)
        # b evicts everything; a then reads chunks it no longer has in memory.
        a.pool.clear()
        assert await b.shrink_to(0) == (9, len(data))
        out.append(bytes(await a.read(oa, 0, len(data))))
        a.close_object(oa)
        b.close_object(ob)
        return out

    assert all(got == data for got in trio.run(main))
    # 9 chunks the first time, 9 after the eviction; none twice in between.
    assert sorted(store.get_log[:9]) == [
        ("k", n * CS, min((n + 1) * CS, len(data))) for n in range(9)
    ]
    assert len(store.get_log) == 18
    assert a.counters.peer_chunks + b.counters.peer_chunks > 0
    b.close()
    assert a.alone()
    a.close()


def test_parallel_writes_to_one_payload_file_open_one_direct_descriptor(tmp_path: Path) -> None:
    """Chunks of one file are written from several threads at once; the
    O_DIRECT descriptor is opened once and closed with the file."""
    import os
    import threading

    from modelfs.cache.payload import PayloadStore

    store = PayloadStore(tmp_path)
    pf = store.acquire(b"\x01" * 16)
    data = bytes(range(256)) * 4096  # 1 MiB
    import mmap

    slab = mmap.mmap(-1, len(data))  # writes come from page-aligned pool slabs
    slab[:] = data
    before = len(os.listdir("/proc/self/fd"))
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        pf.pwrite(memoryview(slab), i * len(data))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(os.listdir("/proc/self/fd")) <= before + 1
    store.release(b"\x01" * 16)
    assert len(os.listdir("/proc/self/fd")) < before
    with open(store.path_of(b"\x01" * 16), "rb") as f:
        assert f.read() == data * 8


def test_a_demand_miss_is_served_before_its_write_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-behind: with the background tasks running, a read of a missing
    chunk returns as soon as the bytes arrived; the payload write and the
    index commit follow. Meanwhile the chunk is never fetched again, and the
    index names it only once it is written."""
    store = MemoryStore()
    data = pattern(9, 0, 3 * CS)
    v = store.put("k", data)
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, memory_cache=CS)
    # Payload writes (run in worker threads) wait for the gate.
    gate = threading.Event()
    real_pwrite = PayloadFile.pwrite

    def held_pwrite(self: PayloadFile, data: memoryview, offset: int) -> None:
        assert gate.wait(60)
        real_pwrite(self, data, offset)

    monkeypatch.setattr(PayloadFile, "pwrite", held_pwrite)
    out: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.run_background)
            await trio.sleep(0)
            obj = cache.open_object("k", v, CS)
            assert bytes(await cache.read(obj, 0, 100)) == data[:100]  # while the write waits
            out["recorded_while_held"] = cache.on_disk(obj, 0)
            # Pushed out of the one-chunk memory cache by chunk 1, still
            # unwritten: served from the pending write, not fetched again.
            assert bytes(await cache.read(obj, CS, 100)) == data[CS : CS + 100]
            assert bytes(await cache.read(obj, 0, CS)) == data[:CS]
            out["gets_while_held"] = len(store.get_log)
            gate.set()
            await cache.stored()
            out["recorded_after"] = cache.on_disk(obj, 0)
            cache.close_object(obj)
            nursery.cancel_scope.cancel()

    trio.run(main)
    cache.close()
    assert out["recorded_while_held"] is False
    assert out["gets_while_held"] == 2
    assert out["recorded_after"] is True


def test_chunks_stored_together_share_one_index_commit(tmp_path: Path) -> None:
    """Group commit: chunks whose payload writes finish while a commit runs
    go into the next transaction together; every one is recorded."""
    store = MemoryStore()
    data = pattern(14, 0, 32 * CS)
    v = store.put("k", data)
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.run_background)
            obj = cache.open_object("k", v, CS)
            assert bytes(await cache.read(obj, 0, len(data))) == data
            await cache.stored()
            cache.close_object(obj)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert cache.version_cached_bytes(v) == len(data)
    assert 1 <= cache.stats().index_commits <= 16
    cache.close()


def test_the_default_size_is_what_the_disk_holds_above_the_free_space_guard(
    tmp_path: Path,
) -> None:
    """No cap: a 140 GB model must fit on a disk that holds it."""
    import shutil

    cache = ChunkCache(tmp_path / "c", MemoryStore(), chunk_size=CS, min_free=1 << 30)
    expected = shutil.disk_usage(tmp_path).free - (1 << 30)
    assert abs(cache.capacity - expected) < 64 << 20
    cache.close()
