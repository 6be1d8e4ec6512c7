"""--preload: the files a loader will read fetched right after mount, in
loader order, behind every read; counted on the wire by the proxy."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelfs.testing.proxy import CountingProxy

from ..conftest import Bucket, Mount, Mounter, run_modelfs
from ..data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20
# Shards named so that the index's order (c, a, b) is neither name order
# nor size order.
SHARDS = {"model-c.safetensors": 3, "model-a.safetensors": 2, "model-b.safetensors": 4}


def _model(tmp_path: Path, bucket: Bucket, prefix: str = "") -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for i, (name, mib) in enumerate(SHARDS.items()):
        tensors = {
            f"t{i}.{j}": rng.standard_normal(mib * MiB // 16).astype(np.float32) for j in range(4)
        }
        save_file(tensors, str(tmp_path / name), metadata={"format": "pt"})
        files[name] = (tmp_path / name).read_bytes()
        weight_map.update({t: name for t in tensors})
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    files["config.json"] = b'{"model_type": "llama"}'
    files["notes.bin.txt"] = pattern(3, 0, 17 * MiB)  # large, not a model file: never preloaded
    for name, data in files.items():
        bucket.put(prefix + name, data)
    return files


def _wait_preloaded(m: Mount, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (pre := m.stats()["preload"])["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, f"preload did not finish: {pre}"
        time.sleep(0.05)
    return dict(pre)


def test_preload_fetches_the_model_once_in_loader_order_before_any_read(
    tmp_path: Path, bucket: Bucket, proxy: CountingProxy, mounter: Mounter
) -> None:
    files = _model(tmp_path, bucket)
    shard_bytes = sum(len(files[n]) for n in SHARDS)
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=("--preload", "--chunk-size", "1M", "--fetch-concurrency", "4"),
    )
    pre = _wait_preloaded(m)
    small = len(files["config.json"]) + len(files["model.safetensors.index.json"])
    assert pre["state"] == "done" and pre["files"] == 5 and pre["files_done"] == 5
    assert pre["bytes"] == pre["bytes_done"] == shard_bytes + small
    m.settle()
    # Every shard byte crossed the wire once, with no reader at all; the
    # file that is not a model file was not fetched.
    for name in SHARDS:
        assert proxy.object_bytes(name) == len(files[name]), name
    assert proxy.object_gets("notes.bin.txt") == []
    # Loader order: the header chunk of every shard first, in the index's order.
    firsts = [
        r.path.rsplit("/", 1)[1]
        for r in proxy.object_gets(".safetensors")
        if r.range is not None and r.range.startswith("bytes=0-")
    ]
    assert firsts[:3] == list(SHARDS), firsts
    # Warm now: reading every file fetches nothing more.
    proxy.reset()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for name in SHARDS:
        assert (m.path / name).read_bytes() == files[name]
    assert proxy.object_bytes(".safetensors") == 0
    # A readiness probe over the model's files says it is all there.
    model = [str(m.path / n) for n in files if n != "notes.bin.txt"]
    check = run_modelfs("warm", "--check", *model)
    assert check.returncode == 0, check.stdout + check.stderr
    check = run_modelfs("warm", "--check", str(m.path))
    assert check.returncode == 1  # the large non-model file is not preloaded


def test_reads_during_preload_are_exact_and_nothing_is_fetched_twice(
    tmp_path: Path, bucket: Bucket, proxy: CountingProxy, mounter: Mounter
) -> None:
    files = _model(tmp_path, bucket)
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=("--preload", "--chunk-size", "1M", "--fetch-concurrency", "2"),
    )
    # A loader starts at once, last shard first: its reads go ahead of the preload.
    for name in reversed(list(SHARDS)):
        with open(m.path / name, "rb") as f:
            assert f.read() == files[name]
    _wait_preloaded(m)
    m.settle()
    for name in SHARDS:
        assert proxy.object_bytes(name) == len(files[name]), name
    stats = m.stats()
    # Each chunk fetched once: the shards' and the two small JSON files'.
    assert stats["cache"]["fetched_chunks"] == sum(-(-len(files[n]) // MiB) for n in SHARDS) + 2


def test_preload_is_off_by_default_and_mountable_from_fstab_options(
    tmp_path: Path, bucket: Bucket, mounter: Mounter
) -> None:
    _model(tmp_path, bucket)
    m = mounter(bucket)
    assert m.stats()["preload"] is None
    mnt = tmp_path / "fstab-mnt"
    mnt.mkdir()
    opts = f"endpoint_url={bucket.endpoint_url},cache_dir={tmp_path / 'c2'},preload"
    proc = run_modelfs(f"s3://{bucket.name}", str(mnt), "-o", opts, env=bucket.env)
    assert proc.returncode == 0, proc.stderr
    pid = int(os.getxattr(mnt, "user.modelfs.pid"))
    m2 = Mount(mnt, tmp_path / "c2", tmp_path / "c2" / "modelfs.log", pid)
    mounter.mounts.append(m2)  # torn down with the others
    assert _wait_preloaded(m2)["state"] == "done"


def test_preload_from_a_far_origin_fetches_in_one_chunk_gets(
    tmp_path: Path, bucket: Bucket, proxy: CountingProxy, mounter: Mounter
) -> None:
    # An origin that answers in tens of ms (S3) and caps each connection:
    # the preload's GETs of 32 chunks ran two streams per file at once
    # (211 MiB/s behind 25 ms and 80 MiB/s per connection); one chunk each
    # keeps --fetch-concurrency streams going (322-326 MiB/s).
    files = _model(tmp_path, bucket)
    proxy.first_byte_delay = 0.03
    try:
        m = mounter(
            bucket, endpoint_url=proxy.endpoint_url, args=("--preload", "--chunk-size", "1M")
        )
        pre = _wait_preloaded(m)
        m.settle()
    finally:
        proxy.first_byte_delay = 0.0
    assert pre["state"] == "done" and pre["files_done"] == 5
    lengths = []
    for name in SHARDS:
        assert proxy.object_bytes(name) == len(files[name]), name  # each byte once
        for r in proxy.object_gets(name):
            first, last = (int(x) for x in r.range.split("=")[1].split("-"))
            lengths.append(last // MiB - first // MiB + 1)
    assert max(lengths) == 1, lengths
