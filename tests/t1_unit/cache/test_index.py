"""Unit tier: the LMDB chunk index."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from modelfs.cache.index import CacheIndex, NewChunk, Victim
from modelfs.errors import CacheFormatError

A = b"a" * 16
B = b"b" * 16


def test_put_get_used_and_persistence(tmp_path: Path) -> None:
    idx = CacheIndex(tmp_path / "i")
    assert idx.get(A, 0) is None
    idx.put(A, 0, 100, 0xABC, b'{"chunk_size": 100}', 100)
    idx.put(A, 1, 50, 0xDEF, b'{"chunk_size": 100}', 100)
    idx.put(A, 1, 50, 0xDEF, b'{"chunk_size": 100}', 100)  # idempotent
    assert idx.used() == 150
    idx.close()
    idx = CacheIndex(tmp_path / "i")
    rec = idx.get(A, 1)
    assert rec is not None and (rec.length, rec.checksum) == (50, 0xDEF)
    assert idx.object_meta(A) == {"chunk_size": 100}
    assert idx.get(A, 0) is not None and idx.get(A, 2) is None
    assert idx.cached_bytes(A) == 150
    assert idx.stats() == {"used_bytes": 150, "chunks": 2, "objects": 1}


def test_lru_order_follows_touch(tmp_path: Path) -> None:
    idx = CacheIndex(tmp_path / "i")
    for n in range(4):
        idx.put(A, n, 10, n, b'{"chunk_size": 10}', 10)
    idx.put(B, 0, 10, 9, b'{"chunk_size": 10}', 10)
    idx.touch([(A, 0), (A, 1), (B, 7)])  # (B, 7) is absent: skipped
    order = [(v.obj_id, v.chunk) for v in idx.oldest(1000)]
    assert order == [(A, 2), (A, 3), (B, 0), (A, 0), (A, 1)]
    assert len(idx.oldest(15)) == 2


def test_a_chunk_cut_with_another_chunk_size_is_not_recorded(tmp_path: Path) -> None:
    idx = CacheIndex(tmp_path / "i")
    assert idx.put(A, 0, 10, 1, b'{"chunk_size": 10}', 10)
    assert not idx.put(A, 1, 20, 2, b'{"chunk_size": 20}', 20)
    assert idx.get(A, 1) is None and idx.used() == 10


def test_remove_reports_emptied_objects(tmp_path: Path) -> None:
    idx = CacheIndex(tmp_path / "i")
    idx.put(A, 0, 10, 0, b'{"chunk_size": 10}', 10)
    idx.put(A, 1, 10, 0, b'{"chunk_size": 10}', 10)
    idx.put(B, 0, 10, 0, b'{"chunk_size": 10}', 10)
    assert idx.remove([Victim(A, 0, 10), Victim(B, 0, 10)]) == [B]
    assert idx.used() == 10
    assert idx.object_meta(B) is None and idx.object_meta(A) == {"chunk_size": 10}
    assert idx.remove([Victim(A, 1, 10)]) == [A]
    assert idx.used() == 0 and idx.oldest(100) == []


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    CacheIndex(tmp_path / "i").close()
    env = lmdb.open(str(tmp_path / "i"), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", b"42", db=meta)
    env.close()
    with pytest.raises(CacheFormatError, match="format 42"):
        CacheIndex(tmp_path / "i")


def test_two_users_of_one_index_in_one_process_write_at_once(tmp_path: Path) -> None:
    """They share one LMDB environment, which refuses a second concurrent
    write transaction (EBUSY) rather than waiting: they must take turns."""
    import threading

    a, b = CacheIndex(tmp_path / "i"), CacheIndex(tmp_path / "i")
    errors: list[BaseException] = []

    def writer(index: CacheIndex, obj_id: bytes) -> None:
        try:
            for n in range(300):
                index.put_many([NewChunk(obj_id, n, 10, n, b'{"chunk_size": 10}', 10)])
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(ix, bytes([i]) * 16)) for i, ix in enumerate((a, b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert a.used() == 2 * 300 * 10
    a.close()
    b.close()
