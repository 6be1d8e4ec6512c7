"""The cache directory as a place on disk: vetting it, claiming it, its
format file, its lock file (which processes use it), the defaults sized from
its filesystem, and the health of its LMDB index file.

Owns the rules for which directories modelfs may write into, checked before
anything is written (a refused ``--cache-dir /`` must leave ``/`` exactly as
it was), and the detection of a damaged index:

* a directory that does not exist is created (mode 0700);
* an existing directory is used only if it is empty or already a modelfs
  cache (it holds ``modelfs-cache.json``, or only files an interrupted first
  start leaves); its mode is changed only if modelfs created it or it is
  already a modelfs cache;
* a cache directory inside the mountpoint would make the daemon read its own
  mount (a deadlock): refused.

An index whose file is truncated below the pages its meta page names, or
whose meta pages are garbage, would crash any process that maps it (SIGBUS):
`index_damage` finds that by reading the file, without mapping it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import struct
from pathlib import Path

from ..config import (
    DEFAULT_MIN_FREE_CAP,
    DEFAULT_MIN_FREE_SHARE,
    MIN_DEFAULT_CACHE,
)
from ..errors import CacheError, CacheFormatError
from .payload import ofd_conflict, ofd_lock, ofd_lock_wait

CACHE_FORMAT = 1
FORMAT_FILE = "modelfs-cache.json"
# Bytes of the lock file: 0 is held shared by every process using the cache,
# 1 exclusively while one creates or checks the format and index.
_MEMBER_BYTE, _INIT_BYTE = 0, 1
# Left by a first start that stopped before writing the format file.
FIRST_START_LEFTOVERS = frozenset({"lock", "modelfs.log", FORMAT_FILE + ".tmp"})

# LMDB's data file: two meta pages at its start. Offsets inside a meta page
# (64-bit build): page header (16 bytes), then mm_magic u32, mm_version u32,
# mm_address u64, mm_mapsize u64, two MDB_db records of 48 bytes (the first
# one's md_pad holds the page size), mm_last_pg u64, mm_txnid u64.
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<16xII8x8xI44x48xQQ")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def vet(root: Path) -> bool:
    """Check, without writing anything, that `root` may be used as a cache
    directory; True if it is already a modelfs cache, False if it is absent
    or empty. Raises CacheError with one line naming the path otherwise."""
    try:
        st = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        # Some ancestor must be creatable: find the first existing one.
        parent = root.parent
        while not os.path.lexists(parent) and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise CacheError(
                f"cannot create cache directory {root}: {parent} is not a directory"
            ) from None
        return False
    except OSError as exc:
        raise CacheError(f"cannot use cache directory {root}: {_reason(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache directory {root} exists and is not a directory")
    try:
        names = set(os.listdir(root))
    except OSError as exc:
        raise CacheError(f"cannot use cache directory {root}: {_reason(exc)}") from None
    if FORMAT_FILE in names:
        refuse_links(root)
        return True
    if names - FIRST_START_LEFTOVERS:
        raise CacheError(
            f"cache directory {root} is not empty and is not a modelfs cache; "
            "use an empty or new directory"
        )
    return False


# The parts of a cache directory modelfs writes, truncates or deletes.
_OWN_PARTS = (
    "data",
    "index",
    "index/data.mdb",
    "index/lock.mdb",
    "lock",
    "modelfs.log",
    FORMAT_FILE,
)


def refuse_links(root: Path) -> None:
    """Refuse a cache directory whose parts are symbolic links (or
    ``data/<xx>`` entries that are): modelfs would write, truncate or delete
    through them, outside the cache. One CacheError naming the first link.
    The directory itself may be a link: that is the path the user gave."""
    found = [part for part in _OWN_PARTS if os.path.islink(root / part)]
    data = root / "data"
    if not found and data.is_dir():
        with os.scandir(data) as subs:
            for sub in subs:
                if sub.is_symlink():
                    found.append(f"data/{sub.name}")
                elif sub.is_dir(follow_symlinks=False):
                    with os.scandir(sub.path) as entries:
                        found += [f"data/{sub.name}/{e.name}" for e in entries if e.is_symlink()]
                if found:
                    break
    if found:
        raise CacheError(
            f"cache directory {root}: {found[0]} is a symbolic link; modelfs never writes "
            "through links inside its cache (to put the cache on another disk, give that "
            "disk's directory as --cache-dir)"
        )


def claim(root: Path) -> None:
    """Create `root` (mode 0700) after `vet` accepted it. An existing
    directory's mode is tightened only if it is a modelfs cache already."""
    is_cache = vet(root)
    if root.is_dir():
        if is_cache:
            try:
                os.chmod(root, 0o700)
            except OSError:
                pass  # a cache shared by a group may be set up by its owner
        return
    try:
        root.mkdir(mode=0o700, parents=True)
        os.chmod(root, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        vet(root)  # another process created it first: check what it made
    except OSError as exc:
        raise CacheError(f"cannot create cache directory {root}: {_reason(exc)}") from None


def refuse_inside(cache_root: Path, mountpoint: Path) -> None:
    """A cache or log under the mountpoint would be read through the mount
    it serves: the daemon would wait on itself."""
    cache = Path(os.path.realpath(cache_root))
    mnt = Path(os.path.realpath(mountpoint))
    if cache == mnt or mnt in cache.parents:
        raise CacheError(
            f"cache directory {cache} is inside the mountpoint {mnt}; use a directory outside it"
        )


def index_damage(index_dir: Path) -> str | None:
    """Why the LMDB index in `index_dir` cannot be opened safely, or None.

    Reads the two meta pages; the newer valid one names the last page in
    use, which must lie inside the file (LMDB maps it: a page past the end
    is SIGBUS, not an error)."""
    data = index_dir / "data.mdb"
    try:
        with open(data, "rb") as f:
            head = f.read(2 * 65536)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {data}: {_reason(exc)}"
    if size == 0:
        return None  # created, never written: LMDB initialises it
    metas = []
    if len(head) >= _META.size:
        magic, _, psize, last_pg, txnid = _META.unpack_from(head, 0)
        if magic == _LMDB_MAGIC and psize in (4096, 8192, 16384, 32768, 65536):
            metas.append((txnid, last_pg, psize))
            if len(head) >= psize + _META.size:
                magic2, _, _, last2, txn2 = _META.unpack_from(head, psize)
                if magic2 == _LMDB_MAGIC:
                    metas.append((txn2, last2, psize))
    if not metas:
        return "its header is not an LMDB header"
    _, last_pg, psize = max(metas)
    if (last_pg + 1) * psize > size:
        return f"it is truncated ({size} bytes, its pages need {(last_pg + 1) * psize})"
    return None


def check_format(root: Path) -> None:
    """Read the format file, or write it into a directory `vet`
    accepted as empty (checked again, under the init lock)."""
    fmt_path = root / FORMAT_FILE
    if fmt_path.exists():
        try:
            fmt = json.loads(fmt_path.read_text()).get("format")
        except (OSError, ValueError, AttributeError) as exc:
            raise CacheFormatError(f"cannot read {fmt_path}: {exc}") from None
        if fmt != CACHE_FORMAT:
            raise CacheFormatError(
                f"cache directory {root} has format {fmt!r}, this modelfs reads "
                f"format {CACHE_FORMAT}; use another --cache-dir or delete it"
            )
        return
    if any(p.name not in FIRST_START_LEFTOVERS for p in root.iterdir()):
        raise CacheFormatError(
            f"{root} is not empty and is not a modelfs cache; use another --cache-dir"
        )
    tmp = root / (FORMAT_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"format": CACHE_FORMAT}) + "\n")
    os.replace(tmp, fmt_path)


