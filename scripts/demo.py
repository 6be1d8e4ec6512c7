#!/usr/bin/env python3
"""`make demo`: the main job end to end, on a local S3 server.

Starts a JuiceFS S3 gateway on loopback, uploads a generated multi-shard
safetensors model, mounts the bucket with modelfs, loads every tensor
through the mount, and prints what was fetched and how long it took. Then it
remounts over the same cache and loads again: nothing is fetched twice.
Everything it starts is stopped and removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from modelfs.mounts import find_mount
from modelfs.testing.s3server import JuiceFSGateway

BUCKET = "models"
PREFIX = "demo-llm"
SHARDS = 4
LAYERS_PER_SHARD = 8


def generate(dirpath: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(SHARDS):
        tensors = {}
        for i in range(LAYERS_PER_SHARD):
            p = f"model.layers.{s * LAYERS_PER_SHARD + i}"
            tensors[f"{p}.mlp.down_proj.weight"] = rng.standard_normal(
                (1024, 2048), np.float32
            ).astype(np.float16)
            tensors[f"{p}.mlp.up_proj.weight"] = rng.standard_normal(
                (2048, 1024), np.float32
            ).astype(np.float16)
            tensors[f"{p}.input_layernorm.weight"] = rng.standard_normal(1024, np.float32)
        path = dirpath / f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        paths.append(path)
    (dirpath / "config.json").write_text(
        json.dumps({"num_hidden_layers": SHARDS * LAYERS_PER_SHARD})
    )
    return paths


def modelfs(*args: str, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modelfs", *args], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"modelfs {args[0]} failed: {proc.stderr.strip()}")


def load(mnt: Path, local: list[Path]) -> tuple[float, int, int]:
    """Load every tensor through the mount (timed), then check it against the local copy."""
    t0 = time.perf_counter()
    loaded = {}
    for ref_path in local:
        with safe_open(str(mnt / ref_path.name), framework="np") as f:
            for key in sorted(f.keys()):  # alphabetical, as vLLM's default loader
                loaded[(ref_path, key)] = f.get_tensor(key)
    secs = time.perf_counter() - t0
    for (ref_path, key), tensor in loaded.items():
        with safe_open(str(ref_path), framework="np") as ref:
            if not np.array_equal(tensor, ref.get_tensor(key)):
                raise SystemExit(f"MISMATCH in {ref_path.name}:{key}")
    return secs, len(loaded), sum(t.nbytes for t in loaded.values())


def stats(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, "user.modelfs.stats"))


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="modelfs-demo-"))
    server = JuiceFSGateway(work / "s3")
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        print(f"1. starting a local S3 server (JuiceFS gateway) in {work / 's3'}")
        server.start()
        env = dict(os.environ, **server.env())
        local_dir = work / "local"
        local_dir.mkdir()
        shards = generate(local_dir)
        size = sum(p.stat().st_size for p in shards)
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        for p in [*shards, local_dir / "config.json"]:
            client.upload_file(str(p), BUCKET, f"{PREFIX}/{p.name}")
        print(
            f"2. uploaded a {SHARDS}-shard safetensors model, {size / 2**20:.1f} MiB, "
            f"to s3://{BUCKET}/{PREFIX}/"
        )

        cache = work / "cache"
        mount_args = [
            "mount",
            f"s3://{BUCKET}/{PREFIX}",
            str(mnt),
            "--endpoint-url",
            server.endpoint_url,
            "--cache-dir",
            str(cache),
        ]
        for run in ("cold (empty cache)", "warm (remounted over the same cache)"):
            t0 = time.perf_counter()
            modelfs(*mount_args, env=env)
            t_mount = time.perf_counter() - t0
            before = stats(mnt)["store"]
            secs, ntensors, nbytes = load(mnt, shards)
            s = stats(mnt)
            print(f"\n== {run}")
            print(f"   mount returned in        {t_mount * 1000:.0f} ms")
            print(f"   files in the mount       {', '.join(sorted(os.listdir(mnt)))}")
            print(
                f"   loaded {ntensors} tensors ({nbytes / 2**20:.1f} MiB) in {secs:.2f} s "
                f"= {nbytes / 2**20 / secs:.0f} MiB/s, all equal to the local copy"
            )
            fetched = s["store"]["get_bytes"] - before["get_bytes"]
            gets = s["store"]["get_requests"] - before["get_requests"]
            print(f"   fetched from S3          {fetched / 2**20:.1f} MiB in {gets} ranged GETs")
            c = s["cache"]
            used = c["used_bytes"] / 2**20
            print(
                f"   chunk cache              {c['chunks']} chunks, {used:.1f} MiB; "
                f"fetched {c['fetched_chunks']}, verified from disk {c['verified_chunks']}"
            )
            modelfs("umount", str(mnt), env=env)
        print("\n3. unmounted; the cache stays in place for the next mount.")
        return 0
    finally:
        if find_mount(mnt) is not None:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        server.stop()
        if not os.environ.get("MODELFS_DEMO_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
