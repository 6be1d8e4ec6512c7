"""Simulate N nodes loading the same model at once, with and without the
shared cache tier, with and without herd control.

A time-stepped flow model, chunk by chunk. Each node reads the model's
chunks in one order (the loader's) with `--window` chunks in flight. A
transfer's rate each step is the smaller of its node's bandwidth shared by
that node's transfers and its source's bandwidth (origin or tier) shared by
all transfers on that source. Modes:

* ``origin``: no tier; every node fetches every chunk from the origin.
* ``tier``: a node reads a chunk from the tier if it is there, otherwise
  fetches it from the origin and uploads it (the upload lands after
  `chunk / node bandwidth`); no herd control, so nodes that miss together
  all go to the origin.
* ``herd``: as ``tier``, but the first node to miss a chunk takes its lease;
  the others wait for its upload and then read the tier, or after `--lease`
  seconds fetch from the origin themselves.

Requests to the tier cost `--tier-rtt` each before the bytes flow: a hit
one, a miss three (GET, lease PUT, GET again) before the origin fetch; a
waiting node sees a landed chunk at its next poll (`--poll` apart at most).

Prints one row per (nodes, mode): origin egress (and as a multiple of the
model), time until the median and the last node has the model. With
``--json`` the rows go to stdout as JSON; ``--plot FILE`` draws them.

    python scripts/scale_sim.py --nodes 10 100 1000
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

GB = 1e9
MODES = ("origin", "tier", "herd")


@dataclass
class Params:
    model_bytes: float = 16 * 2**30
    chunk_bytes: float = 64 * 2**20
    node_bw: float = 25e9 / 8  # bytes/s: a 25 Gbit/s NIC
    tier_bw: float = 100e9 / 8  # the tier's aggregate
    origin_bw: float = 50e9 / 8  # what the origin gives all nodes together
    window: int = 8  # chunks in flight per node
    start_spread: float = 5.0  # nodes start uniformly within this many seconds
    lease: float = 30.0
    tier_rtt: float = 0.002  # one tier request's round trip (miss, lease, poll)
    poll: float = 0.25  # a waiting node looks at the tier this often (at most)
    one_server: bool = False  # origin and tier share one bandwidth (a single test server)
    dt: float = 0.02
    seed: int = 1


@dataclass
class Result:
    nodes: int
    mode: str
    origin_bytes: float
    origin_x_model: float
    tier_bytes: float
    t_median: float
    t_last: float


def simulate(n_nodes: int, mode: str, p: Params) -> Result:
    rng = random.Random(p.seed)
    nchunks = int(np.ceil(p.model_bytes / p.chunk_bytes))
    sizes = np.full(nchunks, p.chunk_bytes)
    sizes[-1] = p.model_bytes - p.chunk_bytes * (nchunks - 1)
    start = [rng.uniform(0, p.start_spread) for _ in range(n_nodes)]
    next_chunk = [0] * n_nodes
    in_flight = [0] * n_nodes
    done_chunks = [0] * n_nodes
    finish = [float("nan")] * n_nodes
    in_tier = np.full(nchunks, np.inf)  # time the chunk lands in the tier
    leased_until = np.full(nchunks, -np.inf)
    waiting: dict[int, list[tuple[int, float]]] = defaultdict(list)  # chunk -> (node, since)
    # Active transfers: parallel arrays.
    t_node: list[int] = []
    t_chunk: list[int] = []
    t_src: list[int] = []  # 0 origin, 1 tier read, 2 upload to the tier
    t_left: list[float] = []
    origin_bytes = tier_bytes = 0.0
    now = 0.0

    delayed: list[tuple[float, int, int, int]] = []  # (when, node, chunk, src)

    def later(when: float, node: int, chunk: int, src: int) -> None:
        heapq.heappush(delayed, (when, node, chunk, src))

    def begin(node: int, chunk: int, src: int) -> None:
        nonlocal origin_bytes, tier_bytes
        t_node.append(node)
        t_chunk.append(chunk)
        t_src.append(src)
        t_left.append(float(sizes[chunk]))
        if src == 0:
            origin_bytes += sizes[chunk]
        elif src == 1:
            tier_bytes += sizes[chunk]

    def request(node: int) -> None:
        c = next_chunk[node]
        next_chunk[node] += 1
        in_flight[node] += 1
        if mode == "origin":
            begin(node, c, 0)
        elif in_tier[c] <= now:
            later(now + p.tier_rtt, node, c, 1)
        elif mode == "herd" and leased_until[c] > now:
            waiting[c].append((node, now))
        else:
            if mode == "herd":
                leased_until[c] = now + p.lease
            later(now + (3 if mode == "herd" else 1) * p.tier_rtt, node, c, 0)

    finished = 0
    # Steps fine enough for one node alone, coarser when many share the
    # sources (every transfer is then slow anyway): about 4000 steps.
    worst = n_nodes * p.model_bytes / min(p.origin_bw, p.tier_bw) + p.start_spread
    dt = max(p.dt, worst / 4000)
    not_started = sorted(range(n_nodes), key=lambda i: start[i], reverse=True)
    hungry: set[int] = set()  # started, with a free slot and chunks left
    while finished < n_nodes:
        while not_started and start[not_started[-1]] <= now:
            hungry.add(not_started.pop())
        for node in list(hungry):
            while in_flight[node] < p.window and next_chunk[node] < nchunks:
                request(node)
            hungry.discard(node)
        while delayed and delayed[0][0] <= now:
            _, node, c, src = heapq.heappop(delayed)
            begin(node, c, src)
        # Waiters whose chunk landed (seen at their next poll), or whose
        # lease wait ran out.
        for c in list(waiting):
            keep = []
            for node, since in waiting[c]:
                landed = in_tier[c]
                if landed <= now and landed + _poll_delay(landed - since, p.poll) <= now:
                    later(now + p.tier_rtt, node, c, 1)
                elif now - since >= p.lease:
                    begin(node, c, 0)  # gave up waiting: a duplicate origin fetch
                else:
                    keep.append((node, since))
            if keep:
                waiting[c] = keep
            else:
                del waiting[c]
        if t_node:
            nodes = np.array(t_node)
            srcs = np.array(t_src)
            per_node = np.bincount(nodes, minlength=n_nodes)[nodes]
            pools = np.zeros_like(srcs) if p.one_server else np.minimum(srcs, 1)
            per_src = np.bincount(pools, minlength=2)[pools]
            src_bw = np.where(pools == 0, p.origin_bw, p.tier_bw)
            rate = np.minimum(p.node_bw / per_node, src_bw / per_src)
            left = np.array(t_left) - rate * dt
            done = left <= 0
            uploads = []
            for i in np.nonzero(done)[0]:
                node, c = t_node[i], t_chunk[i]
                if t_src[i] == 2:  # an upload landed
                    in_tier[c] = min(in_tier[c], now)
                    continue
                in_flight[node] -= 1
                done_chunks[node] += 1
                if next_chunk[node] < nchunks:
                    hungry.add(node)
                if t_src[i] == 0 and mode != "origin":
                    uploads.append((node, c))  # the node uploads what it fetched
                if done_chunks[node] == nchunks:
                    finish[node] = now + dt - start[node]
                    finished += 1
            keep = ~done
            t_node = list(nodes[keep])
            t_chunk = list(np.array(t_chunk)[keep])
            t_src = list(srcs[keep])
            t_left = list(left[keep])
            for node, c in uploads:
                begin(node, c, 2)
        now += dt
    times = sorted(finish)
    return Result(
        n_nodes,
        mode,
        origin_bytes,
        origin_bytes / p.model_bytes,
        tier_bytes,
        times[len(times) // 2],
        times[-1],
    )


def _poll_delay(waited: float, poll_max: float) -> float:
    """How long after a chunk lands a node that has waited `waited` s sees it:
    its polls start 20 ms apart and double up to `poll_max`."""
    t, pause = 0.0, 0.02
    while t < waited:
        t += pause
        pause = min(poll_max, pause * 2)
    return t - waited


MODE_LABELS = {
    "origin": "no shared tier",
    "tier": "shared tier, no herd control",
    "herd": "shared tier + herd control",
}


def plot(results: list[Result], path: str, p: Params) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for mode in MODES:
        rows = [r for r in results if r.mode == mode]
        if not rows:
            continue
        xs = [r.nodes for r in rows]
        ax1.plot(xs, [r.origin_x_model for r in rows], marker="o", label=MODE_LABELS[mode])
        ax2.plot(xs, [r.t_last for r in rows], marker="o", label=MODE_LABELS[mode])
    ax1.set_ylabel("bytes from the origin, × model size")
    ax2.set_ylabel("seconds until the last node has the model")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"nodes, each starting at a random moment within {p.start_spread:g} s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Simulated: {p.model_bytes / 2**30:g} GiB model, nodes at {p.node_bw * 8 / 1e9:g} Gbit/s, "
        f"origin {p.origin_bw * 8 / 1e9:g} Gbit/s, tier {p.tier_bw * 8 / 1e9:g} Gbit/s",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    d = Params()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--model-gib", type=float, default=d.model_bytes / 2**30)
    ap.add_argument("--chunk-mib", type=float, default=d.chunk_bytes / 2**20)
    ap.add_argument("--node-gbit", type=float, default=d.node_bw * 8 / 1e9)
    ap.add_argument("--tier-gbit", type=float, default=d.tier_bw * 8 / 1e9)
    ap.add_argument("--origin-gbit", type=float, default=d.origin_bw * 8 / 1e9)
    ap.add_argument("--window", type=int, default=d.window)
    ap.add_argument("--start-spread", type=float, default=d.start_spread)
    ap.add_argument("--lease", type=float, default=d.lease)
    ap.add_argument("--tier-rtt", type=float, default=d.tier_rtt)
    ap.add_argument("--poll", type=float, default=d.poll)
    ap.add_argument("--dt", type=float, default=d.dt)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", metavar="FILE")
    a = ap.parse_args(argv)
    p = Params(
        model_bytes=a.model_gib * 2**30,
        chunk_bytes=a.chunk_mib * 2**20,
        node_bw=a.node_gbit * 1e9 / 8,
        tier_bw=a.tier_gbit * 1e9 / 8,
        origin_bw=a.origin_gbit * 1e9 / 8,
        window=a.window,
        start_spread=a.start_spread,
        lease=a.lease,
        tier_rtt=a.tier_rtt,
        poll=a.poll,
        dt=a.dt,
    )
    results = [simulate(n, m, p) for n in a.nodes for m in a.modes]
    if a.json:
        json.dump(
            {"params": asdict(p), "results": [asdict(r) for r in results]}, sys.stdout, indent=1
        )
        print()
    else:
        head = f"{'nodes':>6} {'mode':<7} {'origin GB':>10} {'× model':>8}"
        print(head + f" {'median s':>9} {'last s':>8}")
        for r in results:
            print(
                f"{r.nodes:>6} {r.mode:<7} {r.origin_bytes / GB:>10.1f} {r.origin_x_model:>8.2f} "
                f"{r.t_median:>9.1f} {r.t_last:>8.1f}"
            )
    if a.plot:
        plot(results, a.plot, p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
