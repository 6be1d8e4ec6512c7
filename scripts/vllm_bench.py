#!/usr/bin/env python3
"""vLLM's time to ready, from "the node may begin" (docs/vllm.md):

* download: `s5cmd cp` the model, then `LLM()` on the local copy (an init
  container, then the server);
* cold mount: `modelfs mount`, then `LLM()` on the mount;
* preload mount: `modelfs mount --preload`, then `LLM()` at once;
* warm mount: a remount over the cache a cold run filled;
* runai_streamer: vLLM's own streaming S3 loader on the same bucket
  (`load_format="runai_streamer"`, s3:// model path), no mount.

Each run starts with a dropped page cache and (but warm) an empty modelfs
cache; ready is `LLM()` built (scripts/vllm_run.py), and with --api the
OpenAI server answering /health. Every run's greedy tokens are compared
with the download run's. Needs root (drop_caches, tc), FUSE, s5cmd and the
vLLM venv (`make bench-vllm` provides them); --cap-gbit caps what the S3
server sends with htb on `lo`, removed on the way out.

    .venv/bin/python scripts/vllm_bench.py --runs 2 --cap-gbit 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import LinkCap, compile_sources, drop_caches, proc_cpu, s5cmd_cp  # noqa: E402

from modelfs.testing.s3server import JuiceFSGateway, free_port  # noqa: E402

BUCKET = "vllmbench"
PREFIX = "llama"
RESULT = "VLLM_RUN_RESULT "
MODES = ["download", "cold mount", "preload mount", "warm mount", "runai_streamer"]


class Ctx:
    def __init__(self, args: argparse.Namespace, work: Path, srv: JuiceFSGateway) -> None:
        self.args, self.work, self.srv = args, work, srv
        self.vllm = str(args.vllm_python)
        self.env = dict(os.environ, **srv.env(), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
        self.mnt = work / "mnt"
        self.mnt.mkdir()
        self.tokens: dict[str, list[list[int]]] = {}
        self.download_s: list[float] = []  # s5cmd alone, inside "download"
        self.weights_s: dict[str, list[float]] = {}  # vLLM's "Loading weights took"
        self.mount_s: list[float] = []  # `modelfs mount` until it returned
        # CPU seconds per run: the modelfs daemon's (mount modes) and the S3
        # server's (which on a node would be another machine's).
        self.daemon_cpu: dict[str, list[float]] = {}
        self.server_cpu: dict[str, list[float]] = {}

    def modelfs(self, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "modelfs", *args], env=self.env, capture_output=True, text=True
        )
        if proc.returncode:
            raise SystemExit(proc.stderr)

    def mount(self, cache: Path, *extra: str) -> None:
        self.modelfs("mount", f"s3://{BUCKET}/{PREFIX}", str(self.mnt),
                     "--endpoint-url", self.srv.endpoint_url, "--cache-dir", str(cache),
                     *extra)  # fmt: skip

    def umount(self, mode: str) -> None:
        with contextlib.suppress(ValueError, OSError):
            pid = int(os.getxattr(self.mnt, "user.modelfs.pid"))
            self.daemon_cpu.setdefault(mode, []).append(proc_cpu(pid))
        self.modelfs("umount", str(self.mnt))

    def run(self, mode: str, fn: Callable[[], float]) -> float:
        """One run of `mode`, with the S3 server's CPU seconds during it."""
        assert self.srv.proc is not None
        before = proc_cpu(self.srv.proc.pid)
        seconds = fn()
        self.server_cpu.setdefault(mode, []).append(proc_cpu(self.srv.proc.pid) - before)
        return seconds

    def ready(self, mode: str, t0: float, model: str, *args: str, env: dict[str, str]) -> float:
        """Seconds from t0 to vLLM ready on `model` (LLM(), or with --api the server)."""
        if self.args.api:
            return self._api_ready(t0, model, *args, env=env)
        proc = subprocess.run(
            [self.vllm, str(HERE / "vllm_run.py"), model, *args],
            env=env,
            capture_output=True,
            text=True,
        )
        out = proc.stdout + proc.stderr
        if self.args.logs:
            self.args.logs.mkdir(parents=True, exist_ok=True)
            n = len(self.weights_s.get(mode, []))
            (self.args.logs / f"{mode.replace(' ', '-')}-{n}.log").write_text(out)
        lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
        if proc.returncode or not lines:
            raise SystemExit(f"{mode}: vLLM failed:\n{out[-3000:]}")
        doc = json.loads(lines[-1][len(RESULT) :])
        self.tokens.setdefault(mode, doc["token_ids"])
        m = re.search(r"Loading weights took ([0-9.]+) seconds", out)
        self.weights_s.setdefault(mode, []).append(float(m.group(1)) if m else float("nan"))
        return float(doc["ready_at"]) - t0

    def _api_ready(self, t0: float, model: str, *args: str, env: dict[str, str]) -> float:
        port = free_port()
        cmd = [self.vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--port", str(port), "--host", "127.0.0.1", "--dtype", "bfloat16",
               "--max-model-len", "256", "--enforce-eager"]  # fmt: skip
        if args:
            cmd += ["--load-format", args[args.index("--load-format") + 1]]
        log = open(self.work / "api.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            while proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        return time.monotonic() - t0
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(0.1)
            raise SystemExit(f"API server exited:\n{(self.work / 'api.log').read_text()[-3000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            log.close()


def run_download(c: Ctx) -> float:
    dest = c.work / "dl"
    shutil.rmtree(dest, ignore_errors=True)
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(s5cmd_cp(c.srv.endpoint_url, f"s3://{BUCKET}/{PREFIX}/*", dest),
                   env=c.env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    c.download_s.append(time.monotonic() - t0)
    return c.ready("download", t0, str(dest), env=c.env)


def run_mount(c: Ctx, mode: str) -> float:
    cache = c.work / "cache"
    if mode != "warm mount":
        shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    t0 = time.monotonic()
    c.mount(cache, *(("--preload",) if mode == "preload mount" else ()))
    c.mount_s.append(time.monotonic() - t0)
    try:
        return c.ready(mode, t0, str(c.mnt), env=c.env)
    finally:
        c.umount(mode)


def run_runai(c: Ctx) -> float:
    env = dict(c.env, AWS_ENDPOINT_URL=c.srv.endpoint_url, AWS_EC2_METADATA_DISABLED="true",
               RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0")  # fmt: skip
    drop_caches()
    t0 = time.monotonic()
    model = f"s3://{BUCKET}/{PREFIX}"
    return c.ready("runai_streamer", t0, model, "--load-format", "runai_streamer", env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--cap-gbit", type=float, default=0.0)
    ap.add_argument("--api", action="store_true", help="time the OpenAI server to /health")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--vllm-python", type=Path, default=HERE.parent / ".venv-vllm/bin/python")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--logs", type=Path, help="keep each vLLM run's output in this directory")
    args = ap.parse_args()
    compile_sources()
    # A `kill` must still unmount and remove the link cap (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="modelfs-vllm-bench-"))
    results: dict[str, list[float]] = {m: [] for m in modes}
    try:
        with JuiceFSGateway(work / "gw") as srv:
            model = work / "model"
            subprocess.run([str(args.vllm_python), str(HERE / "vllm_model.py"), str(model),
                            "--hidden", str(args.hidden), "--layers", str(args.layers)],
                           check=True, capture_output=True)  # fmt: skip
            size = sum(f.stat().st_size for f in model.iterdir())
            client = srv.client()
            client.create_bucket(Bucket=BUCKET)
            for f in model.iterdir():
                srv.put_file(client, f, BUCKET, f"{PREFIX}/{f.name}")
            c = Ctx(args, work, srv)
            runners: dict[str, Callable[[], float]] = {
                "download": lambda: run_download(c),
                "cold mount": lambda: run_mount(c, "cold mount"),
                "preload mount": lambda: run_mount(c, "preload mount"),
                "warm mount": lambda: run_mount(c, "warm mount"),
                "runai_streamer": lambda: run_runai(c),
            }
            port = int(srv.endpoint_url.rsplit(":", 1)[1])
            cap = LinkCap(port, args.cap_gbit) if args.cap_gbit else contextlib.nullcontext()
            with cap:
                for _ in range(args.runs):  # the modes alternate
                    for m in modes:
                        results[m].append(c.run(m, runners[m]))
                        print(f"  {m}: {results[m][-1]:.2f} s", file=sys.stderr)
    finally:
        subprocess.run(["fusermount3", "-uz", str(work / "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in results.items()}
    ref = c.tokens.get("download") or next(iter(c.tokens.values()), None)
    same = {m: t == ref for m, t in c.tokens.items()}  # none with --api
    link = f"{args.cap_gbit:g} Gbit/s" if args.cap_gbit else "loopback"
    what = "API server to /health" if args.api else "LLM() ready"
    print(f"\n{link}, {what}, model {size / 2**20:.0f} MiB, median of {args.runs}:\n")
    print("| mode | seconds | runs | vs download | vLLM loading weights, s "
          "| daemon CPU s | server CPU s | same tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    base = med.get("download")
    for m in modes:
        ratio = f"{base / med[m]:.2f}x" if base else "-"
        runs = ", ".join(f"{s:.2f}" for s in results[m])
        w = c.weights_s.get(m)
        ws = f"{statistics.median(w):.2f}" if w else "-"
        d, sv = c.daemon_cpu.get(m), c.server_cpu.get(m)
        ds = f"{statistics.median(d):.2f}" if d else "-"
        ss = f"{statistics.median(sv):.2f}" if sv else "-"
        cells = [m, f"{med[m]:.2f}", runs, ratio, ws, ds, ss, str(same.get(m, "-"))]
        print("| " + " | ".join(cells) + " |")
    dl = statistics.median(c.download_s) if c.download_s else None
    if dl and base and "preload mount" in med:
        saved = base - med["preload mount"]
        print(f"\ns5cmd alone: {dl:.2f} s; --preload saves {saved:.2f} s of it "
              f"({saved / dl:.0%} of the download time)")  # fmt: skip
    if c.mount_s:
        print(f"modelfs mount returned in {statistics.median(c.mount_s):.2f} s (median)")
    if "warm mount" in med and "preload mount" in med:
        print(f"preload vs warm: {med['preload mount'] / med['warm mount'] - 1:+.1%}")
    if args.json:
        doc = {"link": link, "what": what, "model_bytes": size, "seconds": results,
               "download_only_s": c.download_s, "weights_s": c.weights_s,
               "daemon_cpu_s": c.daemon_cpu, "server_cpu_s": c.server_cpu,
               "median": med, "same_tokens": same}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
