"""Loading a safetensors model through the mount with safe_open (mmap)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ..conftest import Bucket, Mounter

pytestmark = pytest.mark.mount


def make_shards(dirpath: Path, shards: int = 3, seed: int = 0) -> list[Path]:
    """A small multi-shard model with mixed dtypes (interleaved, as in real checkpoints)."""
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        tensors = {}
        for layer in range(6):
            p = f"model.layers.{s * 6 + layer}"
            tensors[f"{p}.mlp.weight"] = rng.standard_normal((256, 512)).astype(np.float16)
            tensors[f"{p}.norm.weight"] = rng.standard_normal(512).astype(np.float32)
            tensors[f"{p}.attn.qkv"] = rng.standard_normal((128, 384)).astype(np.float32)
            tensors[f"{p}.ids"] = rng.integers(0, 1 << 30, 1000, dtype=np.int64)
        path = dirpath / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        paths.append(path)
    return paths


def test_safe_open_through_mount_matches_local(
    tmp_path: Path, bucket: Bucket, mounter: Mounter
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    shards = make_shards(local)
    for p in shards:
        bucket.put(f"llm/{p.name}", p.read_bytes())
    m = mounter(bucket, "llm", args=("--chunk-size", "1M"))
    n = 0
    for p in shards:
        with (
            safe_open(str(p), framework="np") as ref,
            safe_open(str(m.path / p.name), framework="np") as got,
        ):
            assert sorted(got.keys()) == sorted(ref.keys())
            assert got.metadata() == ref.metadata()
            for key in sorted(ref.keys()):  # alphabetical, as vLLM's loader reads
                a, b = ref.get_tensor(key), got.get_tensor(key)
                assert a.dtype == b.dtype and a.shape == b.shape
                assert np.array_equal(a, b)
                n += 1
    assert n == 3 * 6 * 4
    assert m.fetched_bytes() == sum(p.stat().st_size for p in shards)
    m.umount()
