#!/usr/bin/env python3
"""How soon a mount moves bytes: from `modelfs mount` to the first request
on the wire, the first object GET, and the first MiB of the first shard in
a reader's hands (issue #23, "start in a blink").

Each run: an empty modelfs cache, `modelfs mount` (timed until it
returns), then `dd` of the first MiB of the first shard, then unmount.
A counting proxy in front of the S3 server stamps when each request
arrives. "cold page cache" drops the page cache before the mount (a node
that has just booted: Python, boto3 and modelfs itself come from disk);
"warm page cache" leaves it (a node that mounted before). Medians.

    .venv/bin/python scripts/startup_bench.py --runs 5
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import MiB, compile_sources, drop_caches, generate_model  # noqa: E402

from modelfs.testing.proxy import CountingProxy  # noqa: E402
from modelfs.testing.s3server import JuiceFSGateway  # noqa: E402

BUCKET = "startup"
STEPS = ["mount returned", "first request", "first object GET", "first MiB read"]


def one_run(
    work: Path, proxy: CountingProxy, env: dict[str, str], shard: str, cold: bool
) -> dict[str, float]:
    mnt, cache = work / "mnt", work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    if cold:
        drop_caches()
    proxy.reset()
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "modelfs", "mount", f"s3://{BUCKET}", str(mnt),
         "--endpoint-url", proxy.endpoint_url, "--cache-dir", str(cache)],
        env=env, check=True, capture_output=True, cwd=env.get("MODELFS_SOURCE_TREE"),
    )  # fmt: skip
    mounted = time.monotonic() - t0
    try:
        subprocess.run(
            ["dd", f"if={mnt / shard}", "of=/dev/null", "bs=1M", "count=1", "status=none"],
            check=True,
        )
        first_mib = time.monotonic() - t0
        # A request is recorded once its response is sent whole, which may
        # be after the first MiB of it is read: wait for the GET's record.
        deadline = time.monotonic() + 30
        while not (gets := proxy.object_gets()) and time.monotonic() < deadline:
            time.sleep(0.05)
        requests = proxy.snapshot()
    finally:
        subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], env=env, check=True)
    return {
        "mount returned": mounted,
        "first request": min(r.at for r in requests) - t0,
        "first object GET": min(r.at for r in gets) - t0,
        "first MiB read": first_mib,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--modelfs-path", type=Path,
                    help="mount with the modelfs package in this source tree (a worktree "
                    "of an older commit, for before and after)")  # fmt: skip
    args = ap.parse_args()
    compile_sources(args.modelfs_path)
    work = Path(tempfile.mkdtemp(prefix="modelfs-startup-"))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        with JuiceFSGateway(work / "gw") as srv:
            (work / "model").mkdir()
            files = generate_model(work / "model", 128 * MiB, 2)
            client = srv.client()
            client.create_bucket(Bucket=BUCKET)
            for f in files:
                srv.put_file(client, f, BUCKET, f.name)
            (work / "mnt").mkdir()
            env = dict(os.environ, **srv.env())
            if args.modelfs_path:
                # `python -m` puts the working directory first on sys.path.
                env["MODELFS_SOURCE_TREE"] = str(args.modelfs_path.resolve())
            proxy = CountingProxy(srv.endpoint_url).start()
            try:
                shard = sorted(f.name for f in files)[0]
                one_run(work, proxy, env, shard, cold=False)  # everything read once
                for label, cold in (("cold page cache", True), ("warm page cache", False)):
                    res = results[label] = {s: [] for s in STEPS}
                    for _ in range(args.runs):
                        for step, t in one_run(work, proxy, env, shard, cold).items():
                            res[step].append(t)
            finally:
                proxy.stop()
    finally:
        subprocess.run(["fusermount3", "-uz", str(work / "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nseconds from `modelfs mount`, median of {args.runs} (min-max):\n")
    print("| | " + " | ".join(STEPS) + " |")
    print("|---" * (len(STEPS) + 1) + "|")
    for label, res in results.items():
        cells = [f"{statistics.median(v):.3f} ({min(v):.2f}-{max(v):.2f})" for v in res.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
