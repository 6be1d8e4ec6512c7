"""Unit tier: the shared cache tier between chunk caches of several "nodes"
(separate cache directories) over an in-memory origin and tier."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from modelfs import tier as tier_mod
from modelfs.cache import ChunkCache
from modelfs.errors import StoreError
from modelfs.store import ObjectVersion
from modelfs.testing.memory import MemoryStore, MemoryTier, SlowStore
from modelfs.tier import HEADER_SIZE, SharedTier, frame, unframe

from ..data import pattern

CS = 64 * 1024
SIZE = 6 * CS + 5  # 7 chunks
NCHUNKS = 7


def _node(
    tmp_path: Path, name: str, store: MemoryStore, tier: MemoryTier, **kw: float
) -> ChunkCache:
    shared = SharedTier(tier, "tier/p", "origin", lease=kw.get("lease", 5.0))
    return ChunkCache(tmp_path / name, store, chunk_size=CS, capacity=1 << 30, tier=shared)


async def _read(cache: ChunkCache, key: str, v: ObjectVersion, size: int = SIZE) -> bytes:
    obj = cache.open_object(key, v, CS)
    try:
        return bytes(await cache.read(obj, 0, size))
    finally:
        cache.close_object(obj)


def _run_nodes(nodes: list[ChunkCache], body: Callable[[], Awaitable[None]]) -> None:
    """Run `body` with every node's background uploads going."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for c in nodes:
                nursery.start_soon(c.run_background)
            await body()
            for c in nodes:
                assert c.tier is not None
                await c.stored()  # chunks are uploaded once stored locally
                await c.tier.drain()
            nursery.cancel_scope.cancel()

    trio.run(main)
    for c in nodes:
        c.close()


def _read_together(nodes: list[ChunkCache], v: ObjectVersion) -> list[bytes]:
    """Every node reads m/a.bin at the same time."""
    got: list[bytes] = []

    async def body() -> None:
        async def one(c: ChunkCache) -> None:
            got.append(await _read(c, "m/a.bin", v))

        async with trio.open_nursery() as nursery:
            for c in nodes:
                nursery.start_soon(one, c)

    _run_nodes(nodes, body)
    return got


