"""What a command works on: its source (``s3://BUCKET/PREFIX``, or the one
its manifest names) and place (mountpoint or directory), turned with its
options into a `MountConfig`; and the manifest, read and vetted before
anything is forked or written."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import snapshot
from ..config import MountConfig, parse_s3_url
from ..errors import ConfigError
from ..s3.origin import S3Store
from ..snapshot import Snapshot
from .options import UsageError, config_from_args


def resolve(args: argparse.Namespace, place: str | None, metavar: str = "") -> MountConfig:
    """The MountConfig of `args`. `place` names the positional after the
    source (None for commands without one). With --manifest the source may
    be left out (`mount --manifest M MNT`); until the manifest is read
    (`with_manifest`) a stand-in takes its place."""
    if place is not None:
        _fix_positionals(args, place, metavar)
    manifest = getattr(args, "manifest", None) or getattr(args, "check", None)
    try:
        source = parse_s3_url(args.source or _stand_in(manifest))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    where = getattr(args, place) if place is not None else Path(".")
    return config_from_args(args, source, where)


def _stand_in(manifest: str | None) -> str:
    # The bucket holding an s3:// manifest, else any valid name: replaced by
    # the manifest's own source once it is read.
    if manifest and manifest.startswith("s3://"):
        return f"s3://{parse_s3_url(manifest).bucket}"
    return "s3://manifest"


def _fix_positionals(args: argparse.Namespace, place: str, metavar: str) -> None:
    """With a manifest the source may be left out, and the one positional
    given is then the place."""
    if getattr(args, place) is None:
        if args.source is None or not getattr(args, "manifest", None):
            raise UsageError(f"the following arguments are required: {metavar}")
        setattr(args, place, Path(args.source))
        args.source = None
    if args.source is None and not getattr(args, "manifest", None):
        raise UsageError("the following arguments are required: s3://BUCKET[/PREFIX]")


def with_manifest(cfg: MountConfig, named_source: bool) -> Snapshot | None:
    """The snapshot of --manifest, vetted against the source named (if one
    was), which then becomes the manifest's own; None without --manifest."""
    if not cfg.manifest:
        return None
    ref = cfg.manifest
    if not ref.startswith("s3://"):
        ref = cfg.manifest = str(Path(ref).absolute())

    def fetch(bucket: str, key: str) -> bytes:
        store = S3Store(cfg.origin_settings(pool=1), cfg.source.bucket)
        return store.read_document(bucket, key, snapshot.MAX_MANIFEST)

    snap = snapshot.load(ref, fetch)
    snapshot.fit(snap, cfg.source if named_source else None, ref, cfg.allow_empty)
    cfg.source = snap.source
    cfg.snapshot = True
    cfg.validate()
    return snap
