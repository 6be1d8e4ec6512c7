"""fs-API tier: the FUSE operations called directly, without a mount."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio

from modelfs.cache import ChunkCache
from modelfs.errors import AccessDenied, CacheError, EndpointUnreachable, ObjectChanged, StoreError
from modelfs.fs import Operations, errno_for
from modelfs.namespace import ROOT_INODE, Namespace
from modelfs.testing.memory import MemoryStore

from ..data import pattern

CTX = None  # the operations used here ignore the request context


@pytest.fixture
def ops(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = MemoryStore()
    store.put("dir/w.bin", pattern(1, 0, 300_000))
    store.put("top.txt", b"hello")
    cache = ChunkCache(tmp_path / "c", store, capacity=1 << 30, chunk_size=64 * 1024)
    o = Operations(Namespace(store, "", 60), cache, chunk_size=64 * 1024, uid=7, gid=8, ttl=60)
    yield o, store
    cache.close()


def test_lookup_getattr_open_read(ops) -> None:  # type: ignore[no-untyped-def]
    o, store = ops

    async def main() -> None:
        d = await o.lookup(ROOT_INODE, b"dir", CTX)
        assert stat.S_ISDIR(d.st_mode) and d.st_uid == 7 and d.st_gid == 8
        f = await o.lookup(d.st_ino, b"w.bin", CTX)
        assert stat.S_ISREG(f.st_mode) and f.st_size == 300_000 and f.st_mode & 0o777 == 0o444
        assert (await o.lookup(d.st_ino, b"..", CTX)).st_ino == ROOT_INODE
        fi = await o.open(f.st_ino, os.O_RDONLY, CTX)
        assert await o.read(fi.fh, 299_990, 100) == pattern(1, 299_990, 300_000)
        assert await o.read(fi.fh, 1000, 131072) == pattern(1, 1000, 1000 + 131072)
        await o.release(fi.fh)
        fi2 = await o.open(f.st_ino, os.O_RDONLY, CTX)
        assert fi2.keep_cache  # an inode is one version: its page cache stays valid
        await o.release(fi2.fh)
        assert await o.getxattr(f.st_ino, b"user.modelfs.key", CTX) == b"dir/w.bin"
        stats = json.loads(await o.getxattr(ROOT_INODE, b"user.modelfs.stats", CTX))
        # Chunk 0 and the last chunk (4), then chunks 0-2: four chunks in all.
        assert stats["store"]["get_bytes"] == 3 * 65536 + (300_000 - 4 * 65536)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await o.getxattr(f.st_ino, b"user.other", CTX)
        assert info.value.errno == errno.ENODATA
        # A missing name is a negative entry the kernel keeps for the TTL.
        missing = await o.lookup(ROOT_INODE, b"missing", CTX)
        assert missing.st_ino == 0 and missing.entry_timeout == 60
        assert o.stats().negative_lookups == 1
        # Under a directory that is gone, it is ENOENT.
        with pytest.raises(pyfuse3.FUSEError) as info:
            await o.lookup(999_999, b"missing", CTX)
        assert info.value.errno == errno.ENOENT

    trio.run(main)


@pytest.mark.allow_log("changed since it was opened")
def test_changed_object_is_estale_and_new_open_sees_new_version(ops) -> None:  # type: ignore[no-untyped-def]
    o, store = ops

    async def main() -> None:
        f = await o.lookup(ROOT_INODE, b"top.txt", CTX)
        fi = await o.open(f.st_ino, os.O_RDONLY, CTX)
        store.put("top.txt", b"HELLO!")
        with pytest.raises(pyfuse3.FUSEError) as info:
            await o.read(fi.fh, 0, 10)
        assert info.value.errno == errno.ESTALE
        await o.release(fi.fh)
        # Re-listed at once, no TTL wait: the old inode answers ESTALE (the
        # kernel then looks the name up again) and the name has a new inode.
        with pytest.raises(pyfuse3.FUSEError) as info:
            await o.open(f.st_ino, os.O_RDONLY, CTX)
        assert info.value.errno == errno.ESTALE
        f2 = await o.lookup(ROOT_INODE, b"top.txt", CTX)
        assert f2.st_ino != f.st_ino and f2.st_size == 6
        fi = await o.open(f2.st_ino, os.O_RDONLY, CTX)
        assert await o.read(fi.fh, 0, 10) == b"HELLO!"
        await o.release(fi.fh)

    trio.run(main)


def test_writes_are_erofs(ops) -> None:  # type: ignore[no-untyped-def]
    o, _ = ops

    async def main() -> None:
        f = await o.lookup(ROOT_INODE, b"top.txt", CTX)
        for call in (
            o.open(f.st_ino, os.O_RDWR, CTX),
            o.write(1, 0, b"x"),
            o.create(ROOT_INODE, b"n", 0o644, os.O_WRONLY, CTX),
            o.unlink(ROOT_INODE, b"top.txt", CTX),
            o.mkdir(ROOT_INODE, b"d", 0o755, CTX),
            o.setxattr(f.st_ino, b"user.a", b"1", CTX),
        ):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call
            assert info.value.errno == errno.EROFS

    trio.run(main)


@pytest.mark.parametrize(
    "exc, code",
    [
        (ObjectChanged("x"), errno.ESTALE),
        (AccessDenied("x"), errno.EACCES),
        (EndpointUnreachable("x"), errno.EHOSTUNREACH),
        (StoreError("x"), errno.EIO),
        (CacheError("x"), errno.EIO),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (RuntimeError("bug"), errno.EIO),
    ],
)
def test_errno_mapping(exc: BaseException, code: int) -> None:
    assert errno_for(exc) == code


@pytest.mark.allow_log("release failed: .*disk gone")
@pytest.mark.allow_log("unexpected error in forget")
def test_release_and_forget_stay_inside_the_errno_boundary(ops, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """A failure while closing a handle is an errno for the kernel, and a
    failure in forget (which gets no answer) is logged: neither escapes
    into pyfuse3 as a Python exception."""
    o, _ = ops

    async def main() -> None:
        f = await o.lookup(ROOT_INODE, b"top.txt", CTX)
        fi = await o.open(f.st_ino, os.O_RDONLY, CTX)

        def broken_close(obj: object) -> None:
            raise OSError(errno.EIO, "disk gone")

        monkeypatch.setattr(o.cache, "close_object", broken_close)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await o.release(fi.fh)
        assert info.value.errno == errno.EIO

        def broken_forget(inode: int, nlookup: int) -> None:
            raise RuntimeError("bookkeeping bug")

        monkeypatch.setattr(o.ns, "forget", broken_forget)
        assert await o.forget([(f.st_ino, 1)]) is None

    trio.run(main)
    logged = [r.getMessage() for r in caplog.records]
    assert any("release failed" in m for m in logged)
    assert "unexpected error in forget" in logged
