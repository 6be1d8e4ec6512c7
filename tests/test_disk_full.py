"""A cache directory that fills up: reads go on, served from the origin
without caching, with one warning."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Bucket, Mount, Mounter
from .data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20
WARNING = "cannot write to the cache"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs, far smaller than the --cache-size given."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _mount_small(mounter: Mounter, bucket: Bucket, small_fs: Path) -> Mount:
    """A mount whose --cache-size is ten times what its filesystem holds."""
    return mounter(
        bucket,
        cache_dir=small_fs / "cache",
        args=("--chunk-size", "1M", "--cache-size", "64M"),
        allow_log=[WARNING],
    )


def _warnings(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if WARNING in ln]


def test_disk_full_serves_from_the_origin(bucket: Bucket, mounter: Mounter, small_fs: Path) -> None:
    data = {f"shard-{i}.safetensors": pattern(30 + i, 0, 10 * MiB + i) for i in range(2)}
    for key, value in data.items():
        bucket.put(key, value)
    m = _mount_small(mounter, bucket, small_fs)
    for key, value in data.items():
        assert (m.path / key).read_bytes() == value, key
    assert len(_warnings(m.log_file)) == 1  # warned once, then carried on
    cache = m.stats()["cache"]
    assert cache["uncached_chunks"] > 0
    assert cache["used_bytes"] <= 6 * MiB
    # Still correct on re-reads (page cache dropped for the file: new opens
    # of the same version keep it, so read through a fresh mount instead).
    m.umount()
    m2 = _mount_small(mounter, bucket, small_fs)
    for key, value in data.items():
        assert (m2.path / key).read_bytes() == value, key
