"""Chunk payload files: one sparse file per cached object version.

A chunk lives in ``<cache-dir>/data/<id[:2]>/<id>`` at the same offset it has
in the object, so a read that spans several cached chunks is one pread, and
eviction frees a chunk by punching a hole. The bytes at an offset of a given
object version never change, so rewriting a chunk (after a crash, or by a
concurrent fetch) writes identical bytes and is harmless.

File descriptors are reference counted: a descriptor is closed only when no
reader holds it, so a pread can never land on a reused descriptor number that
now names a different file.

Several processes may share a cache directory. A chunk's byte range in its
payload file is also its cross-process lock: whoever fetches and stores a
chunk, or evicts it, holds an open-file-description (OFD) write lock on that
range. OFD locks belong to the descriptor, not the process, so closing some
other descriptor of the file never drops them (unlike POSIX `lockf` locks),
and the kernel drops them when a process dies, so a crash leaves no lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ pad).
_FLOCK = struct.Struct("hhqqi4x")


def ofd_lock(fd: int, start: int, length: int, kind: int = fcntl.F_WRLCK) -> bool:
    """Try to take (or with F_UNLCK drop) an OFD lock on [start, start+length);
    False if another open file description holds a conflicting one.
    `length` 0 means to the end of the file and beyond."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def ofd_lock_wait(fd: int, start: int, length: int) -> None:
    """Take an OFD write lock, waiting for it (for short critical sections)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))


def ofd_conflict(fd: int, start: int, length: int) -> bool:
    """Whether another open file description holds a lock that a write lock
    on the range would conflict with (the caller's own locks never count)."""
    raw = fcntl.fcntl(
        fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    )
    return bool(_FLOCK.unpack(raw)[0] != fcntl.F_UNLCK)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def payload_path(cache_root: Path, obj_id: bytes) -> Path:
    name = obj_id.hex()
    return cache_root / "data" / name[:2] / name


# O_DIRECT wants offsets, lengths and buffer addresses on this boundary.
DIRECT_ALIGN = 4096
# Guards the lazy opening of O_DIRECT descriptors (see `_direct_fd`).
_direct_lock = threading.Lock()
_direct_ok = True  # False once the cache's filesystem refused O_DIRECT


def _write_full(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _read_full(fd: int, view: memoryview, offset: int) -> int:
    """Read into all of `view` unless the file ends first; returns the count."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class PayloadFile:
    """An open payload file; use through `PayloadStore.acquire/release`.

    `fd` is None for a file that could not be created (a full or read-only
    cache directory): reads and writes of it fail with OSError, which the
    chunk cache treats as "cannot cache", and its locks always succeed."""

    def __init__(self, path: Path, fd: int | None, error: OSError | None = None) -> None:
        self.path = path
        self.fd = fd
        self.error = error  # why an unbacked file could not be created
        self.refs = 0
        self.dfd: int | None = None  # O_DIRECT descriptor, opened on first use

    def _require_fd(self) -> int:
        if self.fd is None:
            raise OSError(errno.ENOENT, "payload file could not be created", str(self.path))
        return self.fd

    def read_into(self, buf: memoryview, length: int, offset: int, *, aligned: bool) -> int:
        """Read `length` bytes at `offset` into `buf`; returns how many were
        read (fewer only at the end of the file). An `aligned` buffer
        (page-aligned, with room for `length` rounded up to a block) is
        read with O_DIRECT where the filesystem allows it: a warm read then
        costs no page-cache work and leaves no second copy in the page cache."""
        fd = self._require_fd()
        if aligned and offset % DIRECT_ALIGN == 0:
            dfd = self._direct_fd()
            if dfd is not None:
                rounded = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
                return min(length, _read_full(dfd, buf[:rounded], offset))
        return _read_full(fd, buf[:length], offset)

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write `data` (a page-aligned pool slab) at `offset`. The
        block-aligned part goes straight from it through an O_DIRECT
        descriptor where the filesystem allows it (on this kind of VM a
        buffered 8 MiB write costs 2-3.5 CPU s/GiB of page-cache work,
        O_DIRECT under 0.1); the rest, and filesystems that refuse O_DIRECT
        (tmpfs), are written buffered."""
        fd = self._require_fd()
        view = data.cast("B")
        if offset % DIRECT_ALIGN == 0 and len(view) >= DIRECT_ALIGN:
            dfd = self._direct_fd()
            if dfd is not None:
                n = len(view) - len(view) % DIRECT_ALIGN
                _write_full(dfd, view[:n], offset)
                view = view[n:]
                offset += n
        _write_full(fd, view, offset)

    def _direct_fd(self) -> int | None:
        """This file opened with O_DIRECT, or None where that is refused."""
        global _direct_ok
        # Writes of several chunks of one file run in parallel threads: one
        # lock, so only one of them opens the descriptor (two would leak one).
        with _direct_lock:
            if self.dfd is None and _direct_ok:
                try:
                    # Reopened through the descriptor, not the path: the
                    # path may have been swapped for a link since.
                    self.dfd = os.open(
                        f"/proc/self/fd/{self._require_fd()}",
                        os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC,
                    )
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    _direct_ok = False  # the cache's filesystem refuses it: ask no more
            return self.dfd

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dfd = None

    def try_lock(self, start: int, length: int) -> bool:
        return self.fd is None or ofd_lock(self.fd, start, length)

    def unlock(self, start: int, length: int) -> None:
        if self.fd is not None:
            ofd_lock(self.fd, start, length, fcntl.F_UNLCK)


class PayloadStore:
    """The payload files under ``data/``, reached only through directory
    descriptors opened with O_NOFOLLOW: a link put in place of ``data``, a
    ``data/<xx>`` directory or a payload file (by an operator or an
    attacker, before or after start) fails the open with ELOOP or
    ENOTDIR, so modelfs never writes, truncates or deletes through a link
    it did not make."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        """`create`: make ``data/`` if it is missing (read-only users of a
        cache, `cache du` and `verify`, do not)."""
        self.root = root / "data"
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.root, 0o700)
        self._open: dict[bytes, PayloadFile] = {}
        self._lock = threading.Lock()
        self._punch_supported = True

    def path_of(self, obj_id: bytes) -> Path:
        return payload_path(self.root.parent, obj_id)

    @contextlib.contextmanager
    def _subdir(self, name: str, create: bool) -> Iterator[int]:
        """A descriptor of ``data/<name>``, reached without following a link.
        Opened afresh each time (once per object opened, not per read), so
        whatever is mounted at the cache's path now (a read-only bind mount
        laid over it) is what is written to."""
        top = os.open(self.root, _DIR_FLAGS)
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=top)
            fd = os.open(name, _DIR_FLAGS, dir_fd=top)
        finally:
            os.close(top)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_file(self, obj_id: bytes, create: bool) -> int:
        name = obj_id.hex()
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        with self._subdir(name[:2], create) as sub:
            fd = os.open(name, flags, 0o600, dir_fd=sub)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", str(self.path_of(obj_id)))
        return fd

    def acquire(self, obj_id: bytes, create: bool = True) -> PayloadFile:
        """Open (or share) an object's file; FileNotFoundError if absent and not `create`.

        With `create`, a file that cannot be created (ENOSPC, EROFS, EACCES...)
        comes back unbacked (fd None) instead of failing: the object is then
        read from the origin without caching until its last handle closes."""
        with self._lock:
            pf = self._open.get(obj_id)
            if pf is None:
                path = self.path_of(obj_id)
                if create:
                    try:
                        pf = PayloadFile(path, self._open_file(obj_id, True))
                    except OSError as exc:
                        pf = PayloadFile(path, None, exc)
                else:
                    pf = PayloadFile(path, self._open_file(obj_id, False))
                self._open[obj_id] = pf
            pf.refs += 1
            return pf

    def release(self, obj_id: bytes) -> None:
        with self._lock:
            pf = self._open[obj_id]
            pf.refs -= 1
            if pf.refs == 0:
                del self._open[obj_id]
                pf.close()

    def punch(self, pf: PayloadFile, offset: int, length: int) -> None:
        """Free a chunk's blocks."""
        if not self._punch_supported or pf.fd is None:
            return
        try:
            punch_hole(pf.fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._punch_supported = False
                log.warning(
                    "the cache filesystem cannot punch holes; space is freed only "
                    "when every chunk of an object is evicted"
                )
            else:
                raise

    def remove(self, obj_id: bytes) -> bool:
        """Unlink an object's file unless a reader holds it open."""
        with self._lock:
            if obj_id in self._open:
                return False
            self._unlink(obj_id.hex())
            return True

    def _unlink(self, name: str) -> None:
        try:
            with self._subdir(name[:2], False) as sub:
                os.unlink(name, dir_fd=sub)
        except (FileNotFoundError, NotADirectoryError):
            pass  # gone, or its directory replaced by a link: nothing of ours to unlink
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise

    def files(self) -> Iterator[tuple[str, int]]:
        """(name, size in blocks) of every payload file; links and other
        odd entries are skipped, never followed."""
        try:
            top = os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            return  # no payload file was ever written
        try:
            with os.scandir(top) as subs:
                names = [e.name for e in subs if e.is_dir(follow_symlinks=False)]
            for sub in names:
                try:
                    fd = os.open(sub, _DIR_FLAGS, dir_fd=top)
                except OSError:
                    continue  # replaced by a link or removed meanwhile
                try:
                    with os.scandir(fd) as entries:
                        found = [
                            (e.name, e.stat(follow_symlinks=False).st_blocks)
                            for e in entries
                            if e.is_file(follow_symlinks=False)
                        ]
                finally:
                    os.close(fd)
                yield from found
        finally:
            os.close(top)

    def remove_name(self, name: str) -> None:
        """Unlink one payload file by name (``files``), never through a link."""
        with self._lock:
            self._unlink(name)

    def close_all(self) -> None:
        with self._lock:
            for pf in self._open.values():
                pf.close()
            self._open.clear()
