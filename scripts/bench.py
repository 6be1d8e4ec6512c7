#!/usr/bin/env python3
"""`make bench`: whole-model reads measured side by side, in one run.

One local S3 server (JuiceFS gateway on loopback), one generated model of
safetensors shards, and for each method the median of several runs with the
page cache dropped before each: MiB/s, CPU seconds per GiB (every process
involved: client, modelfs daemon, *not* the S3 server) and peak RSS.

Methods: s5cmd download; boto3 download_file with the AIBrix downloader's
TransferConfig; modelfs cold (mount on an empty cache, read every file) and
warm (fresh mount over the cache); a local-disk read of the same bytes;
safetensors loading through the mount against download-then-load; 128 KiB
random reads. Writes bench-out/results.json and prints a Markdown table.
Needs root (drop_caches) and FUSE.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelfs.testing.s3server import JuiceFSGateway

MiB = 1 << 20
GiB = 1 << 30
BUCKET = "bench"
PREFIX = "model"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Sample:
    seconds: float
    cpu: float
    rss: int


def children_usage() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def generate_model(dirpath: Path, total: int, shards: int) -> list[Path]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    per_shard = total // shards
    paths = []
    for s in range(shards):
        tensors = {}
        n, i = 0, 0
        while n < per_shard:
            rows = min(4096, max(1, (per_shard - n) // (2 * 2048)))
            tensors[f"model.layers.{s}.{i}.weight"] = rng.standard_normal(
                (rows, 2048), np.float32
            ).astype(np.float16)
            tensors[f"model.layers.{s}.{i}.norm"] = rng.standard_normal(2048, np.float32)
            n += rows * 2048 * 2 + 2048 * 4
            i += 1
        path = dirpath / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def read_files(paths: list[Path], block: int = 16 * MiB) -> int:
    total = 0
    buf = bytearray(block)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


class Bench:
    def __init__(self, work: Path, srv: JuiceFSGateway, names: list[str], size: int, runs: int):
        self.work = work
        self.srv = srv
        self.names = names
        self.size = size
        self.runs = runs
        self.env = dict(os.environ, **srv.env())
        self.mnt = work / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.results: dict[str, dict[str, float]] = {}

    def record(self, name: str, samples: list[Sample], nbytes: int | None = None) -> None:
        nbytes = nbytes or self.size
        med = statistics.median(s.seconds for s in samples)
        self.results[name] = {
            "MiB/s": nbytes / MiB / med,
            "seconds": med,
            "cpu_s_per_GiB": statistics.median(s.cpu for s in samples) / (nbytes / GiB),
            "peak_rss_MiB": max(s.rss for s in samples) / MiB,
            "runs": len(samples),
        }
        r = self.results[name]
        print(
            f"  {name}: {r['MiB/s']:.0f} MiB/s, {r['cpu_s_per_GiB']:.2f} CPU s/GiB, "
            f"{r['peak_rss_MiB']:.0f} MiB RSS",
            flush=True,
        )

    def run_cmd(self, cmd: list[str], env: dict[str, str] | None = None) -> Sample:
        drop_caches()
        c0, _ = children_usage()
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env or self.env, stdout=subprocess.DEVNULL)
        _, status, ru = os.wait4(proc.pid, 0)
        secs = time.perf_counter() - t
        if status != 0:
            raise SystemExit(f"{cmd[0]} failed with status {status}")
        return Sample(secs, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024)

    # -- methods -------------------------------------------------------
    def s5cmd(self) -> Path:
        dest = self.work / "s5cmd-dl"
        samples = []
        for _ in range(self.runs):
            shutil.rmtree(dest, ignore_errors=True)
            samples.append(
                self.run_cmd(
                    [
                        shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd"),
                        "--endpoint-url",
                        self.srv.endpoint_url,
                        "cp",
                        f"s3://{BUCKET}/{PREFIX}/*",
                        f"{dest}/",
                    ]
                )
            )
        self.record("s5cmd download", samples)
        return dest

    def boto3_aibrix(self) -> None:
        dest = self.work / "boto3-dl"
        code = (
            "import boto3,sys,os\n"
            "from boto3.s3.transfer import TransferConfig\n"
            "c=boto3.client('s3',endpoint_url=sys.argv[1])\n"
            "cfg=TransferConfig(max_concurrency=32,multipart_chunksize=64*2**20,"
            "multipart_threshold=64*2**20,io_chunksize=16*2**20)\n"
            "os.makedirs(sys.argv[2],exist_ok=True)\n"
            "for n in sys.argv[3:]:\n"
            f"  c.download_file('{BUCKET}','{PREFIX}/'+n,os.path.join(sys.argv[2],n),Config=cfg)\n"
        )
        samples = []
        for _ in range(self.runs):
            shutil.rmtree(dest, ignore_errors=True)
            samples.append(
                self.run_cmd(
                    [sys.executable, "-c", code, self.srv.endpoint_url, str(dest), *self.names]
                )
            )
        shutil.rmtree(dest, ignore_errors=True)
        self.record("boto3 download_file (AIBrix config)", samples)

    def local(self, files: list[Path]) -> None:
        samples = []
        for _ in range(self.runs):
            drop_caches()
            c0, t = self_cpu(), time.perf_counter()
            read_files(files)
            samples.append(Sample(time.perf_counter() - t, self_cpu() - c0, 0))
        self.record("local disk read", samples)

    def _mount(self, cache: Path, extra: tuple[str, ...] = ()) -> int:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "modelfs",
                "mount",
                f"s3://{BUCKET}/{PREFIX}",
                str(self.mnt),
                "--endpoint-url",
                self.srv.endpoint_url,
                "--cache-dir",
                str(cache),
                *extra,
            ],
            env=self.env,
            check=True,
        )
        return int(os.getxattr(self.mnt, "user.modelfs.pid"))

    def _umount(self) -> None:
        subprocess.run([sys.executable, "-m", "modelfs", "umount", str(self.mnt)], check=True)

    def _modelfs_run(self, cache: Path, body: Callable[[], int]) -> tuple[Sample, int]:
        drop_caches()
        c0, t = self_cpu(), time.perf_counter()
        pid = self._mount(cache)
        d0 = proc_cpu(pid)  # the daemon's start-up (imports) is not the read
        nbytes = body()
        secs = time.perf_counter() - t
        cpu = self_cpu() - c0 + proc_cpu(pid) - d0
        rss = proc_hwm(pid)
        self._umount()
        return Sample(secs, cpu, rss), nbytes

    def modelfs(self) -> Path:
        cache = self.work / "modelfs-cache"
        files = [self.mnt / n for n in self.names]
        cold, warm = [], []
        for _ in range(self.runs):
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(self._modelfs_run(cache, lambda: read_files(files))[0])
            warm.append(self._modelfs_run(cache, lambda: read_files(files))[0])
        self.record("modelfs cold (mount + read all)", cold)
        self.record("modelfs warm (remount, disk cache)", warm)
        # Page cache warm: same mount, second read.
        self._mount(cache)
        read_files(files)
        c0, t = self_cpu(), time.perf_counter()
        read_files(files)
        self.record(
            "modelfs re-read (page cache)", [Sample(time.perf_counter() - t, self_cpu() - c0, 0)]
        )
        self._umount()
        return cache

    def safetensors_load(self, local_dir: Path) -> None:
        code = (
            "import sys\nfrom safetensors import safe_open\n"
            "for p in sys.argv[1:]:\n"
            "  with safe_open(p, framework='np') as f:\n"
            "    for k in sorted(f.keys()): f.get_tensor(k)\n"
        )
        cache = self.work / "st-cache"
        mounted, dl = [], []
        for _ in range(self.runs):
            shutil.rmtree(cache, ignore_errors=True)

            def load_mount() -> int:
                subprocess.run(
                    [sys.executable, "-c", code, *[str(self.mnt / n) for n in self.names]],
                    check=True,
                )
                return self.size

            mounted.append(self._modelfs_run(cache, load_mount)[0])
            dest = self.work / "dl-then-load"
            shutil.rmtree(dest, ignore_errors=True)
            a = self.run_cmd(
                [
                    shutil.which("s5cmd") or "s5cmd",
                    "--endpoint-url",
                    self.srv.endpoint_url,
                    "cp",
                    f"s3://{BUCKET}/{PREFIX}/*",
                    f"{dest}/",
                ]
            )
            t = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-c", code, *[str(dest / n) for n in self.names]]
            )
            _, _, ru = os.wait4(proc.pid, 0)
            dl.append(
                Sample(
                    a.seconds + time.perf_counter() - t,
                    a.cpu + ru.ru_utime + ru.ru_stime,
                    max(a.rss, ru.ru_maxrss * 1024),
                )
            )
            shutil.rmtree(dest, ignore_errors=True)
        self.record("safetensors load through modelfs (cold)", mounted)
        self.record("s5cmd download, then safetensors load", dl)

    def random_reads(self) -> None:
        cache = self.work / "rand-cache"
        shutil.rmtree(cache, ignore_errors=True)
        n = 200
        rng = random.Random(0)

        def body() -> int:
            fds = [os.open(self.mnt / name, os.O_RDONLY) for name in self.names]
            sizes = [os.fstat(fd).st_size for fd in fds]
            for _ in range(n):
                i = rng.randrange(len(fds))
                os.pread(fds[i], 128 * 1024, rng.randrange(0, sizes[i] - 128 * 1024))
            for fd in fds:
                os.close(fd)
            return n * 128 * 1024

        sample, nbytes = self._modelfs_run(cache, body)
        sample.cpu = 0.0  # dominated by the mount itself; ms per read is what counts
        self.record("modelfs 128 KiB random reads (cold)", [sample], nbytes)
        self.results["modelfs 128 KiB random reads (cold)"]["ms_per_read"] = (
            sample.seconds * 1000 / n
        )


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--generate":
        generate_model(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="model size (default 1G)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    from modelfs.config import parse_size

    total = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-"))
    srv = JuiceFSGateway(work / "s3")
    try:
        srv.start()
        local_dir = work / "model"
        local_dir.mkdir()
        # In a child: commands forked later would count its memory in their RSS.
        subprocess.run(
            [sys.executable, __file__, "--generate", str(local_dir), str(total), str(args.shards)],
            check=True,
        )
        files = sorted(local_dir.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in files)
        client = srv.client()
        client.create_bucket(Bucket=BUCKET)
        for p in files:
            client.upload_file(str(p), BUCKET, f"{PREFIX}/{p.name}")
        shutil.rmtree(local_dir)
        print(
            f"model: {len(files)} shards, {size / MiB:.0f} MiB; {args.runs} runs each", flush=True
        )
        b = Bench(work, srv, [p.name for p in files], size, args.runs)
        dl = b.s5cmd()
        b.local(sorted(dl.iterdir()))
        b.boto3_aibrix()
        b.modelfs()
        b.safetensors_load(dl)
        b.random_reads()
        args.out.mkdir(exist_ok=True)
        meta = {
            "model_bytes": size,
            "shards": len(files),
            "runs": args.runs,
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
        }
        (args.out / "results.json").write_text(
            json.dumps({"meta": meta, "results": b.results}, indent=2)
        )
        base = b.results["s5cmd download"]["MiB/s"]
        print("\n| method | MiB/s | × s5cmd | CPU s/GiB | peak RSS MiB |\n|---|---|---|---|---|")
        for name, r in b.results.items():
            print(
                f"| {name} | {r['MiB/s']:.0f} | {r['MiB/s'] / base:.2f} | "
                f"{r['cpu_s_per_GiB']:.2f} | {r['peak_rss_MiB']:.0f} |"
            )
        return 0
    finally:
        subprocess.run(["fusermount3", "-uz", str(work / "mnt")], capture_output=True)
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
