"""Command line: ``modelfs COMMAND ...``, the mount(8) forms, ``mount.modelfs``.

One module per command (`mount`, `umount`, `pull`, `warm`, `snapshot`,
`stats`, `cache`), each owning its parser and what it runs; `options` is the
one table of options, `parser` assembles them, `sources` turns arguments
(and a manifest) into a `MountConfig`, `daemonize` forks the daemon and
waits for its mount, `logs` sets up logging, and `render` is everything the
commands print. Every user error ends as one line on stderr, ``modelfs:
error: ...``, and a non-zero status; a traceback reaches the user only from
a bug, and then goes to the log too.
"""

from __future__ import annotations

import argparse
import sys

from ..config import MountConfig
from ..errors import ConfigError, ModelfsError
from ..mountopts import helper_argv
from . import render
from .options import UsageError
from .parser import build_parser, normalize_argv

__all__ = ["build_parser", "config_from_args", "main", "mount_helper", "normalize_argv"]


def config_from_args(args: argparse.Namespace) -> MountConfig:
    """The MountConfig of parsed ``modelfs mount`` arguments (the manifest,
    if any, not read yet)."""
    from . import sources

    return sources.resolve(args, "mountpoint", "mountpoint")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        parser.error(str(exc))
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except UsageError as exc:
        parser.error(str(exc))
    except ModelfsError as exc:
        render.error(str(exc))
        return 1
    except KeyboardInterrupt:
        return _interrupted()
    except BaseExceptionGroup as group:
        # Ctrl-C inside a trio nursery (pull) arrives wrapped in a group.
        _, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            raise
        return _interrupted()


def _interrupted() -> int:
    render.notice("interrupted; what was fetched stays in the cache")
    return 130


def mount_helper(argv: list[str] | None = None) -> int:
    """``mount.modelfs``: the helper mount(8) runs for fstab type ``modelfs``."""
    try:
        args, fake = helper_argv(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"mount.modelfs: error: {exc}", file=sys.stderr)
        return 1
    if fake:
        return 0
    return main(["mount", *args])
