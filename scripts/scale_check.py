"""Check scripts/scale_sim.py against a real run of a few mounts on this
machine.

Starts moto_server (it honours If-None-Match, so herd control is on) with
an origin bucket, behind a byte-counting proxy, and a tier bucket on the
same server. N mounts with their own cache directories stand in for N
nodes. Runs, each on fresh caches:

* ``single``: one node alone, no tier: the per-node rate;
* ``origin``: N nodes at once, no tier: origin egress, time, aggregate rate;
* ``herd``: N nodes at once with ``--shared-cache``;
* ``tier-read``: one more node reading from the now warm tier.

Then runs the simulation with the rates measured here and prints both, so
docs/scale-out.md can show them side by side.

    python scripts/scale_check.py --nodes 3 --model-mib 48 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_sim import Params, simulate  # noqa: E402

from modelfs.testing.proxy import CountingProxy  # noqa: E402
from modelfs.testing.s3server import MotoServer  # noqa: E402

MiB = 1 << 20
CHUNK = "4M"


def _mount(
    srv: MotoServer, bucket: str, endpoint: str, mnt: Path, cache: Path, extra: list[str]
) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "modelfs", "mount", f"s3://{bucket}", str(mnt)]
        + ["--endpoint-url", endpoint, "--cache-dir", str(cache), "--chunk-size", CHUNK]
        + ["--log-file", str(cache.parent / f"{mnt.name}.log"), *extra],
        check=True,
        env=dict(os.environ, **srv.env()),
    )


def _umount(mnt: Path) -> None:
    subprocess.run([sys.executable, "-m", "modelfs", "umount", str(mnt)], check=False)


def _read_tree(mnt: Path) -> int:
    total = 0
    for path in sorted(mnt.rglob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while block := f.read(4 * MiB):
                total += len(block)
    return total


def run_nodes(
    srv: MotoServer,
    bucket: str,
    proxy: CountingProxy,
    work: Path,
    name: str,
    n: int,
    extra: list[str],
) -> dict[str, float]:
    """N mounts read the whole model at once; returns times and egress."""
    mnts = [work / name / f"mnt{i}" for i in range(n)]
    for i, mnt in enumerate(mnts):
        _mount(srv, bucket, proxy.endpoint_url, mnt, work / name / f"cache{i}", extra)
    proxy.reset()
    times: list[float] = [0.0] * n
    t0 = time.monotonic()

    def one(i: int) -> None:
        _read_tree(mnts[i])
        times[i] = time.monotonic() - t0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"origin_bytes": float(proxy.object_bytes()), "t_last": max(times)}
    out["t_median"] = sorted(times)[n // 2]
    if extra:  # let the tier uploads finish before unmounting
        time.sleep(1.0)
    for mnt in mnts:
        _umount(mnt)
    return out


def _rtt(client: object) -> float:
    """Median round trip of a small request to the server (the tier's)."""
    client.put_object(Bucket="tier", Key="rtt", Body=b"x")  # type: ignore[attr-defined]
    samples = []
    for _ in range(30):
        t0 = time.monotonic()
        client.get_object(Bucket="tier", Key="rtt")["Body"].read()  # type: ignore[attr-defined]
        samples.append(time.monotonic() - t0)
    return sorted(samples)[len(samples) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--model-mib", type=int, default=48)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    size = a.model_mib * MiB
    with tempfile.TemporaryDirectory(prefix="modelfs-scale-") as tmp, MotoServer() as srv:
        work = Path(tmp)
        client = srv.client()
        client.create_bucket(Bucket="origin")
        client.create_bucket(Bucket="tier")
        shards = 3
        for i in range(shards):
            body = os.urandom(size // shards)
            client.put_object(Bucket="origin", Key=f"model-{i}.safetensors", Body=body)
        proxy = CountingProxy(srv.endpoint_url).start()
        try:
            tier = [
                "--shared-cache",
                "s3://tier/c",
                "--shared-cache-endpoint-url",
                srv.endpoint_url,
            ]
            single = run_nodes(srv, "origin", proxy, work, "single", 1, [])
            origin = run_nodes(srv, "origin", proxy, work, "origin", a.nodes, [])
            herd = run_nodes(srv, "origin", proxy, work, "herd", a.nodes, tier)
            warm = run_nodes(srv, "origin", proxy, work, "tier-read", 1, tier)
            rtt = _rtt(client)
        finally:
            proxy.stop()
    node_bw = size / single["t_last"]
    origin_bw = a.nodes * size / origin["t_last"]
    tier_bw = size / warm["t_last"]
    p = Params(
        model_bytes=size,
        chunk_bytes=4 * MiB,
        node_bw=node_bw,
        origin_bw=origin_bw,
        # Origin and tier are one server here (one_server: one bandwidth).
        tier_bw=origin_bw,
        window=8,
        start_spread=0.0,
        lease=30.0,
        tier_rtt=rtt,
        one_server=True,
        dt=0.005,
    )
    sim = {m: simulate(a.nodes, m, p) for m in ("origin", "herd")}
    report = {
        "nodes": a.nodes,
        "model_bytes": size,
        "measured_rates_mib_s": {
            "node (one node alone)": node_bw / MiB,
            "origin (all nodes at once)": origin_bw / MiB,
            "tier (one node, warm tier)": tier_bw / MiB,
        },
        "tier_rtt_ms": rtt * 1000,
        "real": {
            "origin": {**origin, "origin_x_model": origin["origin_bytes"] / size},
            "herd": {**herd, "origin_x_model": herd["origin_bytes"] / size},
        },
        "sim": {
            m: {
                "origin_x_model": r.origin_x_model,
                "t_median": r.t_median,
                "t_last": r.t_last,
            }
            for m, r in sim.items()
        },
    }
    print(json.dumps(report, indent=1))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
