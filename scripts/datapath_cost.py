#!/usr/bin/env python3
"""What one GiB costs on the data path: CPU, page faults and peak RSS.

Uploads a model (SIZE MiB in SHARDS files) to a JuiceFS gateway on loopback,
mounts it, and reads every file once cold (empty cache, page cache dropped)
and once warm (a fresh mount over the filled cache, page cache dropped).
For each phase it prints, from /proc: MiB/s (the clock stops after a
`sync`, so writeback of the cache counts), the daemon's CPU seconds per
GiB (user + system), the gateway's, the whole machine's (every process and
kernel thread: page-cache writeback is charged to no process), the daemon's page
faults per MiB (minor + major) and its peak RSS (VmHWM); then the latency
of 128 KiB reads at random offsets through a cold cache. --cap-gbit caps
what the server sends with htb on `lo` (the random reads are not capped).
Used for the
before/after numbers of data-path changes (docs/benchmarks.md). Needs root.

    .venv/bin/python scripts/datapath_cost.py --size-mib 1024 --shards 4 --rounds 3
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

from bench import LinkCap, compile_sources, drop_caches, generate_model, proc_hwm, read_files  # noqa: E402

from modelfs.testing.s3server import JuiceFSGateway  # noqa: E402

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, page faults) of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command: state ppid ... minflt(7) cminflt majflt(9) ... utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[7]) + int(fields[9])


def _machine_cpu() -> float:
    """CPU seconds spent by the whole machine (all processes and kernel
    threads, e.g. page-cache writeback, which no process is charged for)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    busy = sum(int(x) for i, x in enumerate(fields[:8]) if i not in (3, 4))  # not idle, iowait
    return busy / TICK


def _mount(srv: JuiceFSGateway, mnt: Path, cache: Path, extra: list[str]) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "modelfs", "mount", "s3://cost", str(mnt)]
        + ["--endpoint-url", srv.endpoint_url, "--cache-dir", str(cache), *extra],
        env=dict(os.environ, **srv.env()),
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return int(os.getxattr(mnt, "user.modelfs.pid"))


def _umount(mnt: Path) -> None:
    subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], check=True)


def measure(
    srv: JuiceFSGateway, mnt: Path, cache: Path, names: list[str], extra: list[str]
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    assert srv.proc is not None
    for phase in ("cold", "warm"):
        if phase == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        pid = _mount(srv, mnt, cache, extra)
        drop_caches()
        d_cpu, d_flt = _stat(pid)
        s_cpu, _ = _stat(srv.proc.pid)
        m_cpu = _machine_cpu()
        t = time.perf_counter()
        total = read_files([mnt / n for n in names])
        os.sync()  # writeback of what was cached belongs to this read
        secs = time.perf_counter() - t
        m_cpu2 = _machine_cpu()
        d_cpu2, d_flt2 = _stat(pid)
        s_cpu2, _ = _stat(srv.proc.pid)
        gib = total / (1 << 30)
        out[phase] = {
            "mib_s": total / MiB / secs,
            "daemon_cpu_s_per_gib": (d_cpu2 - d_cpu) / gib,
            "server_cpu_s_per_gib": (s_cpu2 - s_cpu) / gib,
            "machine_cpu_s_per_gib": (m_cpu2 - m_cpu) / gib,
            "faults_per_mib": (d_flt2 - d_flt) / (total / MiB),
            "peak_rss_mib": proc_hwm(pid) / MiB,
        }
        stats = json.loads(os.getxattr(mnt, "user.modelfs.stats"))
        cache_stats = stats["cache"]
        out[phase]["gets_per_gib"] = stats["store"]["get_requests"] / gib
        # Chunks read back from the disk cache: on a cold read, chunks fetched
        # ahead of the reader and dropped from memory before it got there.
        out[phase]["disk_chunks"] = cache_stats["verified_chunks"]
        out[phase]["fetched_chunks"] = cache_stats["fetched_chunks"]
        _umount(mnt)
    return out


def random_reads(srv: JuiceFSGateway, mnt: Path, cache: Path, names: list[str]) -> float:
    """Milliseconds per 128 KiB read at random offsets, cold cache, no
    prefetch on open (each read is a demand miss of one chunk)."""
    import random

    shutil.rmtree(cache, ignore_errors=True)
    _mount(srv, mnt, cache, ["--prefetch-on-open", "none"])
    drop_caches()
    rng = random.Random(0)
    fds = [os.open(mnt / n, os.O_RDONLY) for n in names]
    sizes = [os.fstat(fd).st_size for fd in fds]
    t = time.perf_counter()
    for _ in range(RANDOM_READS):
        i = rng.randrange(len(fds))
        os.pread(fds[i], 128 * 1024, rng.randrange(0, sizes[i] - 128 * 1024))
    ms = (time.perf_counter() - t) * 1000 / RANDOM_READS
    for fd in fds:
        os.close(fd)
    _umount(mnt)
    return ms


RANDOM_READS = 100


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cap-gbit", type=float, default=0.0, help="cap what the server sends (htb)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("extra", nargs="*", help="more `modelfs mount` options (after --)")
    args = ap.parse_args()
    compile_sources()
    work = Path(tempfile.mkdtemp(prefix="modelfs-cost-", dir="/var/tmp"))
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        with JuiceFSGateway(work / "gw") as srv:
            (work / "model").mkdir()
            files = generate_model(work / "model", args.size_mib * MiB, args.shards)
            client = srv.client()
            client.create_bucket(Bucket="cost")
            for f in files:
                srv.put_file(client, f, "cost", f.name)
            shutil.rmtree(work / "model")
            names = [f.name for f in files]
            port = int(srv.endpoint_url.rsplit(":", 1)[1])
            cap = LinkCap(port, args.cap_gbit) if args.cap_gbit else contextlib.nullcontext()
            with cap:
                runs = [
                    measure(srv, mnt, work / "cache", names, args.extra) for _ in range(args.rounds)
                ]
            for r in runs:
                r["random"] = {"ms_per_128k_read": random_reads(srv, mnt, work / "cache", names)}
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    medians = {
        phase: {k: statistics.median(r[phase][k] for r in runs) for k in runs[0][phase]}
        for phase in ("cold", "warm", "random")
    }
    if args.json:
        print(json.dumps({"runs": runs, "median": medians}, indent=2))
    else:
        print(f"random: {medians['random']['ms_per_128k_read']:.1f} ms per 128 KiB read, cold")
        for phase, m in medians.items():
            if phase == "random":
                continue
            print(
                f"{phase}: {m['mib_s']:.0f} MiB/s, "
                f"daemon {m['daemon_cpu_s_per_gib']:.2f} CPU s/GiB, "
                f"server {m['server_cpu_s_per_gib']:.2f}, "
                f"machine {m['machine_cpu_s_per_gib']:.2f} CPU s/GiB, "
                f"{m['faults_per_mib']:.0f} faults/MiB, peak RSS {m['peak_rss_mib']:.0f} MiB, "
                f"{m['disk_chunks']:.0f} chunks read from disk, {m['fetched_chunks']:.0f} fetched, "
                f"{m['gets_per_gib']:.0f} GETs/GiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
