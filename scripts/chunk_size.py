#!/usr/bin/env python3
"""Measure the effect of --chunk-size, to choose its default.

One local S3 server (JuiceFS gateway), one 1 GiB object. For each chunk size:
a cold sequential read (empty cache), a warm one (remount over the cache,
page cache dropped), and 200 random 128 KiB reads on an empty cache (mean
latency, and bytes fetched per byte read). Prints a Markdown table.
Needs root (drop_caches) and FUSE. Usage: scripts/chunk_size.py [SIZES...]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modelfs.testing.s3server import JuiceFSGateway

SIZE = 1 << 30
MiB = 1 << 20


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> int:
    sizes = sys.argv[1:] or ["1M", "2M", "4M", "8M", "16M", "32M"]
    work = Path(tempfile.mkdtemp(prefix="modelfs-chunks-"))
    srv = JuiceFSGateway(work / "s3")
    mnt = work / "mnt"
    mnt.mkdir()
    srv.start()
    try:
        env = dict(os.environ, **srv.env())
        c = srv.client()
        c.create_bucket(Bucket="bench")
        c.put_object(Bucket="bench", Key="f.bin", Body=os.urandom(SIZE))

        def mount(cache: Path, cs: str) -> None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "modelfs",
                    "mount",
                    "s3://bench",
                    str(mnt),
                    "--endpoint-url",
                    srv.endpoint_url,
                    "--cache-dir",
                    str(cache),
                    "--chunk-size",
                    cs,
                ],
                env=env,
                check=True,
            )

        def umount() -> None:
            subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], check=True)

        def seq() -> float:
            drop_caches()
            t = time.perf_counter()
            with open(mnt / "f.bin", "rb", buffering=0) as f:
                while f.read(MiB):
                    pass
            return SIZE / MiB / (time.perf_counter() - t)

        print(
            "| chunk | cold seq MiB/s | warm seq MiB/s "
            "| random 128 KiB read, ms | fetched per byte read |"
        )
        print("|---|---|---|---|---|")
        for cs in sizes:
            cache = work / f"cache-{cs}"
            mount(cache, cs)
            cold = seq()
            umount()
            mount(cache, cs)
            warm = seq()
            umount()
            shutil.rmtree(cache)
            mount(cache, cs)
            drop_caches()
            rng = random.Random(1)
            lat = []
            fd = os.open(mnt / "f.bin", os.O_RDONLY)
            for _ in range(200):
                off = rng.randrange(0, SIZE - 128 * 1024) // 4096 * 4096
                t = time.perf_counter()
                os.pread(fd, 128 * 1024, off)
                lat.append((time.perf_counter() - t) * 1000)
            os.close(fd)
            fetched = json.loads(os.getxattr(mnt, "user.modelfs.stats"))["store"]["get_bytes"]
            umount()
            shutil.rmtree(cache)
            amp = fetched / (200 * 128 * 1024)
            print(
                f"| {cs} | {cold:.0f} | {warm:.0f} | {statistics.mean(lat):.1f} | {amp:.1f} |",
                flush=True,
            )
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
