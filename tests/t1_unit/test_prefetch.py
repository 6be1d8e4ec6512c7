"""Unit tier: read-ahead over the chunk cache with an in-memory store."""

from __future__ import annotations

import json
import random
import struct
import threading
import time
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from modelfs import prefetch
from modelfs.cache import CachedObject, ChunkCache
from modelfs.errors import StoreError
from modelfs.prefetch import (
    SEEK_TOLERANCE,
    OpenPrefetch,
    ReadAhead,
    chunk_order,
    safetensors_order,
)
from modelfs.reader import OpenFile
from modelfs.store import ObjectVersion
from modelfs.testing.memory import MemoryStore, SlowStore

from ..data import pattern

CS = 64 * 1024
SIZE = 64 * CS


def _read_through(
    cache: ChunkCache,
    v: ObjectVersion,
    seed: int,
    offsets: list[tuple[int, int]],
    max_window: int = 16 * CS,
    size: int = SIZE,
) -> dict[str, object]:
    """Reads through one handle with read-ahead on; what read-ahead did."""
    out: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ra = ReadAhead(
                cache,
                nursery.start_soon,
                max_chunks_in_flight=6,
                initial_window=2 * CS,
                max_window=max_window,
            )
            obj = cache.open_object("k", v, CS)
            h = OpenFile(1, 2, obj, cache, ra)
            for off, n in offsets:
                assert await h.read(off, n) == pattern(seed, off, min(size, off + n))
                await trio.sleep(0.001)  # let read-ahead run, as between FUSE requests
            await trio.sleep(0.1)
            streams = ra.streams(obj)
            out["streams"] = len(streams)
            out["window"] = max((window for _, window in streams), default=0)
            out["issued"] = ra.budget.issued_chunks
            h.close()

    trio.run(main)
    return out


def _run(
    tmp_path: Path,
    offsets: list[tuple[int, int]],
    max_window: int = 16 * CS,
    size: int = SIZE,
    store: MemoryStore | None = None,
) -> dict[str, object]:
    store = store or MemoryStore()
    v = store.put("k", pattern(1, 0, size))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, fetch_concurrency=8)
    out = _read_through(cache, v, 1, offsets, max_window, size)
    out["gets"] = list(store.get_log)
    out["requests"] = list(store.requests)
    out["cache"] = cache
    cache.close()
    return out


def test_sequential_reader_is_read_ahead_and_nothing_is_fetched_twice(tmp_path: Path) -> None:
    reads = [(off, 16 * 1024) for off in range(0, SIZE, 16 * 1024)]
    out = _run(tmp_path, reads)
    gets = out["gets"]
    assert len(gets) == len(set(gets)) == SIZE // CS  # each chunk exactly once
    assert out["issued"] >= SIZE // CS - 4  # nearly all came from read-ahead
    assert out["window"] == 16 * CS  # the window grew to its maximum


def test_out_of_order_faults_keep_one_stream(tmp_path: Path) -> None:
    reads = []
    for base in range(0, 32 * CS, 4 * 16 * 1024):
        block = [base + i * 16 * 1024 for i in range(4)]
        random.Random(base).shuffle(block)  # faults arrive slightly out of order
        reads += [(o, 16 * 1024) for o in block]
    out = _run(tmp_path, reads)
    assert out["streams"] == 1
    assert out["issued"] > 0


def test_interleaved_readers_get_separate_streams(tmp_path: Path) -> None:
    a = [(off, 16 * 1024) for off in range(0, 16 * CS, 16 * 1024)]
    far = 4 * SEEK_TOLERANCE
    b = [(far + off, 16 * 1024) for off in range(0, 16 * CS, 16 * 1024)]
    reads = [r for pair in zip(a, b, strict=True) for r in pair]  # two TP ranks, one file
    out = _run(tmp_path, reads, size=2 * far)
    assert out["streams"] == 2
    gets = out["gets"]
    assert len(gets) == len(set(gets))


