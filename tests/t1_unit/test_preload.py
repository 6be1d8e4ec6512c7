"""Unit tier: `modelfs.preload`'s loader order."""

from __future__ import annotations

import json

from modelfs.preload import _File, loader_order
from modelfs.store import ObjectVersion


def _f(path: str) -> _File:
    return _File(path, "p/" + path, ObjectVersion(etag='"e"', size=1, mtime_ns=0))


def test_shards_come_in_index_order_then_the_rest_by_path() -> None:
    files = [_f(p) for p in ("m/b.safetensors", "m/a.safetensors", "m/c.safetensors", "x.gguf")]
    index = {"weight_map": {"w1": "c.safetensors", "w2": "a.safetensors", "w3": "c.safetensors"}}
    order = loader_order(files, {"m/model.safetensors.index.json": json.dumps(index).encode()})
    assert [f.path for f in order] == [
        "m/c.safetensors",
        "m/a.safetensors",
        "m/b.safetensors",
        "x.gguf",
    ]


def test_a_broken_index_or_a_shard_elsewhere_changes_nothing() -> None:
    files = [_f("b.safetensors"), _f("a.safetensors")]
    docs = {
        "bad.index.json": b"[" * 100_000,
        "x.index.json": json.dumps({"weight_map": {"w": "../../etc/passwd", "v": 7}}).encode(),
    }
    assert [f.path for f in loader_order(files, docs)] == ["a.safetensors", "b.safetensors"]
