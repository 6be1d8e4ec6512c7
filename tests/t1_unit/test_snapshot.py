"""The manifest format, listings answered from a snapshot, and the
comparison of a snapshot with the bucket, over an in-memory store."""

from __future__ import annotations

import json
import re

import pytest

from modelfs.config import S3Location
from modelfs.snapshot import FORMAT, ManifestError, differences, parse, take
from modelfs.testing.memory import MemoryStore

from ..data import manifest_doc

MODEL = {
    "m/config.json": b"{}",
    "m/model-00001-of-00002.safetensors": b"x" * 1000,
    "m/model-00002-of-00002.safetensors": b"y" * 999,
    "m/tokenizer/vocab.txt": b"a b c",
}


def test_manifest_round_trips_exactly() -> None:
    store = MemoryStore()
    for key, data in MODEL.items():
        store.put(key, data)
    snap = take(store, S3Location("mem", "m/"))
    doc = json.loads(snap.to_json())
    assert doc["format"] == FORMAT and doc["bucket"] == "mem" and doc["prefix"] == "m/"
    assert [o["key"] for o in doc["objects"]] == sorted(MODEL)
    again = parse(snap.to_json().encode(), "m.json")
    assert again.objects == snap.objects  # ETag, size, mtime to the ns, origin
    assert [o.version.identity() for o in again.objects] == [
        store.objects[k][1].identity() for k in sorted(MODEL)
    ]


def test_a_snapshot_lists_as_the_bucket_did() -> None:
    store = MemoryStore()
    for key in ("p/a", "p/b/c", "p/b/d/e", "p/b/d/f", "p/x/", "p/x/y", "p/z/"):
        store.put(key, key.encode())
    snap = take(store, S3Location("mem", "p/"))
    for prefix in ("p/", "p/b/", "p/b/d/", "p/x/", "p/z/", "p/nothing/"):
        want, got = store.list_dir(prefix), snap.list_dir(prefix)
        assert got.objects == want.objects, prefix
        assert got.prefixes == want.prefixes, prefix


def test_differences_name_changed_deleted_and_added_keys() -> None:
    store = MemoryStore()
    for key in ("m/a", "m/b", "m/c"):
        store.put(key, key.encode())
    before = take(store, S3Location("mem", "m/"))
    store.put("m/a", b"new bytes")
    store.delete("m/b")
    store.put("m/d", b"d")
    diffs = differences(before, take(store, S3Location("mem", "m/")))
    assert [(d.key, d.change) for d in diffs] == [
        ("m/a", "changed"),
        ("m/b", "deleted"),
        ("m/d", "added"),
    ]
    assert differences(before, before) == []


BAD_MANIFESTS = {
    "not json": (b"{oops", "not JSON"),
    "foreign json": (b'{"model": "llama"}', "not a modelfs manifest"),
    "a list": (b"[1, 2]", "not a modelfs manifest"),
    "newer format": (
        json.dumps(dict(manifest_doc(), format="modelfs-manifest/9")).encode(),
        "modelfs-manifest/9",
    ),
    "key outside the prefix": (
        json.dumps(
            dict(manifest_doc(), objects=[dict(manifest_doc()["objects"][0], key="other/a")])
        ).encode(),
        "not under s3://bkt/m/",
    ),
    "negative size": (
        json.dumps(
            dict(manifest_doc(), objects=[dict(manifest_doc()["objects"][0], size=-1)])
        ).encode(),
        "objects[0].size",
    ),
    "duplicate key": (
        json.dumps(dict(manifest_doc(), objects=manifest_doc()["objects"] * 2)).encode(),
        "listed twice",
    ),
    "bad time": (
        json.dumps(
            dict(
                manifest_doc(),
                objects=[dict(manifest_doc()["objects"][0], last_modified="yesterday")],
            )
        ).encode(),
        "last_modified",
    ),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_bad_manifests_are_named(case: str) -> None:
    raw, words = BAD_MANIFESTS[case]
    with pytest.raises(ManifestError, match=re.escape(words)) as info:
        parse(raw, "/etc/m.json")
    assert str(info.value).startswith("/etc/m.json")
    assert "\n" not in str(info.value)
