"""The namespace: S3 keys under the mount prefix, seen as a directory tree.

Owns the inode table and the per-directory listing cache. A directory's
listing is one ListObjectsV2 walk with Delimiter='/', loaded on first use,
shared by concurrent callers, and reloaded once older than the metadata TTL.
A snapshot mount lists from its frozen snapshot instead (`lister`).

Keys that cannot be paths get one rule each (see docs/architecture.md):

* a key ending in '/' (a "directory marker") makes the directory exist and is
  not shown as a file;
* a name that is '.', '..', empty (from 'a//b'), longer than 255 bytes, or
  holds a NUL byte is hidden, together with everything below it;
* a name that is both an object and a prefix ('a' and 'a/b') is a directory;
  the object 'a' is hidden.

Hidden keys are logged once per directory and name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .errors import NoSuchName, NoSuchObject, VersionReplaced
from .store import MAX_OBJECT_SIZE, Listing, ObjectInfo, ObjectStore, ObjectVersion

log = logging.getLogger(__name__)

ROOT_INODE = 1
NAME_MAX = 255


@dataclass
class Node:
    inode: int
    parent: int
    name: bytes
    is_dir: bool
    key: str  # object key for files, prefix ("" or ending in "/") for dirs
    version: ObjectVersion | None = None
    lookups: int = 0
    listed: bool = True  # still present in its parent's latest listing


@dataclass
class _DirState:
    loaded_at: float = -1.0
    children: dict[bytes, int] = field(default_factory=dict)
    loading: trio.Event | None = None
    error: BaseException | None = None


def valid_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    )


@dataclass
class Level:
    """One directory level under the key rules: what a mount shows of it."""

    dirs: dict[str, str] = field(default_factory=dict)  # name -> prefix
    files: dict[str, ObjectInfo] = field(default_factory=dict)  # name -> object
    hidden: list[tuple[str, str]] = field(default_factory=list)  # (name, why)


def level(dir_key: str, listing: Listing) -> Level:
    """The names under `dir_key` in one Delimiter='/' listing, after the key
    rules of this module's docstring; the mount and `modelfs pull` both
    see a prefix through this."""
    out = Level()
    for p in listing.prefixes:
        name = p[len(dir_key) : -1]
        if valid_name(name):
            out.dirs[name] = p
        else:
            out.hidden.append((name, "not a valid file name"))
    for obj in listing.objects:
        name = obj.key[len(dir_key) :]
        if name == "":
            continue  # the directory marker of this directory
        if not valid_name(name):
            out.hidden.append((name, "not a valid file name"))
        elif not 0 <= obj.version.size <= MAX_OBJECT_SIZE:
            out.hidden.append((name, f"its listed size {obj.version.size} is not a real size"))
        elif name in out.dirs:
            out.hidden.append((name, "also a prefix; the directory is shown"))
        else:
            out.files[name] = obj
    return out


class Namespace:
    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        lister: Callable[[str], Listing] | None = None,
    ) -> None:
        self.list_dir = lister or store.list_dir
        self.ttl = ttl
        self._clock = clock
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, ROOT_INODE, b"", True, prefix, lookups=1)
        }
        self._dirs: dict[int, _DirState] = {}
        self._next_inode = ROOT_INODE + 1
        self._warned: set[tuple[str, str]] = set()

    def seed(self, listing: Listing) -> None:
        """Take `listing` as the root's listing, made just now (the start-up
        probe's), so the first lookup does not list the root again."""
        state = self._dirs.setdefault(ROOT_INODE, _DirState())
        if state.loaded_at < 0 and state.loading is None:
            self._apply(self._nodes[ROOT_INODE], state, listing)

    # -- queries ---------------------------------------------------------
    def get(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise NoSuchObject(f"inode {inode} is unknown")
        return node

    def __len__(self) -> int:
        return len(self._nodes)

    async def lookup(self, parent: int, name: bytes) -> Node:
        """The child `name` of directory `parent`; counts one kernel lookup."""
        children = await self.children(parent)
        inode = children.get(name)
        if inode is None:
            raise NoSuchName(f"{name!r} not found")
        node = self._nodes[inode]
        node.lookups += 1
        return node

    async def children(self, inode: int) -> dict[bytes, int]:
        """Name -> inode for a directory, reloading it once the TTL passed."""
        node = self.get(inode)
        if not node.is_dir:
            raise NotADirectoryError(node.key)
        state = self._dirs.setdefault(inode, _DirState())
        while state.loaded_at < 0 or self._clock() - state.loaded_at > self.ttl:
            if state.loading is not None:
                await state.loading.wait()
                if state.error is not None:
                    raise state.error
                if state.loaded_at >= 0:
                    break  # just loaded by another caller; accept even with ttl 0
                continue
            state.loading = trio.Event()
            state.error = None
            try:
                listing = await trio.to_thread.run_sync(
                    self.list_dir, node.key, abandon_on_cancel=True
                )
                self._apply(node, state, listing)
            except BaseException as exc:
                state.error = exc
                raise
            finally:
                state.loading.set()
                state.loading = None
            break
        return state.children

    async def refresh(self, inode: int) -> Node:
        """Re-check a file against its parent's listing if the TTL passed.

        A file replaced by a new version raises ObjectChanged (ESTALE): the
        kernel then looks the name up again and opens the new inode."""
        node = self.get(inode)
        children = await self.children(node.parent)
        if not node.listed:
            if node.name in children:
                raise VersionReplaced(f"{node.key} was replaced by a new version")
            raise NoSuchObject(f"{node.key} no longer exists")
        return node

    def invalidate_parent(self, inode: int) -> None:
        """Force the next access to the parent directory to re-list it."""
        node = self._nodes.get(inode)
        if node is not None and node.parent in self._dirs:
            self._dirs[node.parent].loaded_at = -1.0

    # -- bookkeeping -----------------------------------------------------
    def forget(self, inode: int, nlookup: int) -> None:
        node = self._nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - nlookup)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups == 0 and not node.listed:
            del self._nodes[node.inode]
            self._dirs.pop(node.inode, None)

    def _hide(self, dir_key: str, name: str, why: str) -> None:
        if (dir_key, name) not in self._warned:
            self._warned.add((dir_key, name))
            log.warning("hiding %r under %r: %s", name, dir_key or "/", why)

    def _apply(self, dnode: Node, state: _DirState, listing: Listing) -> None:
        seen = level(dnode.key, listing)
        for name, why in seen.hidden:
            self._hide(dnode.key, name, why)
        wanted: dict[bytes, tuple[bool, str, ObjectVersion | None]] = {}
        for name, p in seen.dirs.items():
            wanted[name.encode("utf-8", "surrogateescape")] = (True, p, None)
        for name, obj in seen.files.items():
            wanted[name.encode("utf-8", "surrogateescape")] = (False, obj.key, obj.version)

        old = state.children
        new: dict[bytes, int] = {}
        for bname, (is_dir, key, version) in wanted.items():
            inode = old.get(bname)
            node = self._nodes.get(inode) if inode is not None else None
            # A file's inode names one version for its whole life: a new
            # version gets a new inode, so the kernel never keeps pages of
            # one version under an inode that now serves another (as NFS
            # file handles change when a file is replaced).
            if node is not None and node.is_dir == is_dir and node.version == version:
                node.listed = True
            else:
                node = Node(self._next_inode, dnode.inode, bname, is_dir, key, version)
                self._next_inode += 1
                self._nodes[node.inode] = node
            new[bname] = node.inode
        for bname, inode in old.items():
            if new.get(bname) != inode and inode in self._nodes:
                gone = self._nodes[inode]
                gone.listed = False
                self._maybe_drop(gone)
        state.children = new
        state.loaded_at = self._clock()
