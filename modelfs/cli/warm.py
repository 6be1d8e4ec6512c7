"""``modelfs warm PATH...``: fetch files inside a mount into its cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import warm as warming
from ..progress import files_progress
from . import render


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser(
        "warm",
        help="fetch files inside a mount into its cache",
        description="Fetch everything under each PATH (a file or directory inside a modelfs "
        "mount) into the mount's cache. Files already cached are skipped.",
    )
    w.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    w.add_argument("--jobs", "-j", type=int, default=8, help="reads in parallel (default 8)")
    w.add_argument(
        "--check",
        action="store_true",
        help="read nothing; exit 0 only if everything under PATH is fully cached "
        "(a readiness probe)",
    )
    w.add_argument("--json", action="store_true", help="print the result as JSON, for scripts")
    w.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.check:
        # Kubernetes readiness and startup probes run this.
        return render.warm_check(warming.check(args.paths), args.json)
    with files_progress("warm") as progress:
        result = warming.warm(args.paths, args.jobs, progress)
    return render.warm(result, args.json)
