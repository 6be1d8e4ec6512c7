"""Prefetch on open: whole model files fetched in the background, in the
order loaders read them, behind any reader waiting on data."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelfs.prefetch import safetensors_order
from modelfs.testing.proxy import CountingProxy

from ..conftest import Bucket, Mount, Mounter
from ..data import pattern

MiB = 1 << 20


def _model(path: Path) -> bytes:
    """A shard whose file order differs from its name order."""
    rng = np.random.default_rng(7)
    tensors = {
        # float16 and float32 interleave in name order but not in file order
        f"layer.{i:02d}.{kind}": rng.standard_normal(n).astype(dt)
        for i in range(8)
        for kind, n, dt in (("a_weight", 300_000, np.float16), ("b_norm", 200_000, np.float32))
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def _wait_cached(path: Path, size: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while int(os.getxattr(path, "user.modelfs.cached")) < size:
        assert time.monotonic() < deadline, "prefetch on open did not finish"
        time.sleep(0.05)


def _sent_once(proxy: CountingProxy, m: Mount, name: str, size: int, longest_get: int) -> None:
    """Each byte of `name` crossed the wire once. A GET that fails midway
    is retried for what had not arrived, part of which the server may have
    sent already (in the socket buffers when the connection was dropped):
    at most one GET's bytes again per retry, and none without one. On
    failure: every GET of the object, and the daemon's store counters."""
    store = m.stats()["store"]
    twice = proxy.object_bytes(name) - size
    assert 0 <= twice <= store["retries"] * longest_get, f"{name} {proxy.get_log(name)} {store}"


