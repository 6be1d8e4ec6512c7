"""Hostile tier: every way a reader was once handed a wrong byte.

Each test reproduces an attack that broke "never a wrong byte" on an earlier
version: versions mixing through the kernel page cache, a server that
ignores Range, servers without ETags (identical LastModified, a size change
within one second), and an object shrinking under an open handle.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from modelfs.testing.fakes3 import FakeS3

from ..conftest import Bucket, Mounter, run_modelfs
from ..data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20
# One chunk a GET, no background reads: each read below asks the server for
# exactly the chunk it names.
QUIET = ("--chunk-size", "1M", "--prefetch-on-open", "none", "--prefetch-window", "0")


def _read_at(fd: int, off: int, size: int) -> bytes:
    out = b""
    while len(out) < size:
        piece = os.pread(fd, size - len(out), off + len(out))
        if not piece:
            break
        out += piece
    return out


def _no_readahead(f) -> None:  # type: ignore[no-untyped-def]
    """The kernel reads exactly what is asked: its read-ahead would fetch the
    rest of a small file before the test changes the object."""
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)


def _estale_or(fn, *args):  # type: ignore[no-untyped-def]
    """fn(*args), or None when it failed with ESTALE."""
    try:
        return fn(*args)
    except OSError as exc:
        assert exc.errno == errno.ESTALE, exc
        return None


# -- 1: two versions through the page cache -----------------------------------
@pytest.mark.parametrize("via", ["read", "mmap"])
def test_old_handle_never_sees_the_new_version(bucket: Bucket, mounter: Mounter, via: str) -> None:
    size = 16 * MiB
    bucket.put("m.bin", b"\x01" * size)
    m = mounter(
        bucket, args=("--metadata-ttl", "1", "--chunk-size", "1M"), allow_log=["ESTALE|changed"]
    )
    fd_a = os.open(m.path / "m.bin", os.O_RDONLY)
    try:
        assert _read_at(fd_a, 0, 2 * MiB) == b"\x01" * (2 * MiB)
        bucket.put("m.bin", b"\x02" * size)
        time.sleep(2)
        assert (m.path / "m.bin").read_bytes() == b"\x02" * size  # handle B
        if via == "mmap":
            with mmap.mmap(fd_a, size, prot=mmap.PROT_READ) as mm:
                # A page the old version's cache cannot hold faults in: SIGBUS
                # would kill the test, so only pages A's version can serve.
                rest = _estale_or(lambda: bytes(mm[2 * MiB : 3 * MiB]))
        else:
            rest = _estale_or(_read_at, fd_a, 2 * MiB, size - 2 * MiB)
        # Handle A: its own version (still cached) or ESTALE; never a 2.
        assert rest is None or set(rest) == {1}, "one handle returned two versions"
    finally:
        os.close(fd_a)


def test_old_pages_never_reach_new_opens(bucket: Bucket, mounter: Mounter) -> None:
    size = 8 * MiB
    bucket.put("m.bin", b"\x01" * size)
    m = mounter(bucket, args=("--metadata-ttl", "1", "--chunk-size", "1M"))
    fd_a = os.open(m.path / "m.bin", os.O_RDONLY)
    try:
        assert _read_at(fd_a, 0, size) == b"\x01" * size
        bucket.put("m.bin", b"\x02" * size)
        time.sleep(2)
        assert (m.path / "m.bin").read_bytes() == b"\x02" * size  # B
        # A re-reads its version (from the cache it pinned), filling pages...
        os.posix_fadvise(fd_a, 0, 0, os.POSIX_FADV_DONTNEED)
        assert _read_at(fd_a, 0, size) == b"\x01" * size
        # ...which no later open may see.
        for _ in range(2):
            assert (m.path / "m.bin").read_bytes() == b"\x02" * size
    finally:
        os.close(fd_a)


# -- 2: a server that ignores Range -------------------------------------------
def test_range_ignoring_server_is_refused_and_nothing_cached(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    data = pattern(21, 0, 3 * MiB + 5)
    fake.put("w.bin", data)
    fake.ignore_range = True
    cache = tmp_path / "c"
    m = mounter(fake_bucket, cache_dir=cache, args=QUIET, allow_log=["ignored the Range header"])
    with pytest.raises(OSError) as info:
        (m.path / "w.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert os.getxattr(m.path / "w.bin", "user.modelfs.cached") == b"0"
    log = m.log_file.read_text()
    assert "ignored the Range header" in log
    # The server mends its ways: the bytes are right, in this mount and the next.
    fake.ignore_range = False
    assert (m.path / "w.bin").read_bytes() == data
    m.umount()
    m = mounter(fake_bucket, cache_dir=cache, args=QUIET)
    assert (m.path / "w.bin").read_bytes() == data


def test_whole_object_200_is_accepted_for_a_whole_object_range(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter
) -> None:
    # A 200 with the whole object is exactly what a range covering it asks for.
    data = pattern(22, 0, 100_000)
    fake.put("small.bin", data)
    fake.ignore_range = True
    m = mounter(fake_bucket, args=QUIET)
    assert (m.path / "small.bin").read_bytes() == data


# -- 3 and 4: servers without ETags -------------------------------------------
def test_no_etag_objects_with_equal_mtime_and_size_never_share_bytes(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter
) -> None:
    fake.etags = False
    when = 1_790_000_000.25
    blobs = {f"s{i:03d}.bin": pattern(100 + i, 0, MiB) for i in range(4)}
    for key, blob in blobs.items():
        fake.put(key, blob, mtime=when)  # the same LastModified, the same size
    m = mounter(fake_bucket, args=QUIET)
    for key, blob in blobs.items():
        assert (m.path / key).read_bytes() == blob, key


def test_no_etag_size_change_within_a_second_is_estale(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter
) -> None:
    fake.etags = False
    when = 1_790_000_000.0
    fake.put("g.bin", pattern(31, 0, 2 * MiB), mtime=when)
    m = mounter(fake_bucket, args=QUIET, allow_log=["changed since it was opened"])
    with open(m.path / "g.bin", "rb", buffering=0) as f:
        _no_readahead(f)
        assert f.read(MiB) == pattern(31, 0, MiB)
        # Overwritten 0.13 s later with a bigger object: the same second.
        fake.put("g.bin", pattern(32, 0, 3 * MiB), mtime=when + 0.13)
        for _ in range(3):
            with pytest.raises(OSError) as info:
                f.seek(MiB)
                f.read(MiB)
            assert info.value.errno == errno.ESTALE


def test_no_etag_same_size_later_second_is_estale(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter
) -> None:
    fake.etags = False
    fake.put("h.bin", pattern(33, 0, 2 * MiB), mtime=1_790_000_000.0)
    m = mounter(fake_bucket, args=QUIET, allow_log=["changed since it was opened"])
    with open(m.path / "h.bin", "rb", buffering=0) as f:
        _no_readahead(f)
        assert f.read(MiB) == pattern(33, 0, MiB)
        fake.put("h.bin", pattern(34, 0, 2 * MiB), mtime=1_790_000_003.0)
        with pytest.raises(OSError) as info:
            f.read(MiB)
        assert info.value.errno == errno.ESTALE


def test_no_etag_parallel_puts_read_back_exact(no_etag_gateway: Bucket, mounter: Mounter) -> None:
    # 120 objects of one size PUT at once: several share a LastModified.
    blobs = {f"s{i:03d}.bin": pattern(200 + i, 0, 64 * 1024) for i in range(120)}
    keys = list(blobs)
    threads = [
        threading.Thread(
            target=lambda part=keys[j::8]: [no_etag_gateway.put(k, blobs[k]) for k in part]
        )
        for j in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = mounter(no_etag_gateway, args=("--prefetch-on-open", "none"))
    for key, blob in blobs.items():
        assert (m.path / key).read_bytes() == blob, key


# -- 14: an object shrunk under an open handle -----------------------------------
def test_object_shrunk_mid_read_is_estale(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("s.bin", pattern(41, 0, 3 * MiB))
    m = mounter(bucket, args=QUIET, allow_log=["changed since it was opened"])
    with open(m.path / "s.bin", "rb", buffering=0) as f:
        _no_readahead(f)
        assert f.read(MiB) == pattern(41, 0, MiB)
        bucket.put("s.bin", pattern(42, 0, MiB))
        f.seek(2 * MiB)
        with pytest.raises(OSError) as info:
            f.read(MiB)
        assert info.value.errno == errno.ESTALE


# -- round 2, 1: memory slabs cut at another chunk size ------------------------
@pytest.mark.parametrize("remover", ["clear", "gc"])
def test_memory_cut_at_another_chunk_size_is_not_served(
    bucket: Bucket, mounter: Mounter, tmp_path: Path, remover: str
) -> None:
    """An object cached at 256K, read by a 1M mount at the recorded 256K;
    its records are then removed by another process: the next open cuts it
    at 1M, and must not find the 256K slabs still in its memory."""
    data = pattern(51, 0, 3 * MiB + 77)
    bucket.put("c.bin", data)
    cache = tmp_path / "cache"
    quiet = ("--prefetch-on-open", "none", "--prefetch-window", "0")
    small = mounter(bucket, cache_dir=cache, args=("--chunk-size", "256K", *quiet))
    assert (small.path / "c.bin").read_bytes() == data
    small.settle()
    small.umount()
    m = mounter(bucket, cache_dir=cache, args=("--chunk-size", "1M", *quiet))
    assert (m.path / "c.bin").read_bytes() == data  # at the recorded 256K
    args = ("clear",) if remover == "clear" else ("gc", "0")
    proc = run_modelfs("cache", *args, "--cache-dir", str(cache))
    assert proc.returncode == 0, proc.stderr
    fd = os.open(m.path / "c.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel's copy
        assert os.pread(fd, 4096, MiB) == data[MiB : MiB + 4096]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert _read_at(fd, 0, len(data)) == data
    finally:
        os.close(fd)


# -- round 2, 2: a compressed body -----------------------------------------------
def test_gzip_chunked_body_is_refused(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    """206, the right Content-Range, `Content-Encoding: gzip`, chunked, no
    Content-Length: the gzip stream is not the object's bytes."""
    data = pattern(71, 0, 2 * MiB + 3)
    fake.put("z.bin", data)
    fake.gzip = True
    cache = tmp_path / "c"
    m = mounter(fake_bucket, cache_dir=cache, args=QUIET, allow_log=["Content-Length"])
    with pytest.raises(OSError) as info:
        (m.path / "z.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert "compressed" in m.log_file.read_text()
    assert os.getxattr(m.path / "z.bin", "user.modelfs.cached") == b"0"
    fake.gzip = False  # the server mends its ways
    assert (m.path / "z.bin").read_bytes() == data


# -- round 2, 3: no ETag on GETs, If-Match ignored ---------------------------------
def test_server_without_etag_on_gets_never_mixes_versions(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter
) -> None:
    """Listings carry ETags; GETs carry none and ignore If-Match. A handle
    pinned to version 1 must not be served version 2's chunk 1."""
    fake.get_etags = False
    fake.put("v.bin", pattern(72, 0, 3 * MiB), mtime=1_790_000_000.0)
    m = mounter(fake_bucket, args=QUIET, allow_log=["changed since it was opened"])
    with open(m.path / "v.bin", "rb", buffering=0) as f:
        _no_readahead(f)
        assert f.read(MiB) == pattern(72, 0, MiB)
        # Same size, a later Last-Modified: only the date tells them apart.
        fake.put("v.bin", pattern(73, 0, 3 * MiB), mtime=1_790_000_007.0)
        with pytest.raises(OSError) as info:
            f.read(MiB)
        assert info.value.errno == errno.ESTALE