def _origin_chunks(store: MemoryStore) -> list[int]:
    return sorted(start // CS for _, start, _ in store.get_log)


def test_frame_round_trip_and_every_kind_of_damage() -> None:
    data = pattern(1, 0, 1000)
    body = frame("k/1", data, __import__("xxhash").xxh3_64_intdigest(data))
    assert len(body) == HEADER_SIZE + 1000
    assert unframe("k/1", body, 1000) == data
    assert unframe("k/2", body, 1000) is None  # an object under another key
    assert unframe("k/1", body, 999) is None  # not the length expected
    assert unframe("k/1", body[:-1], 1000) is None  # truncated
    flipped = bytearray(body)
    flipped[HEADER_SIZE + 10] ^= 1
    assert unframe("k/1", bytes(flipped), 1000) is None


def test_a_second_node_reads_from_the_tier_not_the_origin(tmp_path: Path) -> None:
    store, tier = MemoryStore(), MemoryTier()
    data = pattern(2, 0, SIZE)
    v = store.put("m/a.bin", data)
    a, b = _node(tmp_path, "a", store, tier), _node(tmp_path, "b", store, tier)

    async def body() -> None:
        assert await _read(a, "m/a.bin", v) == data
        assert a.tier is not None
        await a.stored()
        await a.tier.drain()
        assert await _read(b, "m/a.bin", v) == data

    _run_nodes([a, b], body)
    assert _origin_chunks(store) == list(range(NCHUNKS))  # node a's, once each
    assert b.counters.tier_chunks == NCHUNKS
    assert b.tier is not None and b.tier.counters.hit_bytes == SIZE
    assert a.tier is not None and a.tier.counters.uploads == NCHUNKS
    # Keys carry the origin's identity: bucket and key hash, ETag/size, chunk size, n.
    chunk_keys = [k for k in tier.objects if not k.endswith(".lease")]
    assert len(chunk_keys) == NCHUNKS
    assert all(k.startswith("tier/p/") and f"-{CS}/" in k for k in chunk_keys)


def test_nodes_starting_together_fetch_each_chunk_from_the_origin_once(tmp_path: Path) -> None:
    store, tier = SlowStore(delay=0.05), MemoryTier()
    data = pattern(3, 0, SIZE)
    v = store.put("m/a.bin", data)
    nodes = [_node(tmp_path, f"n{i}", store, tier) for i in range(5)]
    got = _read_together(nodes, v)
    assert got == [data] * 5
    assert _origin_chunks(store) == list(range(NCHUNKS))
    assert sum(c.tier.counters.lease_waits for c in nodes if c.tier) > 0
    assert not [k for k in tier.objects if k.endswith(".lease")]  # all released


def test_without_conditional_writes_nodes_fetch_for_themselves(tmp_path: Path) -> None:
    """A store that ignores If-None-Match: no herd control, documented; the
    bytes are still right."""
    store, tier = SlowStore(delay=0.05), MemoryTier(conditional=False)
    data = pattern(4, 0, SIZE)
    v = store.put("m/a.bin", data)
    nodes = [_node(tmp_path, f"n{i}", store, tier) for i in range(3)]
    got = _read_together(nodes, v)
    assert got == [data] * 3
    assert all(c.tier is not None and c.tier.conditional is False for c in nodes)
    assert len(store.get_log) > NCHUNKS


@pytest.mark.allow_log("shared cache object .* is corrupt")
def test_a_corrupt_tier_object_is_refetched_and_replaced(tmp_path: Path) -> None:
    store, tier = MemoryStore(), MemoryTier()
    data = pattern(5, 0, SIZE)
    v = store.put("m/a.bin", data)
    a, b, c = (_node(tmp_path, n, store, tier) for n in "abc")
    assert a.tier is not None
    key = a.tier.chunk_key("m/a.bin", v, CS, 2)

    async def body() -> None:
        assert await _read(a, "m/a.bin", v) == data
        assert a.tier is not None
        await a.stored()
        await a.tier.drain()
        bad = bytearray(tier.objects[key])
        bad[HEADER_SIZE + 7] ^= 0x10
        tier.objects[key] = bytes(bad)
        store.get_log.clear()
        assert await _read(b, "m/a.bin", v) == data
        assert b.tier is not None
        await b.stored()
        await b.tier.drain()
        assert await _read(c, "m/a.bin", v) == data

    _run_nodes([a, b, c], body)
    assert _origin_chunks(store) == [2]  # b fetched only the bad chunk; c nothing
    assert b.tier is not None and b.tier.counters.corrupt == 1
    assert c.tier is not None and c.tier.counters.hits == NCHUNKS


@pytest.mark.allow_log("shared cache: .* failed")
def test_an_unreachable_tier_is_skipped_then_used_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tier_mod, "DOWN_FIRST", 0.2)
    store, tier = MemoryStore(), MemoryTier()
    tier.down = True
    data = pattern(6, 0, SIZE)
    v = store.put("m/a.bin", data)
    v2 = store.put("m/b.bin", data[::-1])
    a, b = _node(tmp_path, "a", store, tier), _node(tmp_path, "b", store, tier)
    calls: list[int] = []

    async def body() -> None:
        assert await _read(a, "m/a.bin", v) == data
        calls.append(len(tier.log))
        # Still down, within the back-off: no call at all, so reads do not
        # each pay for a dead tier.
        assert await _read(a, "m/b.bin", v2) == data[::-1]
        calls.append(len(tier.log))
        tier.down = False
        await trio.sleep(0.3)  # the back-off ends
        assert await _read(b, "m/a.bin", v) == data
        assert b.tier is not None
        await b.stored()
        await b.tier.drain()

    _run_nodes([a, b], body)
    # The chunks read in parallel each tried once before the first failure.
    assert a.tier is not None and 1 <= a.tier.counters.errors["unreachable"] <= NCHUNKS
    assert 1 <= calls[0] <= NCHUNKS and calls[1] == calls[0]
    assert b.tier is not None and b.tier.counters.uploads == NCHUNKS


