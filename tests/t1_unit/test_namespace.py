"""Unit tier: mapping keys to a tree, listing cache and TTL, inode lifetime."""

from __future__ import annotations

import pytest
import trio

from modelfs.config import parse_ttl
from modelfs.errors import NoSuchObject, ObjectChanged
from modelfs.namespace import ROOT_INODE, Namespace
from modelfs.testing.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _names(ns: Namespace, inode: int = ROOT_INODE) -> list[str]:
    return sorted(n.decode() for n in trio.run(ns.children, inode))


@pytest.mark.allow_log("hiding")
def test_mapping_rules() -> None:
    s = MemoryStore()
    for key in [
        "p/a",
        "p/a/b",
        "p/x//y",
        "p/./z",
        "p/../w",
        "p/" + "n" * 256,
        "p/ok",
        "p/dir/",
        "p/dir/f",
        "p/only/",
        "q/outside",
    ]:
        s.put(key, b"1")
    ns = Namespace(s, "p/", ttl=60)
    assert _names(ns) == ["a", "dir", "ok", "only", "x"]
    a = trio.run(ns.lookup, ROOT_INODE, b"a")
    assert a.is_dir and _names(ns, a.inode) == ["b"]
    x = trio.run(ns.lookup, ROOT_INODE, b"x")
    assert _names(ns, x.inode) == []  # "x//y" has an empty part
    assert _names(ns, trio.run(ns.lookup, ROOT_INODE, b"dir").inode) == ["f"]
    assert _names(ns, trio.run(ns.lookup, ROOT_INODE, b"only").inode) == []
    with pytest.raises(NoSuchObject):
        trio.run(ns.lookup, ROOT_INODE, b"outside")


def test_listing_is_cached_for_ttl_and_inodes_are_stable() -> None:
    s = MemoryStore()
    s.put("f", b"1")
    clock = Clock()
    ns = Namespace(s, "", ttl=10, clock=clock)
    f1 = trio.run(ns.lookup, ROOT_INODE, b"f")
    lists = s.counters.list_requests
    s.put("f", b"22")
    s.put("g", b"3")
    clock.now = 5
    assert _names(ns) == ["f"] and s.counters.list_requests == lists
    assert trio.run(ns.refresh, f1.inode).version.size == 1  # type: ignore[union-attr]
    clock.now = 11
    assert _names(ns) == ["f", "g"]
    # An unchanged file keeps its inode across listings...
    g1 = trio.run(ns.lookup, ROOT_INODE, b"g")
    clock.now = 22
    assert trio.run(ns.lookup, ROOT_INODE, b"g").inode == g1.inode
    # ...a new version gets a new one; the old inode answers ESTALE, so the
    # kernel looks the name up again instead of mixing versions in one inode.
    with pytest.raises(ObjectChanged):
        trio.run(ns.refresh, f1.inode)
    f2 = trio.run(ns.lookup, ROOT_INODE, b"f")
    assert f2.inode != f1.inode and f2.version is not None and f2.version.size == 2
    assert f1.version is not None and f1.version.size == 1  # never rewritten in place


def test_removed_file_lives_until_forgotten() -> None:
    s = MemoryStore()
    s.put("f", b"1")
    clock = Clock()
    ns = Namespace(s, "", ttl=1, clock=clock)
    f = trio.run(ns.lookup, ROOT_INODE, b"f")
    s.delete("f")
    clock.now = 2
    with pytest.raises(NoSuchObject):
        trio.run(ns.refresh, f.inode)
    assert ns.get(f.inode) is f  # the kernel still holds a reference
    ns.forget(f.inode, 1)
    with pytest.raises(NoSuchObject):
        ns.get(f.inode)


def test_concurrent_lookups_share_one_listing() -> None:
    s = MemoryStore()
    for i in range(5):
        s.put(f"d/f{i}", b"x")
    ns = Namespace(s, "", ttl=60)

    async def main() -> None:
        d = await ns.lookup(ROOT_INODE, b"d")
        before = s.counters.list_requests
        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(ns.lookup, d.inode, f"f{i}".encode())
        assert s.counters.list_requests == before + 1

    trio.run(main)


def test_file_replaced_by_directory_gets_new_inode() -> None:
    s = MemoryStore()
    s.put("a", b"1")
    clock = Clock()
    ns = Namespace(s, "", ttl=1, clock=clock)
    f = trio.run(ns.lookup, ROOT_INODE, b"a")
    s.delete("a")
    s.put("a/b", b"2")
    clock.now = 2
    d = trio.run(ns.lookup, ROOT_INODE, b"a")
    assert d.is_dir and d.inode != f.inode and not f.is_dir


def test_an_indefinite_ttl_lists_once_for_the_life_of_the_mount() -> None:
    s = MemoryStore()
    s.put("f", b"1")
    clock = Clock()
    ns = Namespace(s, "", ttl=parse_ttl("indefinite"), clock=clock)
    assert _names(ns) == ["f"]
    lists = s.counters.list_requests
    s.put("g", b"2")
    clock.now = 10 * 365 * 86400  # ten years on
    assert _names(ns) == ["f"] and s.counters.list_requests == lists
