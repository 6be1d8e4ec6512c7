#!/usr/bin/env python3
"""Where the daemon's time goes on a whole-file read (for docs/benchmarks.md).

Uploads one object and runs the daemon in the foreground under pyinstrument
(py-spy cannot attach to this pyenv-built interpreter: "Failed to find
python version"), reads the file once cold (empty cache) and once warm
(remount, page cache dropped), and prints pyinstrument's report of the
daemon's trio thread for each. Work in worker threads (GETs, pwrite,
pread) shows there as time awaiting them. Needs root and
`pip install pyinstrument`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import drop_caches, read_files  # noqa: E402

from modelfs.testing.s3server import JuiceFSGateway  # noqa: E402

MiB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--top", type=int, default=60, help="lines of each report")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelfs-prof-"))
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        with JuiceFSGateway(work / "gw") as srv:
            blob = work / "blob"
            blob.write_bytes(os.urandom(args.size_mib * MiB))
            c = srv.client()
            c.create_bucket(Bucket="prof")
            srv.put_file(c, blob, "prof", "w.bin")
            blob.unlink()
            env = dict(os.environ, **srv.env())
            for phase in ("cold", "warm"):
                report = work / f"{phase}.txt"
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "pyinstrument", "-o", str(report), "-m", "modelfs"]
                    + ["mount", "s3://prof", str(mnt), "--foreground", "--endpoint-url"]
                    + [srv.endpoint_url, "--cache-dir", str(work / "cache")],
                    env=env,
                    stderr=subprocess.DEVNULL,
                )
                deadline = time.monotonic() + 60
                while not (mnt / "w.bin").exists():
                    assert time.monotonic() < deadline and daemon.poll() is None
                    time.sleep(0.1)
                drop_caches()
                t = time.perf_counter()
                read_files([mnt / "w.bin"])
                secs = time.perf_counter() - t
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
                print(f"== {phase}: {args.size_mib / secs:.0f} MiB/s")
                lines = report.read_text().splitlines()
                print("\n".join(lines[: args.top]))
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
