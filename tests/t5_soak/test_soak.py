"""Soak: several readers, random ranges, for a bounded time; every read is
checked against the origin's bytes, and the daemons' memory and open file
descriptors stay bounded. Two mounts share one cache directory smaller than
the data, so each evicts chunks the other reads. MODELFS_SOAK_SECONDS sets
the length: 180 by default, 30 under `make test` (and so in CI)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from ..conftest import Bucket, Mounter
from ..data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20
SECONDS = float(os.environ.get("MODELFS_SOAK_SECONDS", "180"))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_kinds(pid: int) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = (
            "payload"
            if "/data/" in target
            else "socket"
            if target.startswith("socket:")
            else "other"
        )
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def test_soak_random_readers(bucket: Bucket, mounter: Mounter, tmp_path: Path) -> None:
    files = {f"shard-{i}.bin": pattern(70 + i, 0, (12 + 5 * i) * MiB + i) for i in range(4)}
    for key, value in files.items():
        bucket.put(key, value)
    # A cache smaller than the data, so eviction runs all along; two mounts
    # on it, so it runs across processes. No checksum warning is allowed:
    # a chunk the other mount evicted is a miss, not corruption.
    args = ("--chunk-size", "1M", "--cache-size", "24M", "--memory-cache", "16M")
    mounts = [mounter(bucket, cache_dir=tmp_path / "shared", args=args) for _ in range(2)]
    deadline = time.monotonic() + SECONDS
    failures: list[str] = []
    reads = [0]
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        names = sorted(files)
        while time.monotonic() < deadline and not failures:
            name = rng.choice(names)
            data = files[name]
            off = rng.randrange(0, len(data))
            size = rng.choice([1, 4096, 128 * 1024, MiB, 3 * MiB + 7])
            m = mounts[seed % 2]
            with open(m.path / name, "rb", buffering=0) as f:
                if rng.random() < 0.3:  # some handles read on sequentially
                    for _ in range(rng.randrange(1, 6)):
                        got = os.pread(f.fileno(), size, off)
                        if got != data[off : off + size]:
                            failures.append(f"{name}@{off}+{size}")
                            return
                        off = min(len(data), off + size)
                else:
                    got = os.pread(f.fileno(), size, off)
                    if got != data[off : off + size]:
                        failures.append(f"{name}@{off}+{size}")
                        return
            with lock:
                reads[0] += 1

    fds_before = [_fds(m.pid) for m in mounts]
    threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
    rss_peak = 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss_peak = max([rss_peak] + [_rss(m.pid) for m in mounts])
        time.sleep(0.2)
    assert not failures, failures
    assert reads[0] > 50
    stats = [m.settle() for m in mounts]
    # Evictions happened in both (the cache is smaller than the data); the
    # cache stayed within its size, give or take what the other process was
    # storing at that moment (16 fetch slots of 1 MiB).
    assert all(s["cache"]["evicted_chunks"] > 0 for s in stats)
    assert stats[0]["cache"]["used_bytes"] <= 24 * MiB + 16 * MiB
    assert all(s["cache"]["corrupt_chunks"] == 0 for s in stats)
    assert rss_peak < 512 * MiB, rss_peak
    # Sockets are the HTTP connection pool (bounded by --fetch-concurrency);
    # no payload file may stay open once no handle and no fetch needs it
    # (fetches still storing what they fetched get a few seconds).
    for m, before, st in zip(mounts, fds_before, stats, strict=True):
        deadline = time.monotonic() + 10
        while _fd_kinds(m.pid).get("payload", 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        kinds = _fd_kinds(m.pid)
        assert kinds.get("payload", 0) == 0, kinds
        assert kinds.get("socket", 0) <= 16 + 4 + 4, kinds
        assert sum(kinds.values()) <= before + 16 + 4, (before, kinds)
        assert st["open_files"] == 0
