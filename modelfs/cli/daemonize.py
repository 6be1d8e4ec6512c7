"""Starting the daemon: fork, detach, and wait on a pipe until the mount
answers or fails, so `modelfs mount` returns only with a usable mount or
one line saying why there is none (and nothing left mounted)."""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import prefork
from ..cache import directory as cache_dir
from ..config import MountConfig
from ..errors import ModelfsError, MountError
from ..humane import for_humans
from ..mounts import FSTYPE, find_mount, fusermount_unmount
from .logs import journal_stderr, setup_logging

if TYPE_CHECKING:
    from ..snapshot import Snapshot

log = logging.getLogger("modelfs")

STARTUP_TIMEOUT = 120.0


def start(cfg: MountConfig, snapshot: Snapshot | None) -> int:
    """Start the daemon (the one forked ahead, if there is one, else a
    fork now); return once the mount is ready."""
    handed = prefork.hand_over(cfg, snapshot)
    if handed is not None:
        pid, read_fd = handed
        return _wait(pid, read_fd, cfg.mountpoint)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os._exit(child(cfg, write_fd, snapshot))
    os.close(write_fd)
    return _wait(pid, read_fd, cfg.mountpoint)


def child(cfg: MountConfig, write_fd: int, snapshot: Snapshot | None) -> int:
    """The daemon: detach, serve, and report readiness on `write_fd`."""
    from ..daemon import serve

    os.setsid()
    # Descriptors the caller passed on (a deploy script's `flock 9`) would
    # stay held for the life of the mount: keep only stdio and the pipe.
    os.closerange(3, write_fd)
    os.closerange(write_fd + 1, 1 << 20)
    sent = False

    def notify(err: str | None) -> None:
        nonlocal sent
        if not sent:
            sent = True
            line = "OK\n" if err is None else "ERR " + err.replace("\n", " ") + "\n"
            os.write(write_fd, line.encode())
            os.close(write_fd)

    try:
        _detach_output(cfg)
        rc = serve(cfg, notify, snapshot=snapshot)
        notify("the daemon stopped before the mount was ready")
        return rc
    except ModelfsError as exc:
        log.error("%s", exc)
        notify(str(exc))
        return 1
    except BaseException as exc:  # a bug: keep the traceback in the log
        log.exception("daemon failed")
        notify(f"internal error: {type(exc).__name__}: {exc} (see the log)")
        return 1


def _detach_output(cfg: MountConfig) -> None:
    """stdio to /dev/null, logging to the log file; under systemd (a .mount
    unit, or mount(8) run by one) stderr is the journal: it is kept, and
    logged to, unless --log-file says otherwise."""
    to_journal = cfg.log_file is None and journal_stderr()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if to_journal else (0, 1, 2):
        os.dup2(devnull, fd)
    if to_journal:
        setup_logging(cfg.debug)
        return
    if cfg.log_file is None:
        cache_dir.claim(cfg.resolved_cache_dir)  # vetted: empty or a cache
    if cfg.log_file is not None:
        setup_logging(cfg.debug, path=cfg.log_file)
    else:
        setup_logging(cfg.debug, path=cfg.resolved_cache_dir / "modelfs.log", follow=False)


def _wait(pid: int, read_fd: int, mountpoint: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([read_fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            _cleanup_mount(mountpoint)
            raise MountError(f"the mount did not become ready within {STARTUP_TIMEOUT:.0f} s")
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        buf += chunk
    os.close(read_fd)
    line = buf.decode(errors="replace").strip()
    if line == "OK":
        return 0
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    _cleanup_mount(mountpoint)
    if line.startswith("ERR "):
        raise MountError(for_humans(line[4:]))
    raise MountError("the daemon exited during start-up; see its log")


def _cleanup_mount(mnt: Path) -> None:
    entry = find_mount(mnt)
    if entry is not None and entry.fstype == FSTYPE:
        try:
            fusermount_unmount(mnt, lazy=True)
        except MountError:
            pass