@pytest.mark.mount
def test_opening_a_shard_fetches_it_whole_in_loader_order(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter
) -> None:
    data = _model(tmp_path / "model.safetensors")
    bucket.put("model.safetensors", data)
    bucket.put("notes.txt", pattern(2, 0, 6 * MiB))
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=("--chunk-size", "1M", "--prefetch-window", "0", "--fetch-concurrency", "2"),
    )
    proxy.reset()
    with open(m.path / "model.safetensors", "rb", buffering=0) as f:
        (hlen,) = struct.unpack("<Q", os.pread(f.fileno(), 8, 0))  # a loader reads 8 bytes
        _wait_cached(m.path / "model.safetensors", len(data))
    gets = proxy.object_gets("model.safetensors")
    assert proxy.object_bytes("model.safetensors") == len(data)  # whole file, once
    # The chunks in the order the GETs asked for them (a GET may carry a
    # run of consecutive chunks).
    starts = []
    for r in gets:
        first, last = (int(x) for x in r.range.split("=")[1].split("-"))
        starts += range(first // MiB, last // MiB + 1)
    assert len(starts) == len(set(starts))
    # The expected order: header chunk(s), then the chunks of the tensors
    # sorted by name, then whatever is left.
    header = data[8 : 8 + hlen]
    expected: dict[int, None] = {}
    for s, e in [(0, 8 + hlen), *safetensors_order(header, 8 + hlen, len(data))]:
        for n in range(s // MiB, (e - 1) // MiB + 1):
            expected.setdefault(n)
    for n in range(-(-len(data) // MiB)):
        expected.setdefault(n)
    assert list(expected) != sorted(expected)  # the test means something
    # Two fetches run at a time, so neighbours may finish swapped.
    pos = {n: i for i, n in enumerate(starts)}
    assert all(abs(pos[n] - i) <= 2 for i, n in enumerate(expected)), (starts, list(expected))

    # A file that matches no pattern gets no more than what is read.
    with open(m.path / "notes.txt", "rb", buffering=0) as f:
        os.pread(f.fileno(), 100, 0)
        time.sleep(1)
    assert int(os.getxattr(m.path / "notes.txt", "user.modelfs.cached")) < 6 * MiB


@pytest.mark.mount
def test_prefetch_on_open_can_be_turned_off(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("w.safetensors", pattern(3, 0, 20 * MiB))
    m = mounter(
        bucket,
        args=("--chunk-size", "1M", "--prefetch-window", "0", "--prefetch-on-open", ""),
    )
    with open(m.path / "w.safetensors", "rb", buffering=0) as f:
        os.pread(f.fileno(), 100, 0)
        time.sleep(1)
    cached = int(os.getxattr(m.path / "w.safetensors", "user.modelfs.cached"))
    assert 0 < cached <= 16 * MiB  # the kernel's read-ahead at most
    assert m.stats()["prefetched_on_open"] == 0


def _big_model(path: Path, seed: int) -> bytes:
    """A 192 MiB shard (more than the default memory cache) whose file
    order differs from its name order."""
    base = np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32)
    tensors = {
        f"layer.{i:02d}.{kind}": np.resize(base, n).astype(dt) * (i + 1)
        for i in range(8)
        for kind, n, dt in (("a_weight", 8 << 20, np.float16), ("b_norm", 2 << 20, np.float32))
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.read_bytes()


_LOADER = """
import sys
import numpy as np
from safetensors import safe_open

with safe_open(sys.argv[1], framework="np") as f:
    mounted = {k: f.get_tensor(k) for k in sorted(f.keys())}
with safe_open(sys.argv[2], framework="np") as f:
    assert all(np.array_equal(f.get_tensor(k), v) for k, v in mounted.items())
"""


@pytest.mark.mount
@pytest.mark.parametrize("reader", ["sequential", "loader"])
def test_a_cold_read_at_the_defaults_reads_no_chunk_twice(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter, reader: str
) -> None:
    # Shards larger than the default 128 MiB memory cache: what
    # read-ahead and prefetch on open fetch ahead of the reader must still
    # be in memory when it gets there, not dropped and read back from disk.
    shards = {f"model-{i}.safetensors": _big_model(tmp_path / f"{i}.st", i) for i in range(2)}
    for name, data in shards.items():
        bucket.put(name, data)
    m = mounter(bucket, endpoint_url=proxy.endpoint_url)
    for i, (name, data) in enumerate(shards.items()):
        if reader == "sequential":
            with open(m.path / name, "rb") as f:
                got = b"".join(iter(lambda: f.read(1 << 20), b""))
            assert got == data, name
        else:
            # vLLM's default loader, in a process of its own: safetensors
            # holds the GIL through its syscalls and page faults, and the
            # counting proxy that must answer them runs in this process.
            check = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _LOADER,
                    str(m.path / name),
                    str(tmp_path / f"{i}.st"),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert check.returncode == 0, check.stderr
    stats = m.settle()["cache"]
    assert proxy.object_bytes() == sum(len(d) for d in shards.values())
    # Every chunk fetched ahead of the reader was still in memory when it
    # got there, in file order or in the loader's name order.
    assert stats["verified_chunks"] == 0, stats


@pytest.mark.mount
@pytest.mark.parametrize("first_byte_delay", [0.0, 0.03])
def test_the_origins_distance_sets_the_length_of_the_whole_file_fetchs_gets(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter, first_byte_delay: float
) -> None:
    # Near (the gateway on this host answers in 4-5 ms), a request costs the
    # server and the daemon CPU on the cores they share: fewer, longer GETs.
    # Far (S3 answers in tens of ms), several GETs must be in flight inside
    # the lead: one chunk each.
    rng = np.random.default_rng(11)
    tensors = {f"t.{i:02d}": rng.standard_normal(1 << 20).astype(np.float32) for i in range(10)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    bucket.put("model.safetensors", data)
    bucket.put("notes.txt", pattern(5, 0, 24 * MiB))
    proxy.first_byte_delay = first_byte_delay
    try:
        m = mounter(
            bucket,
            endpoint_url=proxy.endpoint_url,
            # A lead of 8 chunks (half of memory): 4 per GET near, 1 far.
            args=("--chunk-size", "1M", "--memory-cache", "16M", "--prefetch-window", "0"),
        )
        with open(m.path / "notes.txt", "rb", buffering=0) as f:
            # GETs to time the origin by: the least of them counts, so a
            # busy machine delaying some does not make it look far.
            for n in range(24):
                os.pread(f.fileno(), 1, n * MiB)
        proxy.reset()
        with open(m.path / "model.safetensors", "rb", buffering=0) as f:
            os.pread(f.fileno(), 8, 0)  # a loader reads 8 bytes, then stalls
            _wait_cached(m.path / "model.safetensors", len(data))
            assert f.read() == data
    finally:
        proxy.first_byte_delay = 0.0
    _sent_once(proxy, m, "model.safetensors", len(data), longest_get=4 * MiB)
    lengths = []
    for r in proxy.object_gets("model.safetensors"):
        first, last = (int(x) for x in r.range.split("=")[1].split("-"))
        lengths.append(last // MiB - first // MiB + 1)
    if first_byte_delay:
        assert max(lengths) == 1, lengths
    else:
        # The header's chunk is read alone, before the fetch knows its order;
        # the rest is asked for in GETs of 4. A GET is cut short when memory
        # has fewer idle slabs than it wants (stores lag on a busy machine),
        # its rest fetched by the next one: 6 GETs of 4 in 15 with two busy
        # loops beside the test, 10 in 11 on an idle machine.
        assert max(lengths) == 4, lengths
        assert len(lengths) <= -(-len(data) // MiB) // 2, lengths


@pytest.mark.mount
def test_the_next_shard_is_fetched_before_the_loader_opens_it(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter
) -> None:
    # A loader reads its shards one after another; between two of them the
    # link idled while the next one was opened and its header fetched and
    # ordered. The next shard by name is fetched once the one being read
    # has been issued whole, within its share of the lead.
    shards = {}
    for i in range(2):
        rng = np.random.default_rng(20 + i)
        tensors = {f"t.{j:02d}": rng.standard_normal(1 << 20).astype(np.float32) for j in range(6)}
        save_file(tensors, str(tmp_path / "s.safetensors"))
        shards[f"model-0000{i + 1}-of-00002.safetensors"] = (
            tmp_path / "s.safetensors"
        ).read_bytes()
    for name, data in shards.items():
        bucket.put(name, data)
    first, second = shards
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=("--chunk-size", "1M", "--memory-cache", "16M"),
    )
    with open(m.path / first, "rb") as f:
        assert f.read() == shards[first]
    deadline = time.monotonic() + 30
    while int(os.getxattr(m.path / second, "user.modelfs.cached")) == 0:
        assert time.monotonic() < deadline, "the next shard was not fetched ahead"
        time.sleep(0.05)
    opened = time.monotonic()
    with open(m.path / second, "rb") as f:
        assert f.read() == shards[second]
    stats = m.settle()
    for name, data in shards.items():
        _sent_once(proxy, m, name, len(data), longest_get=4 * MiB)
    assert min(r.at for r in proxy.object_gets(second)) < opened
    # None read back from disk.
    assert stats["cache"]["verified_chunks"] == 0, f"{stats['cache']} {proxy.get_log()}"
