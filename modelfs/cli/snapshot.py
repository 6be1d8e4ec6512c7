"""``modelfs snapshot``: write a manifest, or compare one with the bucket."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ModelfsError
from . import render
from .logs import setup_logging
from .options import SNAPSHOT_GROUPS, UsageError, add_options


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sn = sub.add_parser(
        "snapshot",
        help="write the manifest of s3://BUCKET[/PREFIX]: every object's version, now",
        description="Write a manifest of every object under s3://BUCKET[/PREFIX] (key, size, "
        "ETag, VersionId where the bucket keeps versions) as JSON, for 'modelfs mount "
        "--manifest' and 'modelfs pull --manifest'. With --check, compare a manifest "
        "with the bucket now instead: exit 0 if every key is still at its version, 1 "
        "(listing the differences) if not.",
    )
    sn.add_argument("source", nargs="?", help="s3://BUCKET[/PREFIX]")
    sn.add_argument(
        "--output", "-o", type=Path, metavar="FILE", help="write here (atomically), not to stdout"
    )
    sn.add_argument(
        "--check", metavar="PATH|s3://BUCKET/KEY", help="compare this manifest with the bucket now"
    )
    sn.add_argument("--json", action="store_true", help="with --check: the differences as JSON")
    add_options(sn, SNAPSHOT_GROUPS)
    sn.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import snapshot
    from ..s3.origin import S3Store
    from . import sources

    cfg = sources.resolve(args, None)
    setup_logging(cfg.debug)
    if args.check:
        cfg.manifest = args.check
        pinned = sources.with_manifest(cfg, named_source=args.source is not None)
        assert pinned is not None
        store = S3Store(cfg.origin_settings(pool=1), cfg.source.bucket)
        store.probe(cfg.source.prefix)
        diffs = snapshot.differences(pinned, snapshot.take(store, cfg.source))
        diffs = snapshot.with_readability(diffs, store.has_version)
        return render.snapshot_check(pinned, diffs, args.json)
    if args.json:
        raise UsageError("--json goes with --check; a manifest is JSON already")
    if args.source is None:
        raise UsageError("the following arguments are required: s3://BUCKET[/PREFIX]")
    store = S3Store(cfg.origin_settings(pool=1), cfg.source.bucket)
    store.probe(cfg.source.prefix, allow_empty=False)
    snap = snapshot.take(store, cfg.source)
    try:
        snapshot.write(snap, args.output)
    except OSError as exc:
        raise ModelfsError(f"cannot write {args.output}: {exc.strerror}") from None
    render.snapshot_taken(snap)
    return 0
