"""The cache directory as a place on disk: vetting it, claiming it, and the
health of its LMDB index file.

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

import os
import stat
import struct
from pathlib import Path

from .errors import CacheError

FORMAT_FILE = "modelfs-cache.json"
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
        return True
    if names - FIRST_START_LEFTOVERS:
        raise CacheError(
            f"cache directory {root} is not empty and is not a modelfs cache; "
            "use an empty or new directory"
        )
    return False


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
