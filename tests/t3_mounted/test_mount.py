"""Integration tier: real mounts of a real S3 server (JuiceFS gateway)."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from modelfs.mounts import find_mount

from ..conftest import Bucket, Mounter
from ..data import pattern

MiB = 1 << 20
CHUNK = 1 * MiB

pytestmark = pytest.mark.mount

TREE = {
    "config.json": b'{"hidden_size": 4}',
    "empty.bin": b"",
    "model-00001-of-00002.safetensors": pattern(1, 0, 5 * MiB + 123),
    "model-00002-of-00002.safetensors": pattern(2, 0, 3 * MiB),  # exact chunk multiple
    "tokenizer/vocab.txt": b"a\nb\nc\n" * 1000,
    "tokenizer/deep/er/file": b"x",
}


def _fill(bucket: Bucket, prefix: str = "") -> None:
    for key, data in TREE.items():
        bucket.put(prefix + key, data)


def _read_tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_tree_attributes_and_bytes(bucket: Bucket, mounter: Mounter) -> None:
    _fill(bucket, "models/tiny/")
    bucket.put("elsewhere/not-visible", b"no")
    m = mounter(bucket, "models/tiny", args=("--chunk-size", "1M"))
    assert sorted(os.listdir(m.path)) == [
        "config.json",
        "empty.bin",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer",
    ]
    assert _read_tree(m.path) == TREE
    st = os.stat(m.path / "model-00001-of-00002.safetensors")
    head = bucket.client.head_object(Bucket=bucket.name, Key="models/tiny/config.json")
    assert st.st_size == 5 * MiB + 123
    assert int(os.stat(m.path / "config.json").st_mtime) == int(head["LastModified"].timestamp())
    assert os.stat(m.path / "tokenizer").st_mode & 0o777 == 0o555
    assert st.st_mode & 0o777 == 0o444
    assert os.getxattr(m.path / "config.json", "user.modelfs.etag").decode() == head["ETag"]
    m.umount()


def test_chunks_are_fetched_once_across_remount_and_kill(
    bucket: Bucket, proxy, mounter: Mounter
) -> None:
    _fill(bucket)
    total = sum(len(v) for v in TREE.values())
    cache = mounter.tmp_path / "shared-cache"
    m = mounter(
        bucket, endpoint_url=proxy.endpoint_url, cache_dir=cache, args=("--chunk-size", "1M")
    )
    assert _read_tree(m.path) == TREE
    assert _read_tree(m.path) == TREE  # second pass in the same mount
    gets = proxy.object_gets()
    # Every byte came over the wire exactly once, in ranged, conditional GETs.
    assert proxy.object_bytes() == total
    assert all(r.range and r.range.startswith("bytes=") for r in gets)
    etags = {
        f"/{bucket.name}/{k}": bucket.client.head_object(Bucket=bucket.name, Key=k)["ETag"]
        for k in TREE
    }
    assert all(r.if_match == etags[r.path] for r in gets)
    assert len(gets) == len({(r.path, r.range) for r in gets})
    m.umount()

    proxy.reset()
    m2 = mounter(
        bucket, endpoint_url=proxy.endpoint_url, cache_dir=cache, args=("--chunk-size", "1M")
    )
    assert _read_tree(m2.path) == TREE
    assert proxy.object_gets() == []
    assert m2.stats()["cache"]["verified_chunks"] > 0

    # A daemon killed without any chance to clean up loses nothing either.
    m2.kill(signal.SIGKILL)
    os.system(f"fusermount3 -uz {m2.path}")
    proxy.reset()
    m3 = mounter(
        bucket, endpoint_url=proxy.endpoint_url, cache_dir=cache, args=("--chunk-size", "1M")
    )
    assert _read_tree(m3.path) == TREE
    assert proxy.object_gets() == []
    m3.umount()


def test_concurrent_reads_of_one_missing_chunk_make_one_get(
    bucket: Bucket, proxy, mounter: Mounter
) -> None:
    data = pattern(7, 0, 8 * MiB)
    bucket.put("big.bin", data)
    m = mounter(bucket, endpoint_url=proxy.endpoint_url, args=("--chunk-size", "8M"))
    barrier = threading.Barrier(8)
    results: dict[int, bytes] = {}

    def reader(i: int) -> None:
        with open(m.path / "big.bin", "rb", buffering=0) as f:
            barrier.wait()
            results[i] = os.pread(f.fileno(), MiB, i * MiB)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b"".join(results[i] for i in range(8)) == data
    gets = proxy.object_gets("big.bin")
    assert len(gets) == 1 and gets[0].range == f"bytes=0-{8 * MiB - 1}"
    m.umount()


@pytest.mark.parametrize(
    "op",
    [
        lambda p: os.open(p / "new", os.O_WRONLY | os.O_CREAT),
        lambda p: os.open(p / "f", os.O_RDWR),
        lambda p: os.open(p / "f", os.O_WRONLY | os.O_APPEND),
        lambda p: os.truncate(p / "f", 0),
        lambda p: os.unlink(p / "f"),
        lambda p: os.rename(p / "f", p / "g"),
        lambda p: os.mkdir(p / "d2"),
        lambda p: os.rmdir(p / "d"),
        lambda p: os.chmod(p / "f", 0o777),
        lambda p: os.utime(p / "f", (1, 1)),
        lambda p: os.symlink("f", p / "s"),
        lambda p: os.link(p / "f", p / "h"),
        lambda p: os.setxattr(p / "f", "user.x", b"1"),
        lambda p: os.removexattr(p / "f", "user.modelfs.etag"),
    ],
    ids=[
        "create",
        "open-rw",
        "append",
        "truncate",
        "unlink",
        "rename",
        "mkdir",
        "rmdir",
        "chmod",
        "utime",
        "symlink",
        "link",
        "setxattr",
        "removexattr",
    ],
)
def test_every_write_gets_erofs(bucket: Bucket, mounter: Mounter, op) -> None:
    bucket.put("f", b"data")
    bucket.put("d/x", b"data")
    m = mounter(bucket)
    with pytest.raises(OSError) as info:
        op(m.path)
    assert info.value.errno == errno.EROFS
    assert (m.path / "f").read_bytes() == b"data"
    m.umount()


def test_sigterm_unmounts_cleanly(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("f", b"data")
    m = mounter(bucket)
    assert (m.path / "f").read_bytes() == b"data"
    m.kill(signal.SIGTERM)
    assert find_mount(m.path) is None


def test_changed_object_gives_estale_and_new_opens_see_new_version(
    bucket: Bucket, mounter: Mounter
) -> None:
    old = pattern(1, 0, 40 * MiB)
    new = pattern(2, 0, 40 * MiB)
    bucket.put("w.bin", old)
    # No read-ahead or prefetch on open, so the chunk read below is still
    # missing when the object changes (the kernel's read-ahead stops at 16 MiB).
    m = mounter(
        bucket,
        args=(
            "--chunk-size",
            "1M",
            "--metadata-ttl",
            "0.5",
            "--prefetch-window",
            "0",
            "--prefetch-on-open",
            "none",
        ),
        allow_log=["changed since it was opened"],
    )
    with open(m.path / "w.bin", "rb", buffering=0) as f:
        assert os.pread(f.fileno(), MiB, 0) == old[:MiB]
        bucket.put("w.bin", new)
        with pytest.raises(OSError) as info:
            os.pread(f.fileno(), MiB, 32 * MiB)  # a chunk not fetched yet
        assert info.value.errno == errno.ESTALE
        # Once stale, the handle never serves bytes again, not even cached
        # ones (dropped from the page cache first, so the read reaches modelfs).
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as info:
            os.pread(f.fileno(), 4096, 4096)
        assert info.value.errno == errno.ESTALE
    assert (m.path / "w.bin").read_bytes() == new
    m.umount()


def test_same_content_under_two_keys_shares_chunks(bucket: Bucket, proxy, mounter: Mounter) -> None:
    data = pattern(3, 0, 3 * MiB)
    bucket.put("a/model.bin", data)
    bucket.put("b/model.bin", data)
    m = mounter(bucket, endpoint_url=proxy.endpoint_url, args=("--chunk-size", "1M"))
    assert (m.path / "a/model.bin").read_bytes() == data
    assert (m.path / "b/model.bin").read_bytes() == data
    assert proxy.object_bytes() == len(data)
    m.umount()


def test_cache_size_bounds_disk_use(bucket: Bucket, mounter: Mounter) -> None:
    files = {f"f{i}": pattern(10 + i, 0, 3 * MiB) for i in range(6)}
    for k, v in files.items():
        bucket.put(k, v)
    m = mounter(bucket, args=("--chunk-size", "1M", "--cache-size", "5M"))
    for k, v in files.items():
        assert (m.path / k).read_bytes() == v
    stats = m.settle()["cache"]  # chunks are written, and room made, after the read
    assert stats["used_bytes"] <= 5 * MiB
    assert stats["evicted_chunks"] >= 13
    blocks = sum(p.stat().st_blocks * 512 for p in (m.cache_dir / "data").rglob("*") if p.is_file())
    assert blocks <= 5 * MiB + 64 * 1024
    # Evicted chunks are fetched again and still byte-exact.
    assert (m.path / "f0").read_bytes() == files["f0"]
    m.umount()


def test_kernel_read_ahead_is_raised(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("f", pattern(9, 0, 3 * MiB))
    m = mounter(bucket)
    entry = find_mount(m.path)
    assert entry is not None and entry.fstype == "fuse.modelfs"
    bdi = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
    assert int(bdi.read_text()) == 16384
    assert (m.path / "f").read_bytes() == pattern(9, 0, 3 * MiB)
    m.umount()


def test_after_metadata_ttl_new_opens_see_the_new_version(
    bucket: Bucket, proxy, mounter: Mounter
) -> None:
    bucket.put("cfg.json", b'{"v": 1}')
    m = mounter(bucket, endpoint_url=proxy.endpoint_url, args=("--metadata-ttl", "1"))
    assert (m.path / "cfg.json").read_bytes() == b'{"v": 1}'
    bucket.put("cfg.json", b'{"v": 22}')
    # Within the TTL the pinned listing (and the cached chunk) still answer.
    assert (m.path / "cfg.json").read_bytes() == b'{"v": 1}'
    lists = len([r for r in proxy.snapshot() if "list-type" in r.query])
    time.sleep(1.5)
    assert (m.path / "cfg.json").read_bytes() == b'{"v": 22}'
    assert os.stat(m.path / "cfg.json").st_size == 9
    assert len([r for r in proxy.snapshot() if "list-type" in r.query]) > lists
    m.umount()


def test_the_start_up_probe_is_the_first_listing(bucket: Bucket, proxy, mounter: Mounter) -> None:
    """The probe lists the mount's first level whole; the first lookups take
    that listing instead of asking the server again, one round trip less
    before the first byte. A directory below it is listed on first use."""
    bucket.put("config.json", b"{}")
    bucket.put("weights/model.bin", pattern(3, 0, MiB))
    m = mounter(bucket, endpoint_url=proxy.endpoint_url)
    assert sorted(os.listdir(m.path)) == ["config.json", "weights"]
    assert (m.path / "config.json").read_bytes() == b"{}"
    assert (m.path / "weights" / "model.bin").read_bytes() == pattern(3, 0, MiB)
    listings = [
        parse_qs(r.query).get("prefix", [""])[0] for r in proxy.snapshot() if "list-type" in r.query
    ]
    assert sorted(listings) == ["", "weights/"]
    m.umount()
