#!/usr/bin/env python3
"""A consumer starting up: the time from "the node may begin" to "the model
is read", for a server that spends START seconds before it opens its first
shard (vLLM: ~19 s on this machine, of which loading weights is 0.35 s).

* download: `s5cmd cp` the model, then START seconds, then read it locally
  (an init container, then the server);
* cold mount: `modelfs mount`, START seconds, then read it through the mount;
* preload mount: `modelfs mount --preload`, START seconds, then read it.

Each scenario starts from an empty cache and a dropped page cache; the
median of --runs. With --delay/--rate the server sits behind the shaping
proxy of `make bench` (first-byte delay per request, rate per connection);
with --cap-gbit what the server sends is capped by an htb class on `lo`
(docs/benchmarks.md; the qdisc is removed on the way out, also on failure).
Needs root (drop_caches, tc) and FUSE.

    .venv/bin/python scripts/preload_bench.py --size-mib 1024 --start 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import LinkCap, compile_sources, drop_caches, generate_model, read_files, s5cmd_cp  # noqa: E402

from modelfs.testing.s3server import JuiceFSGateway  # noqa: E402

MiB = 1 << 20
BUCKET = "pre"


def _modelfs(*args: str, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modelfs", *args], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)


def download(endpoint: str, env: dict[str, str], dest: Path, start: float) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    drop_caches()
    t = time.perf_counter()
    subprocess.run(
        s5cmd_cp(endpoint, f"s3://{BUCKET}/*", dest),
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    time.sleep(start)
    read_files(sorted(dest.iterdir()))
    return time.perf_counter() - t


def mounted(
    endpoint: str, env: dict[str, str], work: Path, names: list[str], start: float, preload: bool
) -> float:
    mnt, cache = work / "mnt", work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    drop_caches()
    t = time.perf_counter()
    extra = ("--preload",) if preload else ()
    _modelfs("mount", f"s3://{BUCKET}", str(mnt), "--endpoint-url", endpoint,
             "--cache-dir", str(cache), *extra, env=env)  # fmt: skip
    try:
        time.sleep(start)
        read_files([mnt / n for n in names])
        return time.perf_counter() - t
    finally:
        _modelfs("umount", str(mnt), env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--start", type=float, default=2.0, help="the consumer's start-up, seconds")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.0, help="proxy first-byte delay, seconds")
    ap.add_argument("--rate", type=float, default=0.0, help="proxy rate per connection, B/s")
    ap.add_argument("--cap-gbit", type=float, default=0.0, help="cap the server's sending")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    compile_sources()
    work = Path(tempfile.mkdtemp(prefix="modelfs-preload-"))
    results: dict[str, list[float]] = {"download": [], "cold mount": [], "preload mount": []}
    shaper = None
    try:
        with JuiceFSGateway(work / "gw") as srv:
            (work / "model").mkdir()
            files = generate_model(work / "model", args.size_mib * MiB, args.shards)
            client = srv.client()
            client.create_bucket(Bucket=BUCKET)
            for f in files:
                srv.put_file(client, f, BUCKET, f.name)
            shutil.rmtree(work / "model")
            names = [f.name for f in files]
            env = dict(os.environ, **srv.env())
            endpoint = srv.endpoint_url
            if args.delay or args.rate:
                cmd = [sys.executable, "-m", "modelfs.testing.proxy", srv.endpoint_url]
                cmd += ["--delay", str(args.delay)] + (
                    ["--rate", str(args.rate)] if args.rate else []
                )
                shaper = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
                assert shaper.stdout is not None
                endpoint = shaper.stdout.readline().strip()
            port = int(srv.endpoint_url.rsplit(":", 1)[1])
            cap = LinkCap(port, args.cap_gbit) if args.cap_gbit else contextlib.nullcontext()
            with cap:
                for _ in range(args.runs):  # the scenarios alternate
                    results["download"].append(download(endpoint, env, work / "dl", args.start))
                    results["cold mount"].append(
                        mounted(endpoint, env, work, names, args.start, preload=False)
                    )
                    results["preload mount"].append(
                        mounted(endpoint, env, work, names, args.start, preload=True)
                    )
    finally:
        if shaper is not None:
            shaper.kill()
            shaper.wait()
        subprocess.run(["fusermount3", "-uz", str(work / "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    if args.json:
        print(json.dumps({"start_s": args.start, "seconds": results, "median": med}, indent=2))
        return 0
    base = med["download"]
    print(f"consumer start-up {args.start:g} s, {args.size_mib} MiB, median of {args.runs}:")
    for name, secs in med.items():
        runs = ", ".join(f"{s:.2f}" for s in results[name])
        print(f"  {name}: {secs:.2f} s ({base / secs:.2f}x download+start+read; runs {runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
