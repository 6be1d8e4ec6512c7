"""Kernel mount table helpers: find a mount, check a mountpoint, unmount.

Shared by the CLI (``modelfs umount``), the daemon's start-up checks and the
test fixtures, so "is it mounted" has one answer everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MountError

FSTYPE = "fuse.modelfs"


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", for /sys/class/bdi


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def resolve(path: str | Path) -> str:
    """The path the kernel mounts on: absolute, symlinks resolved (a link to
    a mountpoint names that mountpoint)."""
    return os.path.realpath(path)


def find_mount(path: str | Path) -> MountEntry | None:
    """The mount whose mountpoint is exactly `path` (the last one if stacked)."""
    target = resolve(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            if _unescape(fields[4]) == target:
                found = MountEntry(target, rfields[0], _unescape(rfields[1]), fields[2])
    return found


def mount_root(path: str | Path) -> Path:
    """The modelfs mount that `path` is, or is inside of; MountError if none
    (``modelfs stats``, ``umount`` and ``warm`` take any path in a mount)."""
    p = Path(resolve(path))
    for candidate in (p, *p.parents):
        entry = find_mount(candidate)
        if entry is None:
            continue
        if entry.fstype == FSTYPE:
            return candidate
        if candidate == p:
            raise MountError(f"{p} is not a modelfs mount (it is {entry.fstype})")
        break
    raise MountError(f"{path} is not inside a modelfs mount")


def require_modelfs_mount(path: str | Path) -> MountEntry:
    """The modelfs mount at exactly `path`; MountError if there is none."""
    mnt = resolve(path)
    entry = find_mount(mnt)
    if entry is None:
        raise MountError(f"{mnt} is not mounted")
    if entry.fstype != FSTYPE:
        raise MountError(f"{mnt} is not a modelfs mount (it is {entry.fstype})")
    return entry


def _disconnected(mnt: Path) -> MountError:
    return MountError(
        f"{mnt} is a disconnected FUSE mount (its daemon died); unmount it first "
        f"(fusermount3 -uz {mnt})"
    )


def _is_disconnected(mnt: Path) -> bool:
    try:
        os.statvfs(mnt)  # never answered from the kernel's caches, unlike stat
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def clear_stale_mount(path: Path) -> bool:
    """Lazily unmount a modelfs mount whose daemon died; True if there was one.

    Such a mount answers "Transport endpoint is not connected" until it is
    removed. A dead mount of another filesystem is never touched.
    """
    mnt = Path(resolve(path))
    entry = find_mount(mnt)
    if entry is None or entry.fstype != FSTYPE or not _is_disconnected(mnt):
        return False
    fusermount_unmount(mnt, lazy=True)
    return True


def check_mountpoint(path: Path, *, nonempty: bool = False) -> Path:
    """Resolve and vet a mountpoint before anything is started. A directory
    with files in it is refused unless `nonempty`: the mount would hide them."""
    mnt = Path(resolve(path))
    if find_mount(mnt) is not None and _is_disconnected(mnt):
        raise _disconnected(mnt)
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mnt} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _disconnected(mnt) from None
        raise MountError(f"cannot use mountpoint {mnt}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mnt} is not a directory")
    if os.path.ismount(mnt) or find_mount(mnt) is not None:
        raise MountError(f"mountpoint {mnt} is busy: something is already mounted there")
    if not nonempty:
        try:
            has_files = any(os.scandir(mnt))
        except OSError as exc:
            raise MountError(f"cannot use mountpoint {mnt}: {exc.strerror}") from None
        if has_files:
            raise MountError(
                f"mountpoint {mnt} is not empty: the mount would hide its files "
                "(use --nonempty to mount over them)"
            )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is missing or not accessible; FUSE is required")
    if shutil.which("fusermount3") is None and os.geteuid() != 0:
        raise MountError("fusermount3 not found; install the fuse3 package")
    return mnt


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def fusermount_unmount(mnt: str | Path, lazy: bool = False) -> None:
    """Unmount with fusermount3 (falls back to umount(8) if it is missing)."""
    tool = shutil.which("fusermount3")
    if tool:
        cmd = [tool, "-uz" if lazy else "-u", str(mnt)]
    else:
        cmd = ["umount", "-l", str(mnt)] if lazy else ["umount", str(mnt)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        msg = detail[-1] if detail else f"exit status {proc.returncode}"
        if "busy" in msg.lower():
            msg += "; close the files using it, or use --lazy"
        raise MountError(f"cannot unmount {mnt}: {msg}")


def files_under(paths: list[Path]) -> Iterator[Path]:
    """Every file under each path (a file or a directory inside a modelfs
    mount), in name order; MountError for a path that is not in one."""
    for path in paths:
        if not path.exists():
            raise MountError(f"{path} does not exist")
        mount_root(path)
        if path.is_file():
            yield path
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                yield Path(dirpath) / name


def read_stats(mnt: Path) -> dict[str, Any]:
    """The counters a running mount serves (the root's user.modelfs.stats
    xattr), from the mountpoint or any path inside the mount."""
    mnt = mount_root(mnt)  # the mountpoint, or any path inside the mount
    try:
        return dict(json.loads(os.getxattr(mnt, "user.modelfs.stats")))
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"{mnt} is a dead mount (its daemon is gone)") from None
        raise MountError(f"cannot read the counters of {mnt}: {exc.strerror}") from None
