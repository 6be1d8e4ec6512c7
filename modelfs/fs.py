"""The FUSE operations: the only place that raises `pyfuse3.FUSEError`.

Translates kernel requests into namespace, reader and cache calls, and every
domain exception into one errno (`errno_for`). The mount is read-only: every
request that would modify it gets EROFS, and the kernel mount is 'ro' too.

Extended attributes (read-only) expose what a user debugging a mount wants:
``user.modelfs.etag`` and ``user.modelfs.key`` on files, ``user.modelfs.pid``
and ``user.modelfs.stats`` (JSON) on the root.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from .cache import Buffer, CachedObject, ChunkCache
from .config import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, KERNEL_TTL_CAP
from .errors import (
    AccessDenied,
    CacheError,
    EndpointUnreachable,
    NoSuchName,
    NoSuchObject,
    ObjectChanged,
    OutOfFileDescriptors,
    StoreError,
    VersionReplaced,
)
from .namespace import ROOT_INODE, Namespace, Node
from .prefetch import OpenPrefetch, ReadAhead, Upcoming
from .reader import OpenFile
from .report import MountReport
from .snapshot import Pins
from .stats import FsStats, MountStats

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

XATTR_ETAG = b"user.modelfs.etag"
XATTR_KEY = b"user.modelfs.key"
XATTR_PID = b"user.modelfs.pid"
XATTR_STATS = b"user.modelfs.stats"
XATTR_CACHED = b"user.modelfs.cached"  # bytes of a file's current version in the cache
XATTR_OBJECT = b"user.modelfs.object"  # the version's id in the cache index (hex)


def errno_for(exc: BaseException) -> int:
    """The single mapping from domain exceptions to errno values."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, NoSuchObject):
        return errno.ENOENT
    if isinstance(exc, ObjectChanged):
        return errno.ESTALE
    if isinstance(exc, AccessDenied):
        return errno.EACCES
    if isinstance(exc, EndpointUnreachable):
        return errno.EHOSTUNREACH
    if isinstance(exc, OutOfFileDescriptors):
        return errno.EMFILE
    if isinstance(exc, StoreError | CacheError):
        return errno.EIO
    if isinstance(exc, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _fuse_errors(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (NoSuchObject, NotADirectoryError, VersionReplaced) as exc:  # ordinary answers
            raise pyfuse3.FUSEError(errno_for(exc)) from None
        except (StoreError, CacheError, OSError) as exc:
            code = errno_for(exc)
            # Readers waiting on one failed fetch all get the same exception
            # object: one failure, one log line.
            if not getattr(exc, "modelfs_logged", False):
                log.warning("%s failed: %s (%s)", fn.__name__, exc, errno.errorcode.get(code, code))
                exc.modelfs_logged = True  # type: ignore[union-attr]
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _never_raises(
    fn: Callable[P, Coroutine[Any, Any, None]],
) -> Callable[P, Coroutine[Any, Any, None]]:
    """For requests the kernel expects no answer to (forget): an error is
    logged, never raised into pyfuse3."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            await fn(*args, **kwargs)
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)

    return wrapper


async def _async_erofs(*_: Any, **__: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    def __init__(
        self,
        namespace: Namespace,
        cache: ChunkCache,
        *,
        chunk_size: int,
        uid: int,
        gid: int,
        ttl: float,
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
        pins: Pins | None = None,
        readahead: ReadAhead | None = None,
        open_prefetch: OpenPrefetch | None = None,
        report: MountReport | None = None,
    ) -> None:
        super().__init__()
        self.pins = pins  # a snapshot mount's pinned versions; None: a live listing
        self.readahead = readahead  # None: no read-ahead
        self.open_prefetch = open_prefetch  # None: nothing fetched whole on open
        # What the stats xattr serves (the daemon's, with the mount's facts
        # and rates); a bare one reports the layers' counters only.
        self.report = report or MountReport(cache.store, cache, pins=pins, readahead=readahead)
        self.ns = namespace
        self.cache = cache
        self.chunk_size = chunk_size
        self.uid = uid
        self.gid = gid
        # The kernel keeps entries this long; an indefinite TTL becomes a year.
        self.ttl = min(ttl, KERNEL_TTL_CAP)
        self.file_mode = stat.S_IFREG | file_mode
        self.dir_mode = stat.S_IFDIR | dir_mode
        self._mount_ns = time.time_ns()
        self._files: dict[int, OpenFile] = {}
        self._dir_handles: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1
        self.name_lookups = 0  # lookups of a name that reached the daemon
        self.negative_lookups = 0  # of those, names that do not exist

    # -- attributes ------------------------------------------------------
    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = self.ttl
        a.attr_timeout = self.ttl
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_blksize = 128 * 1024
        if node.is_dir:
            a.st_mode = self.dir_mode
            a.st_nlink = 2
            a.st_size = 0
            mtime = self._mount_ns
        else:
            assert node.version is not None
            a.st_mode = self.file_mode
            a.st_nlink = 1
            a.st_size = node.version.size
            mtime = node.version.mtime_ns
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            node = self.ns.get(parent_inode)
        elif name == b"..":
            node = self.ns.get(self.ns.get(parent_inode).parent)
        else:
            self.name_lookups += 1
            try:
                return self._attr(await self.ns.lookup(parent_inode, name))
            except NoSuchName:
                # A negative entry: the kernel answers ENOENT itself for the
                # TTL, so a loader probing for absent files (config
                # variants, index files) costs no round trip each time.
                self.negative_lookups += 1
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = self.ttl
                return negative
        node.lookups += 1
        return self._attr(node)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.ns.get(inode))

    @_never_raises
    async def forget(self, inode_list: Any) -> None:
        for inode, nlookup in inode_list:
            self.ns.forget(inode, nlookup)

    # -- directories -----------------------------------------------------
    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        children = await self.ns.children(inode)
        fh = self._next_fh
        self._next_fh += 1
        # A snapshot, so offsets stay valid if the listing is refreshed.
        self._dir_handles[fh] = sorted(children.items())
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dir_handles[fh]
        for i in range(start_id, len(entries)):
            name, inode = entries[i]
            try:
                node = self.ns.get(inode)
            except NoSuchObject:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(node), i + 1):
                return
            node.lookups += 1

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # -- files -----------------------------------------------------------
    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = await self.ns.refresh(inode)
        if node.is_dir or node.version is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        obj = self.cache.open_object(node.key, node.version, self.chunk_size)
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = OpenFile(fh, inode, obj, self.cache, self.readahead, self.open_prefetch)
        if self.open_prefetch is not None:
            self.open_prefetch.on_open(obj, node.key.rsplit("/", 1)[-1], self._upcoming(node))
        # An inode serves one version for its life (Namespace gives a new
        # version a new inode), so its page cache never needs dropping.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _upcoming(self, node: Node) -> Upcoming:
        """How prefetch on open finds the model file a loader opens after
        `node`: the next name in its directory that prefetch on open takes
        (loaders read shards in name order, and the listing is sorted)."""

        async def next_file() -> tuple[CachedObject, str, Upcoming] | None:
            assert self.open_prefetch is not None
            name = os.fsencode(node.key.rsplit("/", 1)[-1])
            children = await self.ns.children(node.parent)
            for child_name in sorted(n for n in children if n > name):
                if not self.open_prefetch.matches(os.fsdecode(child_name)):
                    continue
                try:
                    child = self.ns.get(children[child_name])
                except NoSuchObject:
                    continue
                if child.is_dir or child.version is None:
                    continue
                obj = self.cache.open_object(child.key, child.version, self.chunk_size)
                return obj, os.fsdecode(child_name), self._upcoming(child)
            return None

        return next_file

    # pyfuse3 takes any contiguous buffer, so a memoryview slice of a cached
    # chunk goes to the kernel without a copy; its stub says bytes.
    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]
        handle = self._files[fh]
        try:
            return await handle.read(off, size)
        except NoSuchObject as exc:
            if self.pins is None:
                raise
            # A pinned object deleted at an unversioned origin: as stale as
            # an overwritten one, and told the same way.
            await self._pinned_stale(handle)
            handle.stale = True
            gone = ObjectChanged(f"{handle.obj.key}: deleted since the snapshot")
            gone.modelfs_logged = True  # type: ignore[attr-defined]
            raise gone from exc
        except ObjectChanged as exc:
            if self.pins is not None:
                # Logged once per object, with its current ETag, by the pins.
                await self._pinned_stale(handle)
                exc.modelfs_logged = True  # type: ignore[attr-defined]
                raise
            # New opens should see the new version without waiting for the TTL.
            self.ns.invalidate_parent(handle.inode)
            # A stale handle fails every read after: one warning per handle.
            if handle.stale_warned:
                exc.modelfs_logged = True  # type: ignore[attr-defined]
            handle.stale_warned = True
            raise

    async def _pinned_stale(self, handle: OpenFile) -> None:
        assert self.pins is not None
        await self.pins.found_stale(handle.obj.key, handle.obj.version)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            handle.close()

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.cache.capacity // 4096
        s.f_bfree = s.f_bavail = max(0, self.cache.capacity - self.cache.used) // 4096
        s.f_files = len(self.ns)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- extended attributes ---------------------------------------------
    def _xattrs(self, node: Node) -> dict[bytes, Callable[[], bytes]]:
        if node.inode == ROOT_INODE:
            return {
                XATTR_PID: lambda: str(os.getpid()).encode(),
                XATTR_STATS: lambda: json.dumps(self.stats().to_json()).encode(),
            }
        if node.is_dir:
            return {XATTR_KEY: lambda: node.key.encode()}
        version = node.version
        assert version is not None
        return {
            XATTR_KEY: lambda: node.key.encode(),
            XATTR_ETAG: lambda: (version.etag or "").encode(),
            XATTR_CACHED: lambda: str(self.cache.version_cached_bytes(version)).encode(),
            XATTR_OBJECT: lambda: version.identity().hex().encode(),
        }

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        getter = self._xattrs(self.ns.get(inode)).get(name)
        if getter is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if name == XATTR_CACHED:
            # A scan of the object's records in LMDB, as long as the object
            # is big: never on the thread that answers every request.
            got: bytes = await trio.to_thread.run_sync(getter)
            return got
        return getter()

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self._xattrs(self.ns.get(inode)))

    def fs_stats(self) -> FsStats:
        return FsStats(
            open_files=len(self._files),
            lookups=self.name_lookups,
            negative_lookups=self.negative_lookups,
            inodes=len(self.ns),
        )

    def stats(self) -> MountStats:
        return self.report.snapshot(self.fs_stats())

    # -- everything that would write ------------------------------------
    setattr = _async_erofs
    mknod = _async_erofs
    mkdir = _async_erofs
    unlink = _async_erofs
    rmdir = _async_erofs
    symlink = _async_erofs
    rename = _async_erofs
    link = _async_erofs
    write = _async_erofs
    create = _async_erofs
    setxattr = _async_erofs
    removexattr = _async_erofs
