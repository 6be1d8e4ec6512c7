"""Chunk payload files: one sparse file per cached object version.

A chunk lives in ``<cache-dir>/data/<id[:2]>/<id>`` at the same offset it has
in the object, so a read that spans several cached chunks is one pread, and
eviction frees a chunk by punching a hole. The bytes at an offset of a given
object version never change, so rewriting a chunk (after a crash, or by a
concurrent fetch) writes identical bytes and is harmless.

File descriptors are reference counted: a descriptor is closed only when no
reader holds it, so a pread can never land on a reused descriptor number that
now names a different file.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
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


def payload_path(cache_root: Path, obj_id: bytes) -> Path:
    name = obj_id.hex()
    return cache_root / "data" / name[:2] / name


class PayloadFile:
    """An open payload file; use through `PayloadStore.acquire/release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.refs = 0

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n


class PayloadStore:
    def __init__(self, root: Path) -> None:
        self.root = root / "data"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._open: dict[bytes, PayloadFile] = {}
        self._lock = threading.Lock()
        self._punch_supported = True

    def path_of(self, obj_id: bytes) -> Path:
        return payload_path(self.root.parent, obj_id)

    def acquire(self, obj_id: bytes, create: bool = True) -> PayloadFile:
        """Open (or share) an object's file; FileNotFoundError if absent and not `create`."""
        with self._lock:
            pf = self._open.get(obj_id)
            if pf is None:
                path = self.path_of(obj_id)
                flags = os.O_RDWR | os.O_CLOEXEC
                if create:
                    path.parent.mkdir(mode=0o700, exist_ok=True)
                    flags |= os.O_CREAT
                fd = os.open(path, flags, 0o600)
                pf = self._open[obj_id] = PayloadFile(path, fd)
            pf.refs += 1
            return pf

    def release(self, obj_id: bytes) -> None:
        with self._lock:
            pf = self._open[obj_id]
            pf.refs -= 1
            if pf.refs == 0:
                del self._open[obj_id]
                os.close(pf.fd)

    def punch(self, obj_id: bytes, offset: int, length: int) -> None:
        """Free a chunk's blocks. A missing file means nothing to free."""
        if not self._punch_supported:
            return
        pf = None
        try:
            pf = self.acquire(obj_id, create=False)
            punch_hole(pf.fd, offset, length)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._punch_supported = False
                log.warning(
                    "the cache filesystem cannot punch holes; space is freed only "
                    "when every chunk of an object is evicted"
                )
            else:
                raise
        finally:
            if pf is not None:
                self.release(obj_id)

    def remove(self, obj_id: bytes) -> bool:
        """Unlink an object's file unless a reader holds it open."""
        with self._lock:
            if obj_id in self._open:
                return False
            try:
                self.path_of(obj_id).unlink()
            except FileNotFoundError:
                pass
            return True

    def close_all(self) -> None:
        with self._lock:
            for pf in self._open.values():
                os.close(pf.fd)
            self._open.clear()
