"""Prefetch on open: whole model files fetched in the background, in the
order loaders read them, behind any reader waiting on data."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelfs.prefetch import safetensors_order

from ..conftest import Bucket, Mounter
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
