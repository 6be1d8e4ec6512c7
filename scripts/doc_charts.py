#!/usr/bin/env python3
"""Charts of measurement tables kept in the docs, drawn from the tables.

The chunk-size table (docs/benchmarks.md, "## Chunk size") and the
loader-strategy table (docs/vllm.md, "## Which load strategy") are the
record of those measurements; this script parses them and draws
docs/chunk-size.png and docs/load-strategies.png, so a chart can never say
something its table does not.

    .venv/bin/python scripts/doc_charts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def table_after(doc: Path, heading: str) -> list[dict[str, str]]:
    """The first Markdown table after `heading`, as rows keyed by header."""
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], rows[2:]  # rows[1] is the |---| rule
    return [dict(zip(header, r, strict=True)) for r in body]


def chunk_size_chart(out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = table_after(DOCS / "benchmarks.md", "## Chunk size")
    labels = [r["chunk"] for r in rows]
    x = range(len(rows))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    a.plot(x, [float(r["cold seq MiB/s"]) for r in rows], marker="o", label="cold (empty cache)")
    a.plot(x, [float(r["warm seq MiB/s"]) for r in rows], marker="o", label="warm (disk cache)")
    a.set_ylabel("MiB/s, sequential 1 GiB")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    b.plot(x, [float(r["random 128 KiB read, ms"]) for r in rows], marker="o", color="#b5651d")
    b.set_ylabel("ms per random 128 KiB read, cold")
    b.set_ylim(bottom=0)
    c.plot(x, [float(r["fetched per byte read"]) for r in rows], marker="o", color="#6a4c93")
    c.set_ylabel("fetched per byte read (random)")
    c.set_ylim(bottom=0)
    for ax in (a, b, c):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("--chunk-size")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Chunk size (docs/benchmarks.md; one run each; 8M is the default)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def load_strategy_chart(out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = table_after(DOCS / "vllm.md", "## Which load strategy")
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    conditions = [
        ("cold cache, prefetch on open", "cold, prefetch on open"),
        ("cold cache, no prefetch on open", "cold, no prefetch"),
        ("warm disk cache", "warm disk cache"),
        ("", "local disk"),
    ]
    profiles = [("loopback", "loopback"), ("latency", "25 ms / 80 MiB/s per connection")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    width = 0.8 / len(strategies)
    for ax, (profile, title) in zip(axes, profiles, strict=True):
        for k, strategy in enumerate(strategies):
            values = []
            for cond, _ in conditions:
                want = "local disk" if not cond else profile
                match = [
                    r
                    for r in rows
                    if r["profile"] == want
                    and r["strategy"] == strategy
                    # "(default)", "(after `modelfs warm`)" are notes, not conditions
                    and r["condition"].split(" (")[0] == cond
                ]
                values.append(float(match[0]["MiB/s"]) if match else 0.0)
            xs = [i + (k - (len(strategies) - 1) / 2) * width for i in range(len(conditions))]
            ax.bar(xs, values, width, label=strategy)
            for xv, v in zip(xs, values, strict=True):
                if v:
                    ax.text(xv, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(conditions)), [label for _, label in conditions], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("MiB/s loading the model (higher is faster)")
    axes[0].legend(title="strategy", fontsize=8)
    fig.suptitle("Loading safetensors shards through a mount (docs/vllm.md)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    chunk_size_chart(DOCS / "chunk-size.png")
    load_strategy_chart(DOCS / "load-strategies.png")
    print(DOCS / "chunk-size.png", DOCS / "load-strategies.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
