"""``modelfs cache ls|du|verify|gc|clear|pin|unpin``: a cache directory,
mounted or not (the work is in `modelfs.cache_admin`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import default_cache_dir, parse_size
from ..errors import CacheError
from ..progress import byte_bar
from . import render
from .options import argparse_type

ACTIONS = {
    "ls": "cached objects: key, ETag, cached bytes of the size, last access",
    "du": "space used by the cache",
    "verify": "check every cached chunk against its checksum",
    "gc": "evict least-recently-used chunks down to SIZE",
    "clear": "evict everything not being read",
    "pin": "never evict the files under PATH (inside a mount) from its cache",
    "unpin": "let the files under PATH be evicted again",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("cache", help="inspect or trim a cache directory (mounted or not)")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for name, text in ACTIONS.items():
        a = csub.add_parser(name, help=text, description=text)
        a.add_argument(
            "--cache-dir",
            type=Path,
            help="default: $XDG_CACHE_HOME/modelfs, /var/cache/modelfs for root",
        )
        if name in ("ls", "du", "verify"):
            a.add_argument("--json", action="store_true", help="print JSON, for scripts")
        if name == "verify":
            a.add_argument("--repair", action="store_true", help="drop the corrupt chunks")
        if name == "gc":
            a.add_argument(
                "size",
                type=argparse_type(lambda t: parse_size(t, "SIZE")),
                metavar="SIZE",
                help="e.g. 10G",
            )
        if name in ("pin", "unpin"):
            a.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    c.set_defaults(run=run)


def _root(args: argparse.Namespace) -> Path:
    root = (args.cache_dir or default_cache_dir()).absolute()
    if not root.is_dir():
        raise CacheError(f"cache directory {root} does not exist")
    return root


def run(args: argparse.Namespace) -> int:
    from .. import cache_admin

    action = args.cache_command
    if action in ("pin", "unpin"):
        render.cache_pins(cache_admin.pin_paths(args.paths, action == "pin"), action == "pin")
        return 0
    root = _root(args)
    if action == "ls":
        render.cache_ls(cache_admin.ls(root), args.json)
        return 0
    if action == "du":
        render.cache_du(root, cache_admin.du(root), args.json)
        return 0
    if action == "verify":
        return _verify(root, args.repair, args.json)
    chunks, nbytes = cache_admin.gc(root, args.size if action == "gc" else 0)
    render.cache_evicted(chunks, nbytes, cache_admin.du(root).used_bytes)
    return 0


def _verify(root: Path, repair: bool, as_json: bool) -> int:
    from .. import cache_admin

    if as_json:
        checked, bad = cache_admin.verify(root)
    else:
        with byte_bar("verify", cache_admin.du(root).used_bytes) as bar:
            checked, bad = cache_admin.verify(root, bar.update)
    corrupt = cache_admin.describe(root, bad)
    repaired = bool(bad) and repair
    if repaired:
        cache_admin.repair(root, bad)
    return render.cache_verify(checked, corrupt, repaired, as_json)
