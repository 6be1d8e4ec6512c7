"""The console scripts, ``modelfs`` and ``mount.modelfs`` (and ``python -m
modelfs``): for a mount, the start-up readahead (`modelfs.readahead`) and
the daemon forked ahead (`modelfs.prefork`) start before the command line
is imported; then the command line runs."""

from __future__ import annotations

import os
import sys
from typing import Any

from . import prefork, readahead


def main() -> int:
    detaching = _start_ahead(readahead.wanted(sys.argv[1:]))
    from .cli import main as cli_main

    return _done(cli_main(), detaching)


def mount_helper() -> int:
    detaching = _start_ahead(True)
    from .cli import mount_helper as cli_mount_helper

    return _done(cli_mount_helper(), detaching)


def _start_ahead(mounting: bool) -> bool:
    """For a mount, the readahead and (unless in the foreground) the seed;
    whether this process will hand the mount to a daemon and be done."""
    if not mounting:
        return False
    readahead.start()
    detaching = prefork.wanted(sys.argv[1:])
    if detaching:
        prefork.start(_serve)
    return detaching


def _serve(cfg: Any, ready_fd: int, snapshot: Any) -> int:
    """The daemon forked ahead, once it has its configuration."""
    from .cli import daemonize

    return daemonize.child(cfg, ready_fd, snapshot)


def _done(rc: int, detaching: bool) -> int:
    """A mount that the daemon now serves leaves this process nothing to
    do: it exits at once, without the interpreter's teardown (freeing the
    command line's modules took 40 ms, between the daemon's readiness and
    `modelfs mount` returning)."""
    if rc == 0 and detaching:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return rc
