"""``modelfs pull s3://BUCKET/PREFIX DIR``: a local copy through the chunk cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..progress import files_progress
from . import render
from .logs import setup_logging
from .options import PULL_GROUPS, add_options


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pl = sub.add_parser(
        "pull",
        help="copy s3://BUCKET[/PREFIX] into a local directory, through the chunk cache",
        description="Copy s3://BUCKET[/PREFIX] into DIR (for hosts without FUSE). Files are "
        "written atomically; a file whose size and ETag match is skipped; AIBrix-style "
        "metadata files (DIR/.cache/s3/download/*.metadata) are read and written.",
    )
    pl.add_argument(
        "source", nargs="?", help="s3://BUCKET[/PREFIX] (may be left out with --manifest)"
    )
    pl.add_argument("dest", nargs="?", type=Path, metavar="DIR")
    pl.add_argument("--json", action="store_true", help="print the result as JSON, for scripts")
    pl.add_argument(
        "--manifest",
        metavar="PATH|s3://BUCKET/KEY",
        help="copy exactly the object versions of this manifest (from 'modelfs snapshot')",
    )
    pl.add_argument("--force", action="store_true", help="copy every file, even if up to date")
    add_options(pl, PULL_GROUPS)
    pl.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import pull as pulling
    from . import sources

    cfg = sources.resolve(args, "dest", "DIR")
    snap = sources.with_manifest(cfg, named_source=args.source is not None)
    setup_logging(cfg.debug)
    with files_progress("pull") as progress:
        result = pulling.pull(cfg, args.dest, force=args.force, progress=progress, snapshot=snap)
    return render.pull(result, args.json)
