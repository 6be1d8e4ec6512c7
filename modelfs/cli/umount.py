"""``modelfs umount PATH``: unmount, and wait for the daemon to finish."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..mounts import fusermount_unmount, mount_root, process_alive, require_modelfs_mount

# Seconds the daemon gets to store what it fetched and exit.
UMOUNT_WAIT = 30.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    u = sub.add_parser("umount", aliases=["unmount"], help="unmount a modelfs mount")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--lazy", "-z", action="store_true", help="detach even if files are open")
    u.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    mnt = mount_root(args.mountpoint)  # the mountpoint, or any path inside the mount
    require_modelfs_mount(mnt)
    pid = None
    try:
        pid = int(os.getxattr(mnt, "user.modelfs.pid"))
    except (OSError, ValueError):
        pass  # a dead daemon: unmounting is all that is left to do
    fusermount_unmount(mnt, lazy=args.lazy)
    if pid is not None:
        deadline = time.monotonic() + UMOUNT_WAIT
        while time.monotonic() < deadline and process_alive(pid):
            time.sleep(0.05)
    return 0
