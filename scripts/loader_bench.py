#!/usr/bin/env python3
"""How vLLM's safetensors load strategies fare through a modelfs mount.

For docs/vllm.md. One generated model (safetensors shards, float16 weights
interleaved with float32 norms, so name order jumps back and forth in the
file as in real checkpoints), one JuiceFS gateway, and each load in its own
process, timed from the first open to the last tensor (imports excluded):

* lazy     - vLLM's default: safe_open(framework="pt"), get_tensor for every
             key in sorted order, through mmap;
* eager    - read each file whole, then safetensors.torch.load (vLLM's
             --safetensors-load-strategy eager);
* prefetch - read each file sequentially first, then as lazy (vLLM's
             --safetensors-load-strategy prefetch).

Each under: a cold cache with prefetch on open (the default), a cold cache
without it, and a warm disk cache (after `modelfs warm`, remounted, page
cache dropped); on loopback and behind a proxy that adds a first-byte delay
and a per-connection rate cap, as a remote S3 endpoint does. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import BUCKET, PREFIX, compile_sources, drop_caches, generate_model  # noqa: E402

from modelfs.testing.proxy import CountingProxy  # noqa: E402
from modelfs.testing.s3server import JuiceFSGateway  # noqa: E402

MiB = 1 << 20

LOAD = r"""
import sys, time
import torch
from safetensors import safe_open
from safetensors.torch import load
strategy, paths = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
n = 0
for p in paths:
    if strategy == "eager":
        with open(p, "rb") as f:
            n += len(load(f.read()))
        continue
    if strategy == "prefetch":
        with open(p, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass
    with safe_open(p, framework="pt") as f:
        for k in sorted(f.keys()):
            f.get_tensor(k)
            n += 1
print(time.perf_counter() - t, n)
"""


def mount(endpoint: str, mnt: Path, cache: Path, env: dict[str, str], *extra: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "modelfs", "mount", f"s3://{BUCKET}/{PREFIX}", str(mnt)]
        + ["--endpoint-url", endpoint, "--cache-dir", str(cache), *extra],
        env=env,
        check=True,
    )


def umount(mnt: Path) -> None:
    subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], check=True)


def load(strategy: str, files: list[Path]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", LOAD, strategy, *map(str, files)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out/loaders.json"))
    args = ap.parse_args()
    compile_sources()
    work = Path(tempfile.mkdtemp(prefix="modelfs-loaders-"))
    results: dict[str, dict[str, float]] = {}
    try:
        with JuiceFSGateway(work / "gw") as srv:
            env = dict(os.environ, **srv.env())
            local = work / "local"
            local.mkdir()
            paths = generate_model(local, args.size_mib * MiB, args.shards)
            size = sum(p.stat().st_size for p in paths)
            client = srv.client()
            client.create_bucket(Bucket=BUCKET)
            for p in paths:
                srv.put_file(client, p, BUCKET, f"{PREFIX}/{p.name}")
            mnt = work / "mnt"
            mnt.mkdir()
            files = [mnt / p.name for p in paths]
            profiles = {
                "loopback": None,
                "latency (25 ms first byte, 80 MiB/s per conn)": (0.025, 80 * MiB),
            }
            for profile, shape in profiles.items():
                proxy = None
                endpoint = srv.endpoint_url
                if shape is not None:
                    proxy = CountingProxy(
                        srv.endpoint_url, first_byte_delay=shape[0], rate=shape[1]
                    ).start()
                    endpoint = proxy.endpoint_url
                try:
                    for strategy in ("lazy", "eager", "prefetch"):
                        for cond, extra, warm in (
                            ("cold, prefetch on open", (), False),
                            ("cold, no prefetch on open", ("--prefetch-on-open", "none"), False),
                            ("warm disk cache", (), True),
                        ):
                            times = []
                            for _ in range(args.runs):
                                cache = work / "cache"
                                shutil.rmtree(cache, ignore_errors=True)
                                if warm:
                                    mount(endpoint, mnt, cache, env)
                                    subprocess.run(
                                        [sys.executable, "-m", "modelfs", "warm", str(mnt)],
                                        check=True,
                                        capture_output=True,
                                    )
                                    umount(mnt)
                                drop_caches()
                                mount(endpoint, mnt, cache, env, *extra)
                                times.append(load(strategy, files))
                                umount(mnt)
                            med = statistics.median(times)
                            key = f"{profile} | {strategy} | {cond}"
                            results[key] = {"seconds": med, "MiB/s": size / MiB / med}
                            print(f"{key}: {med:.2f} s ({size / MiB / med:.0f} MiB/s)", flush=True)
                        if shape is not None:
                            continue  # the local disk has no network profile
                        times = []
                        for _ in range(args.runs):
                            drop_caches()
                            times.append(load(strategy, paths))
                        med = statistics.median(times)
                        key = f"- | {strategy} | local disk"
                        results[key] = {"seconds": med, "MiB/s": size / MiB / med}
                        print(f"{key}: {med:.2f} s ({size / MiB / med:.0f} MiB/s)", flush=True)
                finally:
                    if proxy is not None:
                        proxy.stop()
    finally:
        if os.path.ismount(work / "mnt"):
            subprocess.run(["fusermount3", "-uz", str(work / "mnt")])
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model_bytes": size, "results": results}, indent=2) + "\n")
    print("\n| profile | strategy | condition | seconds | MiB/s |\n|---|---|---|---|---|")
    for key, r in results.items():
        profile, strategy, cond = key.split(" | ")
        print(f"| {profile} | {strategy} | {cond} | {r['seconds']:.2f} | {r['MiB/s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
