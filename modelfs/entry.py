"""The console scripts, ``modelfs`` and ``mount.modelfs`` (and ``python -m
modelfs``): for a mount, the start-up readahead (`modelfs.readahead`) and
the daemon forked ahead (`modelfs.prefork`) start before the command line
is imported; then the command line runs."""

from __future__ import annotations

import sys

from . import prefork, readahead


def main() -> int:
    if readahead.wanted(sys.argv[1:]):
        readahead.start()
        if prefork.wanted(sys.argv[1:]):
            prefork.start()
    from .cli import main as cli_main

    return cli_main()


def mount_helper() -> int:
    readahead.start()
    if prefork.wanted(sys.argv[1:]):
        prefork.start()
    from .cli import mount_helper as cli_mount_helper

    return cli_mount_helper()
