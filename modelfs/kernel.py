"""Kernel-side tuning of a FUSE mount: read-ahead size and background requests.

By default the kernel reads ahead 128 KiB on a FUSE mount and so sends
128 KiB requests; a larger ``read_ahead_kb`` on the mount's bdi makes it send
1 MiB requests and keep several in flight, which cuts the per-request cost
of a sequential reader by ~8x. ``max_background`` bounds those in-flight
asynchronous requests (the default, 12, is too small for deep read-ahead).

Both are best-effort: without root, or without sysfs/fusectl, the mount
still works with the kernel defaults and a debug line says so.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from .mounts import find_mount

log = logging.getLogger(__name__)

FUSECTL = Path("/sys/fs/fuse/connections")


def _write(path: Path, value: int) -> bool:
    try:
        path.write_text(f"{value}\n")
        return True
    except OSError as exc:
        log.debug("cannot set %s: %s", path, exc.strerror)
        return False


# What modelfs asks of the kernel for every mount: 16 MiB of read-ahead
# (measured in docs/architecture.md, "Kernel settings") and 64 background
# requests in flight.
READ_AHEAD_KB = 16384
MAX_BACKGROUND = 64


def tune_mount(
    mnt: Path, read_ahead_kb: int = READ_AHEAD_KB, max_background: int = MAX_BACKGROUND
) -> dict[str, int]:
    """Apply the settings; returns those that took effect."""
    entry = find_mount(mnt)
    if entry is None:
        return {}
    done: dict[str, int] = {}
    if read_ahead_kb > 0 and _write(
        Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb"), read_ahead_kb
    ):
        done["read_ahead_kb"] = read_ahead_kb
    if max_background > 0:
        if os.geteuid() == 0 and FUSECTL.is_dir() and not any(FUSECTL.iterdir()):
            # fusectl is usually mounted by systemd; in containers it often is not.
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True)
        minor = entry.device.split(":")[1]
        conn = FUSECTL / minor
        if conn.is_dir():
            if _write(conn / "max_background", max_background):
                done["max_background"] = max_background
            _write(conn / "congestion_threshold", max(1, max_background * 3 // 4))
    return done