def test_a_lease_left_by_a_dead_node_expires(tmp_path: Path) -> None:
    store, tier = MemoryStore(), MemoryTier()
    data = pattern(7, 0, SIZE)
    v = store.put("m/a.bin", data)
    b = _node(tmp_path, "b", store, tier, lease=2.0)
    assert b.tier is not None
    lease = b.tier.chunk_key("m/a.bin", v, CS, 0) + ".lease"
    tier.objects[lease] = json.dumps({"node": "dead:1", "expires": time.time() + 0.5}).encode()

    async def body() -> None:
        assert await _read(b, "m/a.bin", v) == data

    _run_nodes([b], body)
    assert b.tier.counters.lease_waits == 1
    assert b.tier.counters.leases_won == NCHUNKS  # chunk 0 after the dead one's expired
    assert _origin_chunks(store) == list(range(NCHUNKS))
    assert lease not in tier.objects


def test_a_failed_origin_fetch_gives_its_lease_back(tmp_path: Path) -> None:
    store, tier = SlowStore(delay=0), MemoryTier()
    data = pattern(8, 0, SIZE)
    v = store.put("m/a.bin", data)
    a = _node(tmp_path, "a", store, tier)
    store.fail_next = StoreError("boom")

    async def body() -> None:
        with pytest.raises(StoreError):
            await _read(a, "m/a.bin", v, CS)

    _run_nodes([a], body)
    assert not [k for k in tier.objects if k.endswith(".lease")]


class _UploadLandsLate(MemoryTier):
    """Each chunk's first GET misses, as if its upload landed just after:
    the race between a node's miss and another node's upload."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__()
        self.objects = objects
        self._seen: set[str] = set()

    def get(self, key: str) -> bytes | None:
        if not key.endswith(".lease") and key not in self._seen:
            self._seen.add(key)
            self._check("GET", key)
            return None
        return super().get(key)


def test_a_node_that_wins_a_lease_looks_at_the_tier_again(tmp_path: Path) -> None:
    store, tier = MemoryStore(), MemoryTier()
    data = pattern(9, 0, SIZE)
    v = store.put("m/a.bin", data)
    a = _node(tmp_path, "a", store, tier)
    late = _UploadLandsLate(tier.objects)
    b = _node(tmp_path, "b", store, late)

    async def body() -> None:
        assert await _read(a, "m/a.bin", v) == data
        assert a.tier is not None
        await a.stored()
        await a.tier.drain()
        store.get_log.clear()
        assert await _read(b, "m/a.bin", v) == data

    _run_nodes([a, b], body)
    assert store.get_log == []
    assert b.tier is not None and b.tier.counters.leases_won == NCHUNKS


@pytest.mark.allow_log("the upload queue is full")
def test_a_full_upload_queue_is_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, tier = MemoryStore(), MemoryTier()
    v = store.put("m/a.bin", pattern(9, 0, SIZE))
    # Room for two framed chunks: the other five of one read are dropped.
    shared = SharedTier(tier, "tier/p", "origin", upload_queue_bytes=2 * (CS + HEADER_SIZE))
    node = ChunkCache(tmp_path / "n", store, chunk_size=CS, capacity=1 << 30, tier=shared)

    async def body() -> None:
        assert await _read(node, "m/a.bin", v) == pattern(9, 0, SIZE)

    async def main() -> None:
        await body()  # nothing uploads yet: the queue fills
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.run_background)
            await shared.drain()
            nursery.cancel_scope.cancel()

    trio.run(main)
    node.close()
    stats = shared.snapshot()
    assert stats.uploads_dropped == NCHUNKS - 2
    assert stats.uploads == 2
    warned = [r for r in caplog.records if "upload queue is full" in r.getMessage()]
    assert len(warned) == 1