def test_random_reads_issue_no_read_ahead(tmp_path: Path) -> None:
    rng = random.Random(3)
    size = 32 * SEEK_TOLERANCE
    offsets: list[int] = []
    while len(offsets) < 12:  # farther apart than the seek tolerance
        o = rng.randrange(0, size - 4096)
        if all(abs(o - p) > 2 * SEEK_TOLERANCE for p in offsets):
            offsets.append(o)
    out = _run(tmp_path, [(o, 4096) for o in offsets], size=size)
    assert out["issued"] == 0
    wanted = {n for o in offsets for n in range(o // CS, (o + 4095) // CS + 1)}
    assert sorted(s // CS for _, s, _ in out["gets"]) == sorted(wanted)


def test_read_ahead_can_be_turned_off(tmp_path: Path) -> None:
    reads = [(off, 16 * 1024) for off in range(0, 8 * CS, 16 * 1024)]
    out = _run(tmp_path, reads, max_window=0)
    assert out["issued"] == 0 and len(out["gets"]) == 8


def test_warm_read_ahead_loads_each_chunk_from_disk_once(tmp_path: Path) -> None:
    """A window larger than the memory cache: chunks already on disk are
    loaded ahead only within half of the memory cache, so none is pushed
    out before the reader gets to it (and read and checked twice)."""
    store = MemoryStore()
    v = store.put("k", pattern(2, 0, SIZE))
    counts: list[int] = []
    reads = [(off, 16 * 1024) for off in range(0, SIZE, 16 * 1024)]

    def one_pass(memory: int) -> None:
        cache = ChunkCache(
            tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, memory_cache=memory
        )
        _read_through(cache, v, 2, reads)
        counts.append(cache.stats().verified_chunks)
        cache.close()

    one_pass(2 * SIZE)  # cold: everything fetched and stored
    one_pass(4 * CS)  # warm, with a memory cache a quarter of the window
    assert len(store.get_log) == SIZE // CS
    assert counts == [0, SIZE // CS]


def test_sequential_read_ahead_coalesces_chunks_into_large_gets(tmp_path: Path) -> None:
    """Consecutive missing chunks are one GET (read-ahead's budget allows 6
    chunks here), each byte still fetched once."""
    reads = [(off, 16 * 1024) for off in range(0, SIZE, 16 * 1024)]
    out = _run(tmp_path, reads)
    requests = out["requests"]
    assert isinstance(requests, list)
    spans = sorted((s, e) for _, s, e in requests)
    assert sum(e - s for s, e in spans) == SIZE  # every byte once...
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # ...no overlap
    assert max(e - s for s, e in spans) >= 4 * CS  # and GETs of several chunks
    assert len(requests) < SIZE // CS


class _FailsMidRun(MemoryStore):
    """Fails the first multi-chunk GET after delivering two chunks."""

    failed = False

    def get_into(self, key, version, start, bufs, deliver=None):  # type: ignore[no-untyped-def]
        if self.failed or len(bufs) <= 2:
            return super().get_into(key, version, start, bufs, deliver)
        self.failed = True
        s = start
        for i in range(2):
            bufs[i][:] = self.objects[key][0][s : s + len(bufs[i])]
            self.get_log.append((key, s, s + len(bufs[i])))
            s += len(bufs[i])
            deliver(i)
        raise StoreError("connection reset mid-body")


def test_a_run_failing_midway_keeps_what_arrived_and_refetches_the_rest(tmp_path: Path) -> None:
    store = _FailsMidRun()
    reads = [(off, 16 * 1024) for off in range(0, SIZE, 16 * 1024)]
    out = _run(tmp_path, reads, store=store)  # every read still byte-exact
    assert store.failed
    gets = out["gets"]
    assert isinstance(gets, list)
    # The two chunks that arrived are not fetched again; the rest of that
    # run is, once (by the reader or the next read-ahead).
    assert len(gets) == len(set(gets)) == SIZE // CS


class _Gauge(MemoryStore):
    """Records the most bytes any moment's GETs were asked for at once."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.most = 0

    def get_into(self, key, version, start, bufs, deliver=None):  # type: ignore[no-untyped-def]
        size = sum(len(b) for b in bufs)
        self.now += size
        self.most = max(self.most, self.now)
        try:
            time.sleep(0.01)  # long enough for the others to start theirs
            return super().get_into(key, version, start, bufs, deliver)
        finally:
            self.now -= size


def test_coalesced_gets_keep_chunks_in_flight_within_fetch_concurrency(tmp_path: Path) -> None:
    """Many files fetched ahead at once: runs shrink so that the chunk
    buffers being received stay under twice --fetch-concurrency chunks,
    however many files there are (without the budget: 4 runs of 16)."""
    store = _Gauge()
    versions = [store.put(f"f{i}", pattern(40 + i, 0, SIZE)) for i in range(6)]
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, fetch_concurrency=4)

    async def main() -> None:
        objs = [cache.open_object(f"f{i}", v, CS) for i, v in enumerate(versions)]
        async with trio.open_nursery() as nursery:
            for obj in objs:
                for first in range(0, SIZE // CS, 16):
                    nursery.start_soon(cache.ensure_run, obj, list(range(first, first + 16)))
        for obj in objs:
            cache.close_object(obj)

    trio.run(main)
    cache.close()
    assert len(store.get_log) == 6 * SIZE // CS  # everything, once
    assert max(e - s for _, s, e in store.requests) > CS  # still coalesced
    assert store.most <= 2 * 4 * CS, store.most / CS


# -- prefetch on open ----------------------------------------------------------
def test_safetensors_order_is_by_name() -> None:
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        }
    ).encode()
    assert safetensors_order(header, 100, 116) == [(108, 116), (100, 108)]
    assert safetensors_order(b"not json", 100, 116) == []
    assert safetensors_order(b'{"a": {"data_offsets": "x"}}', 100, 116) == []


def test_safetensors_order_refuses_offsets_outside_the_object() -> None:
    """A header is input from the bucket: offsets past the object, negative,
    reversed, floats or absurd numbers give no order (sequential then)."""
    for offsets in ([0, 1e18], [0, 10**18], [0, 17], [-8, 8], [8, 0], [0.0, 8.0], [True, 8]):
        header = json.dumps({"a": {"data_offsets": offsets}}).encode()
        assert safetensors_order(header, 100, 116) == [], offsets
    deep = b"[" * 100_000 + b"]" * 100_000
    assert safetensors_order(deep, 100, 116) == []
    assert safetensors_order(b'{"a": {"data_offsets": [0, ' + b"9" * 5000 + b"]}}", 100, 116) == []


def _naive_order(spans: list[tuple[int, int]], cs: int, size: int) -> list[int]:
    nchunks = -(-size // cs)
    order: dict[int, None] = {}
    for start, end in spans:
        for n in range(start // cs, (max(end, start + 1) - 1) // cs + 1):
            order.setdefault(min(n, nchunks - 1))
    for n in range(nchunks):
        order.setdefault(n)
    return list(order)


@given(
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 800)), max_size=30),
    st.integers(1, 700),
    st.integers(1, 6000),
)
def test_chunk_order_matches_the_plain_definition(
    raw: list[tuple[int, int]], cs: int, size: int
) -> None:
    spans = [(min(s, size - 1), min(s + n, size)) for s, n in raw]
    assert chunk_order(spans, cs, size) == _naive_order(spans, cs, size)


def test_chunk_order_visits_each_chunk_once_however_spans_overlap() -> None:
    # 100,000 tensors each naming the whole of a 10 GiB object of 8 MiB
    # chunks: 1.28e8 chunk visits the plain way; here each chunk once.
    size, cs = 10 << 30, 8 << 20
    order = chunk_order([(0, size)] * 100_000 + [(size - 1, size), (5 * cs, 5 * cs)], cs, size)
    assert order == list(range(size // cs))


def test_a_reader_waiting_on_data_goes_before_background_fetches(tmp_path: Path) -> None:
    store = SlowStore(delay=0.1)
    version = store.put("m.bin", pattern(1, 0, 16 * 64 * 1024))
    cache = ChunkCache(
        tmp_path / "c", store, chunk_size=64 * 1024, fetch_concurrency=1, capacity=1 << 30
    )

    async def main() -> None:
        obj = cache.open_object("m.bin", version, 64 * 1024)
        async with trio.open_nursery() as nursery:
            for n in range(1, 6):
                nursery.start_soon(lambda n=n: cache.ensure(obj, n))
            await trio.sleep(0.03)  # one chunk is being fetched, four queue
            data = await cache.read(obj, 9 * 64 * 1024, 100)
            assert data == pattern(1, 9 * 64 * 1024, 9 * 64 * 1024 + 100)

    trio.run(main)
    cache.close()
    order = [start // (64 * 1024) for _, start, _ in store.get_log]
    # One background fetch was running when the reader came; the reader's
    # chunk went next, ahead of the four still queued.
    assert order[1] == 9, order
    assert sorted(order[:1] + order[2:]) == [1, 2, 3, 4, 5]


def _small_memory_cache(tmp_path: Path, store: MemoryStore) -> ChunkCache:
    """A cache whose memory holds 16 chunks (a lead of 8 for one file), with
    4 chunks fetched at once."""
    return ChunkCache(
        tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, memory_cache=16 * CS,
        fetch_concurrency=4,
    )  # fmt: skip


def _opened(
    cache: ChunkCache, nursery: trio.Nursery, v: ObjectVersion, name: str = "m.bin"
) -> tuple[OpenPrefetch, CachedObject, OpenFile]:
    """`name` opened through a handle, with prefetch on open for *.bin and
    *.safetensors (its fetch runs in `nursery`)."""
    op = OpenPrefetch(cache, nursery.start_soon, ("*.bin", "*.safetensors"), concurrency=4)
    obj = cache.open_object(name, v, CS)
    h = OpenFile(1, 2, obj, cache, None, op)
    op.on_open(obj, name)
    return op, obj, h


def _open_prefetch_run(
    tmp_path: Path, reads: list[tuple[int, int]], pause: float
) -> tuple[ChunkCache, list[int]]:
    """Opens a 64-chunk file with prefetch on open and a memory cache of 16
    chunks, then reads `reads` with `pause` between them; returns the cache
    and the chunks fetched before the first read."""
    store = MemoryStore()
    v = store.put("m.bin", pattern(3, 0, SIZE))
    cache = _small_memory_cache(tmp_path, store)
    before: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            op, obj, h = _opened(cache, nursery, v)
            await trio.sleep(0.3)
            before.append(cache.counters.fetched_chunks)
            for off, n in reads:
                assert await h.read(off, n) == pattern(3, off, off + n)
                await trio.sleep(pause)
            while op.is_running(obj):
                await trio.sleep(0.01)
            h.close()

    trio.run(main)
    return cache, before


def test_open_prefetch_runs_no_further_ahead_of_its_reader_than_memory_holds(
    tmp_path: Path,
) -> None:
    # A reader slower than the store: the whole-file fetch must wait for it
    # rather than fill past the memory cache, whose chunks would be dropped
    # after their disk write and read back from disk.
    reads = [(off, CS // 2) for off in range(0, SIZE, CS // 2)]
    cache, before = _open_prefetch_run(tmp_path, reads, pause=0.002)
    try:
        # Half of the 16 chunks memory holds, one file fetching.
        assert before == [8]
        assert cache.counters.fetched_chunks == 64  # each chunk once
        assert cache.counters.verified_chunks == 0  # none read back from disk
    finally:
        cache.close()


def test_open_prefetch_goes_on_alone_once_its_reader_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefetch, "LEAD_STALL_SECONDS", 0.6)
    cache, before = _open_prefetch_run(tmp_path, [(0, 100)], pause=0)
    try:
        assert before == [8]  # held for the reader (0.3 s in) ...
        assert cache.counters.fetched_chunks == 64  # ... then finished without it
    finally:
        cache.close()


def test_read_ahead_stays_out_from_the_open_until_the_open_prefetch_gives_up(
    tmp_path: Path,
) -> None:
    # The whole-file fetch reads the safetensors header before it knows its
    # order; read-ahead in file order started on the reader's header reads
    # fetched chunks a name-order loader reached only after memory had
    # dropped them (4 of 25 per shard read back from disk).
    store = MemoryStore()
    v = store.put("m.bin", pattern(3, 0, SIZE))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)
    try:
        op = OpenPrefetch(cache, lambda *args: None, ("*.bin",), concurrency=4)
        obj = cache.open_object("m.bin", v, CS)
        op.on_open(obj, "m.bin")  # its fetch not started, its lead not sized
        assert op.on_read(obj, 0, 4096)  # the prefetch is the read-ahead
        op._leads[obj.obj_id].stop()  # the reader stalled: it gave up
        assert not op.on_read(obj, 4096, 4096)
    finally:
        cache.close()


def _two_files(
    tmp_path: Path, open_second: bool
) -> tuple[ChunkCache, OpenPrefetch, list[int], bytes]:
    """Reads a.bin whole through prefetch on open, whose next file is
    b.bin, then (if `open_second`) b.bin. Returns the cache, the prefetch,
    the chunks fetched before b.bin was opened (after a.bin was read) and
    b.bin's id."""
    store = MemoryStore()
    va = store.put("a.bin", pattern(3, 0, SIZE))
    vb = store.put("b.bin", pattern(4, 0, SIZE))
    cache = _small_memory_cache(tmp_path, store)
    before: list[int] = []
    op: list[OpenPrefetch] = []

    async def no_more() -> None:
        return None

    async def upcoming():  # type: ignore[no-untyped-def]
        return cache.open_object("b.bin", vb, CS), "b.bin", no_more

    async def read_whole(name: str, version: ObjectVersion, seed: int) -> None:
        obj = cache.open_object(name, version, CS)
        h = OpenFile(1, 2, obj, cache, None, op[0])
        op[0].on_open(obj, name, upcoming if name == "a.bin" else None)
        for off in range(0, SIZE, CS // 2):
            assert await h.read(off, CS // 2) == pattern(seed, off, off + CS // 2)
            await trio.sleep(0.002)
        h.close()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            op.append(OpenPrefetch(cache, nursery.start_soon, ("*.bin",), concurrency=4))
            await read_whole("a.bin", va, 3)
            await trio.sleep(0.3)
            before.append(cache.counters.fetched_chunks - 64)
            if open_second:
                await read_whole("b.bin", vb, 4)

    trio.run(main)
    return cache, op[0], before, vb.identity()


def test_the_next_model_file_is_fetched_before_a_loader_opens_it(tmp_path: Path) -> None:
    # Between two shards the link idled while the next one was opened and
    # its header fetched and ordered: its fetch now starts as soon as the
    # one before has been issued whole.
    cache, op, before, _ = _two_files(tmp_path, open_second=True)
    try:
        assert op.files_ahead == 1
        # At most its lead's worth (half of the 16 chunks memory holds,
        # shared with a.bin's fetch while that one lasts) was fetched
        # before it was opened ...
        assert 1 <= before[0] <= 8, before
        # ... and each chunk of both files was fetched once, and none was
        # read back from disk.
        assert cache.counters.fetched_chunks == 128
        assert cache.counters.verified_chunks == 0
    finally:
        cache.close()


def test_a_file_fetched_ahead_that_nobody_opens_is_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefetch, "OPEN_AHEAD_WAIT", 0.5)
    cache, op, before, b_id = _two_files(tmp_path, open_second=False)
    try:
        assert op.files_ahead == 1
        # No more than its lead, and no longer than OPEN_AHEAD_WAIT: the
        # fetch ended and gave its object back.
        assert 1 <= cache.counters.fetched_chunks - 64 <= 8
        assert cache.counters.fetched_chunks - 64 == before[0]
        assert not op._running and not op._leads
        assert b_id not in cache.objects._objects
    finally:
        cache.close()


@pytest.mark.allow_log("finding the file to fetch ahead failed")
def test_a_failure_to_find_the_next_file_never_ends_the_fetch_or_the_mount(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    v = store.put("a.bin", pattern(3, 0, SIZE))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, memory_cache=16 * CS)

    async def broken():  # type: ignore[no-untyped-def]
        raise RuntimeError("listing blew up")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            op = OpenPrefetch(cache, nursery.start_soon, ("*.bin",), concurrency=4)
            obj = cache.open_object("a.bin", v, CS)
            h = OpenFile(1, 2, obj, cache, None, op)
            op.on_open(obj, "a.bin", broken)
            for off in range(0, SIZE, CS):
                assert await h.read(off, CS) == pattern(3, off, off + CS)
            h.close()
        # The nursery (the mount's, in the daemon) ended normally.

    try:
        trio.run(main)
        assert cache.counters.fetched_chunks == 64
    finally:
        cache.close()


class _PausesAfterFirstChunk(MemoryStore):
    """The first GET of several chunks delivers its first chunk, then waits
    for `go` before sending the rest (a long GET on a busy machine)."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = threading.Event()
        self.go = threading.Event()
        self.paused_at = -1  # where the paused GET began

    def get_into(self, key, version, start, bufs, deliver=None):  # type: ignore[no-untyped-def]
        if len(bufs) < 2 or self.paused.is_set():
            return super().get_into(key, version, start, bufs, deliver)
        bufs[0][:] = self.objects[key][0][start : start + len(bufs[0])]
        self.get_log.append((key, start, start + len(bufs[0])))
        deliver(0)
        self.paused_at = start
        self.paused.set()
        assert self.go.wait(10)
        rest = super().get_into(key, version, start + len(bufs[0]), bufs[1:], None)
        for i in range(1, len(bufs)):
            deliver(i)
        return rest


def test_arrival_evict_race(tmp_path: Path) -> None:
    """A chunk fetched ahead is kept in memory from the moment it arrives.
    Kept only once its whole GET had ended, it was left to eviction between
    the end of the GET (the GET's thread lets go of its slabs, which wakes
    fetches waiting for one) and the fetch's next step: another GET's slab
    took it, and the reader read it back from disk (a CI run of the
    next-shard test)."""
    store = _PausesAfterFirstChunk()
    v = store.put("m.bin", pattern(6, 0, SIZE))
    store.counters.first_byte(0.001)  # a near origin: GETs of several chunks
    cache = _small_memory_cache(tmp_path, store)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            op, obj, h = _opened(cache, nursery, v)
            try:
                with trio.fail_after(10):
                    while not store.paused.is_set():
                        await trio.sleep(0.001)
                    await trio.sleep(0.05)  # its arrival is posted to the trio thread
                first = store.paused_at // CS
                # Its GET still runs, and the chunk is held already.
                assert first in op._leads[obj.obj_id].held
            finally:
                store.go.set()
            for off in range(0, SIZE, CS):
                assert await h.read(off, CS) == pattern(6, off, off + CS)
                await trio.sleep(0.002)
            h.close()

    try:
        trio.run(main)
        assert cache.counters.verified_chunks == 0  # none read back from disk
        assert cache.counters.fetched_chunks == SIZE // CS
    finally:
        cache.close()


def test_a_chunk_the_reader_has_read_is_not_loaded_again_for_a_run(tmp_path: Path) -> None:
    """A run's chunk that the reader got to first (the kernel's readahead
    outruns the lead) is on disk or in memory: loading it from disk for the
    run was a disk read for nobody."""
    store = MemoryStore()
    v = store.put("m.bin", pattern(5, 0, 8 * CS))
    cache = ChunkCache(tmp_path / "c", store, chunk_size=CS, capacity=1 << 30)

    async def main() -> None:
        obj = cache.open_object("m.bin", v, CS)
        try:
            await cache.ensure(obj, 2)  # the reader's
            await cache.stored()
            cache.pool.clear()  # and memory dropped it
            assert await cache.ensure_run(obj, [0, 1, 2, 3], wanted=lambda n: n != 2) == 3
        finally:
            cache.close_object(obj)

    try:
        trio.run(main)
        assert cache.counters.verified_chunks == 0
        assert sorted(store.requests) == [("m.bin", 0, 2 * CS), ("m.bin", 2 * CS, 3 * CS),
                                          ("m.bin", 3 * CS, 4 * CS)]  # fmt: skip
    finally:
        cache.close()


def test_a_file_fetched_ahead_keeps_the_chunk_its_header_came_from(tmp_path: Path) -> None:
    """The header is read before the lead has a size; once it has one, the
    header's chunk is kept for the reader like any chunk fetched ahead (a
    file fetched ahead found it evicted by its opening)."""
    header = json.dumps(
        {"t": {"dtype": "F32", "shape": [8 * CS // 4], "data_offsets": [0, 8 * CS]}}
    )
    blob = struct.pack("<Q", len(header)) + header.encode() + pattern(6, 0, 8 * CS)
    store = MemoryStore()
    v = store.put("m.safetensors", blob)
    cache = ChunkCache(
        tmp_path / "c", store, chunk_size=CS, capacity=1 << 30, memory_cache=16 * CS,
    )  # fmt: skip
    held: list[set[int]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            op, obj, h = _opened(cache, nursery, v, "m.safetensors")
            with trio.fail_after(10):
                while not (lead := op._leads[obj.obj_id]).limit:
                    await trio.sleep(0.001)
            held.append(set(lead.held))
            for off in range(0, len(blob), CS):
                await h.read(off, CS)
            h.close()

    try:
        trio.run(main)
        assert 0 in held[0]
    finally:
        cache.close()


class _NearAfterColdStart(MemoryStore):
    """A near origin whose first GETs are slow, as a mount's first GETs are
    (new connections, a cold client, the cores busy); records each GET's
    length in chunks."""

    def __init__(self, slow_gets: int) -> None:
        super().__init__()
        self.slow_gets = slow_gets
        self.lengths: list[int] = []

    def get_into(self, key, version, start, bufs, deliver=None):  # type: ignore[no-untyped-def]
        self.lengths.append(len(bufs))
        self.counters.first_byte(0.030 if len(self.lengths) <= self.slow_gets else 0.002)
        time.sleep(0.005)
        return super().get_into(key, version, start, bufs, deliver)


def test_a_fetch_takes_longer_gets_once_the_origin_shows_it_is_near(tmp_path: Path) -> None:
    """The GET length of a whole-file fetch follows the origin's distance as
    its GETs show it, run by run: sized once, at the fetch's start, from a
    mount's first slow GETs, a fetch from the gateway on this host went on
    in one-chunk GETs to its end (43-110 GETs per GiB where 36 would do)."""
    store = _NearAfterColdStart(slow_gets=3)
    v = store.put("m.bin", pattern(8, 0, SIZE))
    cache = _small_memory_cache(tmp_path, store)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            op, obj, h = _opened(cache, nursery, v)
            for off in range(0, SIZE, CS):
                assert await h.read(off, CS) == pattern(8, off, off + CS)
                await trio.sleep(0.01)  # the fetch leads its reader
            while op.is_running(obj):
                await trio.sleep(0.01)
            h.close()

    try:
        trio.run(main)
    finally:
        cache.close()
    # Far at first (one chunk per GET), then the lead's half (4) per GET.
    assert store.lengths[0] == 1, store.lengths
    assert max(store.lengths) == 4, str(store.lengths)
    assert len(store.lengths) <= 3 + SIZE // CS // 4 + 8, str(store.lengths)


class _Holds:
    """The two calls a lead makes of the cache: which chunks it holds."""

    def __init__(self) -> None:
        self.held: set[int] = set()

    def hold(self, obj: object, n: int) -> int:
        self.held.add(n)
        return n

    def let_go(self, n: int) -> None:
        self.held.discard(n)


def test_a_chunk_read_twice_in_part_is_not_read_whole() -> None:
    """The same bytes read twice (the kernel's readahead beside a reader's
    own read) do not make a chunk read whole: counted as a sum of sizes,
    the chunk was let go with half of it unread, and that half was read
    back from disk."""
    cache = _Holds()
    obj = type("Obj", (), {"chunk_size": CS, "size": 4 * CS})()
    lead = prefetch._Lead(cache, obj)  # type: ignore[arg-type]
    lead.limit = 8
    lead.on_read(0, CS // 2)
    lead.on_read(0, CS // 2)  # the same half again
    assert 0 not in lead.read and cache.held == {0}
    lead.on_read(CS // 4, CS // 2)  # overlapping, and a quarter more
    assert 0 not in lead.read and cache.held == {0}
    lead.on_read(3 * CS // 4, CS // 4 + 10)  # the rest, and 10 bytes of chunk 1
    assert lead.read == {0} and cache.held == {1}
