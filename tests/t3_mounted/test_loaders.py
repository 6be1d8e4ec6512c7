"""Model loaders reading through the mount give what they give from a local
copy: safetensors with torch, transformers' from_pretrained, and several
tensor-parallel ranks reading one shard at once.

Loaders run in their own processes, as they do in production (and because
safetensors holds the GIL while it opens a file, which would stall the
in-process counting proxy the daemon talks to).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import Bucket, Mounter
from .test_safetensors import make_shards

if os.environ.get("MODELFS_REQUIRE_LOADERS"):
    import torch  # noqa: F401  (`make test`: a missing torch is a failure, not a skip)
else:
    pytest.importorskip("torch")
pytestmark = pytest.mark.mount

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")


def _py(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _upload(bucket: Bucket, local: Path, prefix: str) -> int:
    total = 0
    for p in sorted(local.iterdir()):
        bucket.put(prefix + p.name, p.read_bytes())
        total += p.stat().st_size
    return total


SAFE_OPEN_PT = """
import sys, torch
from safetensors import safe_open
mounted, local = sys.argv[1], sys.argv[2]
n = 0
with safe_open(mounted, framework="pt") as a, safe_open(local, framework="pt") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    assert a.metadata() == b.metadata()
    for key in sorted(a.keys()):  # vLLM's order: by name, through mmap
        ta, tb = a.get_tensor(key), b.get_tensor(key)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), key
        sa = a.get_slice(key)
        assert torch.equal(sa[: max(1, sa.get_shape()[0] // 3)], tb[: max(1, tb.shape[0] // 3)])
        n += 1
print(n)
"""


def test_safe_open_pt_matches_local(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    shards = make_shards(local, shards=2)
    total = _upload(bucket, local, "m/")
    m = mounter(bucket, "m", endpoint_url=proxy.endpoint_url, args=("--chunk-size", "1M"))
    proxy.reset()
    for shard in shards:
        out = _py(SAFE_OPEN_PT, str(m.path / shard.name), str(shard))
        assert int(out.stdout) == 24
    assert proxy.object_bytes() == total  # each byte fetched once


TP_RANK = """
import sys, torch
from safetensors import safe_open
mounted, local, rank, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with safe_open(mounted, framework="pt") as a, safe_open(local, framework="pt") as b:
    for key in sorted(a.keys()):
        s = a.get_slice(key)
        rows = s.get_shape()[0]
        lo, hi = rank * rows // world, (rank + 1) * rows // world
        assert torch.equal(s[lo:hi], b.get_slice(key)[lo:hi]), (rank, key)
print("ok")
"""


def test_tensor_parallel_ranks_read_one_shard_at_once(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (shard,) = make_shards(local, shards=1)
    _upload(bucket, local, "m/")
    m = mounter(bucket, "m", endpoint_url=proxy.endpoint_url, args=("--chunk-size", "1M"))
    proxy.reset()
    world = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TP_RANK, str(m.path / shard.name), str(shard), str(r)]
            + [str(world)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err[-3000:]
    # Four readers, one copy on the wire.
    assert proxy.object_bytes() == shard.stat().st_size


MAKE_TINY = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1], max_shard_size="300KB")
"""

LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[1, 5, 9, 200, 17, 3, 3, 42]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""


def test_transformers_from_pretrained_gives_the_same_logits(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter
) -> None:
    local = tmp_path / "tiny"
    _py(MAKE_TINY, str(local))
    files = sorted(p.name for p in local.iterdir())
    assert sum(f.endswith(".safetensors") for f in files) >= 2  # a sharded checkpoint
    total = _upload(bucket, local, "tiny/")
    m = mounter(bucket, "tiny", endpoint_url=proxy.endpoint_url, args=("--chunk-size", "1M"))
    proxy.reset()
    _py(LOGITS, str(local), str(tmp_path / "local.pt"))
    _py(LOGITS, str(m.path), str(tmp_path / "mounted.pt"))
    same = _py(
        "import sys, torch; a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2]); "
        "print(a.shape, torch.equal(a, b))",
        str(tmp_path / "local.pt"),
        str(tmp_path / "mounted.pt"),
    )
    assert same.stdout.strip() == "torch.Size([1, 8, 256]) True"
    assert proxy.object_bytes() <= total  # nothing fetched twice