class Membership:
    """This process as one user of a cache directory, through its lock file:
    a shared lock on the member byte while the cache is open (so `alone`
    can tell whether other processes use the directory) and, during
    set-up, an exclusive lock on the init byte (one process at a time
    creates or checks the format file and the index)."""

    def __init__(self, root: Path) -> None:
        try:
            fd = os.open(
                root / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise CacheError(f"cannot open {root / 'lock'}: {exc.strerror}") from None
        try:
            ofd_lock_wait(fd, _INIT_BYTE, 1)
            ofd_lock(fd, _MEMBER_BYTE, 1, fcntl.F_RDLCK)
        except OSError as exc:
            os.close(fd)
            raise CacheError(f"cannot lock {root}: {exc.strerror}") from None
        self.fd = fd

    def set_up(self) -> None:
        """Set-up is over: other processes may open the cache."""
        try:
            ofd_lock(self.fd, _INIT_BYTE, 1, fcntl.F_UNLCK)
        except OSError:
            pass

    def alone(self) -> bool:
        """Whether no other process (or other open cache) uses the directory."""
        return not ofd_conflict(self.fd, _MEMBER_BYTE, 1)

    def close(self) -> None:
        os.close(self.fd)


def default_capacity(root: Path, used: int, min_free: int) -> int:
    """The cache's size when --cache-size is not given: what the filesystem
    holds for it (free space plus what it already holds) above `min_free`."""
    free = shutil.disk_usage(root).free
    return max(MIN_DEFAULT_CACHE, free + used - min_free)


def default_min_free(root: Path) -> int:
    return min(DEFAULT_MIN_FREE_CAP, int(shutil.disk_usage(root).total * DEFAULT_MIN_FREE_SHARE))


def free_bytes(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize
