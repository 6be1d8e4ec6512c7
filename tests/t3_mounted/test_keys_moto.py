"""Key-to-path rules through a real mount, on moto_server, which (unlike a
filesystem-backed gateway) stores 'a' and 'a/b', 'a//b' and '..' parts."""

from __future__ import annotations

import os

import pytest

from ..conftest import Bucket, Mounter

pytestmark = pytest.mark.mount

HIDDEN = [
    "hidden: not a valid file name",
    "also a prefix; the directory is shown",
]


def test_unmappable_keys_follow_the_documented_rules(moto_bucket: Bucket, mounter: Mounter) -> None:
    b = moto_bucket
    long_name = "n" * 256
    keys = {
        "p/plain.txt": b"plain",
        "p/both": b"object shadowed by the prefix",
        "p/both/inner.txt": b"inner",
        "p/empty//part": b"double slash",
        "p/dot/./x": b"dot part",
        "p/dotdot/../y": b"dotdot part",
        f"p/{long_name}": b"too long",
        "p/" + "m" * 255: b"longest allowed",
        "p/marker/": b"",
        "p/marker/child": b"child",
        "p/only-marker/": b"",
        "p/unicode-\u00e9\u4e2d.txt": b"utf8",
    }
    for k, v in keys.items():
        b.put(k, v)
    m = mounter(b, "p", allow_log=[r"hiding .*: (not a valid file name|also a prefix)"])
    root = m.path
    assert sorted(os.listdir(root)) == sorted(
        [
            "plain.txt",
            "both",
            "empty",
            "dot",
            "dotdot",
            "m" * 255,
            "marker",
            "only-marker",
            "unicode-\u00e9\u4e2d.txt",
        ]
    )
    assert (root / "both").is_dir()
    assert (root / "both/inner.txt").read_bytes() == b"inner"
    assert os.listdir(root / "empty") == []  # only reachable through the empty part
    assert os.listdir(root / "dot") == []
    assert os.listdir(root / "dotdot") == []
    assert (root / ("m" * 255)).read_bytes() == b"longest allowed"
    assert os.listdir(root / "marker") == ["child"]
    assert os.listdir(root / "only-marker") == []
    assert (root / "unicode-\u00e9\u4e2d.txt").read_bytes() == b"utf8"
    with pytest.raises(FileNotFoundError):
        os.stat(root / "nothing")
    log = m.log_file.read_text()
    assert "hiding 'both'" in log and f"hiding '{long_name}'" in log
    m.umount()


def test_listing_is_paginated(moto_bucket: Bucket, mounter: Mounter) -> None:
    names = [f"f{i:04d}" for i in range(1100)]  # more than one 1000-key page
    for n in names:
        moto_bucket.put(f"many/{n}", n.encode())
    m = mounter(moto_bucket, "many")
    assert sorted(os.listdir(m.path)) == names
    assert (m.path / "f1099").read_bytes() == b"f1099"
    assert m.stats()["store"]["list_requests"] >= 2
    m.umount()
