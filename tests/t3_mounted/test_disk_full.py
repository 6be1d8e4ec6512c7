"""A cache directory that fills up: reads go on, served from the origin
without caching, with one warning."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import Bucket, Mount, Mounter, run_modelfs
from ..data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20
WARNING = "cannot write to the cache"


def _tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    d = tmp_path / f"fs-{size}"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs, far smaller than the --cache-size given."""
    yield from _tmpfs(tmp_path, "6m")


@pytest.fixture
def fs16(tmp_path: Path) -> Iterator[Path]:
    yield from _tmpfs(tmp_path, "16m")


def _mount_small(mounter: Mounter, bucket: Bucket, small_fs: Path) -> Mount:
    """A mount whose --cache-size is ten times what its filesystem holds."""
    return mounter(
        bucket,
        cache_dir=small_fs / "cache",
        # No free-space guard: this test is about writes that fail.
        args=("--chunk-size", "1M", "--cache-size", "64M", "--min-free-space", "0"),
        allow_log=[WARNING],
    )


def test_free_space_guard_evicts_before_the_disk_fills(
    bucket: Bucket, mounter: Mounter, fs16: Path
) -> None:
    """--min-free-space: the cache evicts to leave that much free, so the 16
    MiB filesystem never fills and no write fails; when something else eats
    the space, chunks are served uncached, with the one warning."""
    small_fs = fs16
    data = {f"g-{i}.bin": pattern(40 + i, 0, 5 * MiB + i) for i in range(3)}
    for key, value in data.items():
        bucket.put(key, value)
    late = pattern(49, 0, 3 * MiB)
    bucket.put("late.bin", late)
    m = mounter(
        bucket,
        cache_dir=small_fs / "cache",
        # Two fetches at a time: the guard counts chunks being stored, and
        # sixteen of them would not fit this filesystem at all.
        args=(
            "--chunk-size",
            "1M",
            "--cache-size",
            "64M",
            "--min-free-space",
            "4M",
            "--fetch-concurrency",
            "2",
        ),
        allow_log=[WARNING],
    )
    for key, value in data.items():
        assert (m.path / key).read_bytes() == value, key
        # (the index's own pages grow after the check: a little slack)
        assert os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize >= 4 * MiB - 256 * 1024
    cache = m.settle()["cache"]
    assert cache["evicted_chunks"] > 0
    # No write ever hit a full disk. (Under load the guard may once find
    # every old chunk in use and skip storing one: then it says so.)
    assert all("min-free-space" in w for w in _warnings(m.log_file))
    # Another program fills the filesystem, after the cache was emptied, so
    # eviction has nothing left to free.
    cleared = run_modelfs("cache", "clear", "--cache-dir", str(small_fs / "cache"))
    assert cleared.returncode == 0, cleared.stderr
    filler = small_fs / "filler"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler.write_bytes(b"x" * (free - 512 * 1024))
    assert (m.path / "late.bin").read_bytes() == late
    assert m.settle()["cache"]["uncached_chunks"] > 0
    assert len(_warnings(m.log_file)) == 1
    assert "min-free-space" in _warnings(m.log_file)[0]


def _warnings(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if WARNING in ln]


def test_disk_full_serves_from_the_origin(bucket: Bucket, mounter: Mounter, small_fs: Path) -> None:
    data = {f"shard-{i}.safetensors": pattern(30 + i, 0, 10 * MiB + i) for i in range(2)}
    for key, value in data.items():
        bucket.put(key, value)
    m = _mount_small(mounter, bucket, small_fs)
    for key, value in data.items():
        assert (m.path / key).read_bytes() == value, key
    cache = m.settle()["cache"]
    assert len(_warnings(m.log_file)) == 1  # warned once, then carried on
    assert cache["uncached_chunks"] > 0
    assert cache["used_bytes"] <= 6 * MiB
    # Still correct on re-reads (page cache dropped for the file: new opens
    # of the same version keep it, so read through a fresh mount instead).
    m.umount()
    m2 = _mount_small(mounter, bucket, small_fs)
    for key, value in data.items():
        assert (m2.path / key).read_bytes() == value, key
