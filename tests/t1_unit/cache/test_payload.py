"""Unit tier: `modelfs.cache.payload`, payload files and range locks."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from modelfs.cache.payload import PayloadStore, ofd_conflict


def test_files_are_created_owner_only_and_shared_while_open(tmp_path: Path) -> None:
    store = PayloadStore(tmp_path)
    a = store.acquire(b"\x01" * 16)
    b = store.acquire(b"\x01" * 16)
    assert a is b and a.fd is not None
    path = store.path_of(b"\x01" * 16)
    assert path.is_file() and path.stat().st_mode & 0o777 == 0o600
    assert [name for name, _ in store.files()] == [path.name]
    store.release(b"\x01" * 16)
    assert not store.remove(b"\x01" * 16)  # still open once
    store.release(b"\x01" * 16)
    assert store.remove(b"\x01" * 16) and not path.exists()
    store.close_all()


def test_a_chunk_written_from_a_slab_reads_back(tmp_path: Path) -> None:
    store = PayloadStore(tmp_path)
    pf = store.acquire(b"\x02" * 16)
    slab = mmap.mmap(-1, 3 * 4096)
    data = os.urandom(2 * 4096 + 100)
    slab[: len(data)] = data
    pf.pwrite(memoryview(slab)[: len(data)], 4096)
    back = mmap.mmap(-1, 3 * 4096)
    got = pf.read_into(memoryview(back), len(data), 4096, aligned=True)
    assert got == len(data) and back[: len(data)] == data
    store.close_all()


def test_range_locks_exclude_other_descriptions_not_this_one(tmp_path: Path) -> None:
    one, two = PayloadStore(tmp_path), PayloadStore(tmp_path)
    a, b = one.acquire(b"\x03" * 16), two.acquire(b"\x03" * 16)
    assert a.try_lock(0, 100)
    assert a.try_lock(0, 100)  # one open file description never conflicts with itself
    assert not b.try_lock(50, 10) and b.try_lock(100, 10)
    assert a.fd is not None and not ofd_conflict(a.fd, 0, 100)
    a.unlock(0, 100)
    assert b.try_lock(50, 10)
    one.close_all()
    two.close_all()


@pytest.mark.parametrize("where", ["file", "subdir"])
def test_links_are_never_followed(tmp_path: Path, where: str) -> None:
    store = PayloadStore(tmp_path)
    name = (b"\x04" * 16).hex()
    victim = tmp_path / "victim"
    if where == "file":
        victim.write_bytes(b"keep")
        (tmp_path / "data" / name[:2]).mkdir()
        (tmp_path / "data" / name[:2] / name).symlink_to(victim)
    else:
        victim.mkdir()
        (tmp_path / "data" / name[:2]).symlink_to(victim)
    pf = store.acquire(b"\x04" * 16)
    assert pf.fd is None and pf.error is not None  # unbacked: served uncached
    with pytest.raises(OSError):  # absent, or behind a link: never opened
        store.acquire(b"\x04" + b"\x07" * 15, create=False)
    store.release(b"\x04" * 16)
    assert store.remove(b"\x04" * 16)  # unlinks nothing through the link
    assert victim.exists() and (where == "subdir" or victim.read_bytes() == b"keep")
    store.close_all()
