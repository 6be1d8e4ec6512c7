"""The argument parser, assembled from each command's module, and the
mount(8) forms rewritten into ordinary ``modelfs mount`` arguments."""

from __future__ import annotations

import argparse
from typing import NoReturn

from ..humane import for_humans
from ..mountopts import expand_o
from . import cache, mount, pull, snapshot, stats, umount, warm
from .options import mount_option_names

COMMANDS = ("mount", "umount", "unmount", "stats", "cache", "pull", "warm", "snapshot")


class Parser(argparse.ArgumentParser):
    """One line per usage error, like every other error of modelfs, instead
    of argparse's usage block; --help still shows everything."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"modelfs: error: {for_humans(message)} (see '{self.prog} --help')\n")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelfs")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> Parser:
    p = Parser(
        prog="modelfs",
        description="Mount an S3-compatible bucket read-only, with a persistent chunk cache.",
    )
    p.add_argument("--version", action="version", version=f"modelfs {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (mount, umount, pull, warm, snapshot, stats, cache):
        command.add_parser(sub)
    return p


def normalize_argv(argv: list[str]) -> list[str]:
    """``SOURCE MNT -o OPTS`` -> ``mount SOURCE MNT --opt value ...``."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["mount", *argv]
    if argv and argv[0] == "mount":
        argv = ["mount", *expand_o(argv[1:], *mount_option_names())]
    return argv
