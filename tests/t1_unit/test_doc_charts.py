"""The charts in docs/ are drawn from the tables beside them: the tables must
stay parseable, with the columns the charts read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "doc_charts.py"


def _charts():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("doc_charts", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_chunk_size_and_load_strategy_tables_parse() -> None:
    charts = _charts()
    sizes = charts.table_after(charts.DOCS / "benchmarks.md", "## Chunk size")
    assert [r["chunk"] for r in sizes] == ["1M", "2M", "4M", "8M", "16M", "32M"]
    for r in sizes:
        for column in ("cold seq MiB/s", "warm seq MiB/s", "random 128 KiB read, ms"):
            assert float(r[column]) > 0
    loads = charts.table_after(charts.DOCS / "vllm.md", "## Which load strategy")
    assert {r["strategy"] for r in loads} == {"lazy", "eager", "prefetch"}
    assert all(float(r["MiB/s"]) > 0 for r in loads)
    assert (charts.DOCS / "chunk-size.png").exists() and (
        charts.DOCS / "load-strategies.png"
    ).exists()
