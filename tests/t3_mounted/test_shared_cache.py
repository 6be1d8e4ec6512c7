"""Mounted tier: several processes on one cache directory.

Two mounts (and a ``modelfs pull``) share a cache directory: each chunk
crosses the wire once however they interleave, eviction by one never hands
another a wrong byte, and a cache directory that turns read-only under a
mount sends new files to the origin without failing their open.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelfs.testing.proxy import CountingProxy

from ..conftest import Bucket, Mount, Mounter, in_threads, run_modelfs
from ..data import put_shards

pytestmark = pytest.mark.mount

MiB = 1 << 20
ARGS = ("--chunk-size", "1M")


def _model(bucket: Bucket, n: int = 3, size: int = 12 * MiB) -> dict[str, bytes]:
    return put_shards(bucket, 60, n, size, 1000)


def _drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _reader(m: Mount, files: dict[str, bytes], order: list[str]) -> Callable[[], None]:
    def job() -> None:
        for key in order:
            assert (m.path / key).read_bytes() == files[key], (m.path, key)

    return job


def test_two_mounts_on_one_cache_fetch_each_byte_once(
    bucket: Bucket, proxy: CountingProxy, mounter: Mounter, tmp_path: Path
) -> None:
    files = _model(bucket)
    total = sum(len(v) for v in files.values())
    cache = tmp_path / "shared"
    # A memory cache smaller than the model, so the second round below has
    # to go to the disk cache the third process cleared.
    args = (*ARGS, "--memory-cache", "4M")
    a = mounter(bucket, endpoint_url=proxy.endpoint_url, cache_dir=cache, args=args)
    b = mounter(bucket, endpoint_url=proxy.endpoint_url, cache_dir=cache, args=args)
    keys = sorted(files)
    # Both read the same files at the same time, in opposite orders, and
    # both prefetch them on open: every chunk is wanted by both at once.
    in_threads(_reader(a, files, keys), _reader(b, files, keys[::-1]), _reader(b, files, keys))
    assert proxy.object_bytes() == total
    peers = a.stats()["cache"]["peer_chunks"] + b.stats()["cache"]["peer_chunks"]
    assert peers > 0  # one waited for the other's fetch instead of fetching

    # A `cache clear` from a third process, with both mounts up: the next
    # reads fetch everything once more, and once only.
    proc = run_modelfs("cache", "clear", "--cache-dir", str(cache))
    assert proc.returncode == 0, proc.stderr
    _drop_page_cache()
    proxy.reset()
    in_threads(_reader(a, files, keys), _reader(b, files, keys))
    assert proxy.object_bytes() == total
    a.umount()
    b.umount()


def test_pull_beside_a_mount_fetches_each_byte_once(
    bucket: Bucket, proxy: CountingProxy, mounter: Mounter, tmp_path: Path
) -> None:
    files = _model(bucket)
    cache = tmp_path / "shared"
    m = mounter(bucket, endpoint_url=proxy.endpoint_url, cache_dir=cache, args=ARGS)
    dest = tmp_path / "pulled"
    result: list[subprocess.CompletedProcess[str]] = []

    def pull() -> None:
        result.append(
            run_modelfs(
                "pull",
                f"s3://{bucket.name}/m",
                str(dest),
                "--endpoint-url",
                proxy.endpoint_url,
                "--cache-dir",
                str(cache),
                *ARGS,
                env=bucket.env,
                timeout=120,
            )
        )

    in_threads(pull, _reader(m, files, sorted(files)))
    assert result[0].returncode == 0, result[0].stderr
    for key, value in files.items():
        assert (dest / key.removeprefix("m/")).read_bytes() == value
    assert proxy.object_bytes() == sum(len(v) for v in files.values())
    m.umount()


def test_two_mounts_evicting_each_other_stay_byte_exact(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    """A cache a quarter the size of the model, two mounts reading it over
    and over: each evicts chunks the other has read or is reading."""
    files = _model(bucket, n=4, size=6 * MiB)
    cache = tmp_path / "shared"
    args = (
        *ARGS,
        *("--cache-size", "6M", "--memory-cache", "2M", "--prefetch-on-open", "none"),
        *("--fetch-concurrency", "4"),
    )
    a = mounter(bucket, cache_dir=cache, args=args)
    b = mounter(bucket, cache_dir=cache, args=args)
    keys = sorted(files)

    def rounds(m: Mount, order: list[str]) -> Callable[[], None]:
        def job() -> None:
            for _ in range(3):
                _drop_page_cache()
                _reader(m, files, order)()

        return job

    in_threads(rounds(a, keys), rounds(b, keys[::-1]), rounds(b, keys[1:] + keys[:1]))
    evicted = a.stats()["cache"]["evicted_chunks"] + b.stats()["cache"]["evicted_chunks"]
    assert evicted > 0
    # Each process keeps the cache within its size counting its own stores
    # in progress, not the other's: it may be over by what the other was
    # storing at that moment (4 fetch slots of 1 MiB each).
    assert a.stats()["cache"]["used_bytes"] <= 6 * MiB + 2 * 4 * MiB
    a.umount()
    b.umount()


@pytest.fixture
def read_only_later(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Turns a directory read-only in place (a read-only bind mount over
    it), the way a cache filesystem remounted read-only looks to new opens."""
    done: list[Path] = []

    def make(path: Path) -> None:
        subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], check=True)
        done.append(path)

    yield make
    for path in done:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_new_file_in_an_unwritable_cache_is_read_from_the_origin(
    bucket: Bucket,
    proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
    read_only_later: Callable[[Path], None],
) -> None:
    files = _model(bucket, n=2, size=3 * MiB)
    first, second = sorted(files)
    cache = tmp_path / "cache"
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        cache_dir=cache,
        # Without prefetch on open, which would fetch the second shard
        # ahead of its opening while the first is read, before the cache
        # turns read-only.
        args=(*ARGS, "--prefetch-on-open", ""),
        allow_log=["cannot write to the cache"],
    )
    assert (m.path / first).read_bytes() == files[first]
    read_only_later(cache)
    # Its payload file cannot be created: the open works, the bytes come
    # from the origin, uncached, with one warning.
    assert (m.path / second).read_bytes() == files[second]
    assert m.settle()["cache"]["uncached_chunks"] > 0
    assert int(os.getxattr(m.path / second, "user.modelfs.cached")) == 0
    warnings = [ln for ln in m.log_file.read_text().splitlines() if "cannot write" in ln]
    assert len(warnings) == 1, warnings
    # The file cached before is still served from the cache.
    _drop_page_cache()
    proxy.reset()
    assert (m.path / first).read_bytes() == files[first]
    assert proxy.object_bytes() == 0
    m.umount()
