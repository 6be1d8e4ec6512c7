"""``modelfs mount`` (and ``modelfs SOURCE DIR -o OPTS``, mount(8)'s form)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import MountConfig
from ..mounts import check_mountpoint, clear_stale_mount
from . import render
from .logs import setup_logging
from .options import MOUNT_GROUPS, add_options

if TYPE_CHECKING:
    from ..snapshot import Snapshot

log = logging.getLogger("modelfs")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser(
        "mount",
        help="mount s3://BUCKET[/PREFIX] on a directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="In /etc/fstab (or with mount -t fuse.modelfs), every option is written\n"
        "-o key=value with dashes as underscores, flags as bare words:\n"
        "  s3://models/llama /mnt/llama fuse.modelfs "
        "_netdev,endpoint_url=http://10.0.0.5:9000,cache_size=200G,allow_other 0 0",
    )
    m.add_argument(
        "source", nargs="?", help="s3://BUCKET[/PREFIX] (may be left out with --manifest)"
    )
    m.add_argument("mountpoint", nargs="?", type=Path)
    add_options(m, MOUNT_GROUPS)
    m.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from . import sources

    cfg = sources.resolve(args, "mountpoint", "mountpoint")
    snap = sources.with_manifest(cfg, named_source=args.source is not None)
    return mount(cfg, snap)


def mount(cfg: MountConfig, snap: Snapshot | None = None) -> int:
    from .. import prefork
    from ..cache import directory as cache_dir
    from . import daemonize

    # A dead modelfs mount left by a crashed daemon is cleared, so that
    # mounting again is all the recovery it takes.
    if clear_stale_mount(cfg.mountpoint):
        render.notice(f"removed the disconnected mount a dead daemon left on {cfg.mountpoint}")
    # Fail before forking, and before writing anything, on obvious mistakes.
    cfg.mountpoint = check_mountpoint(cfg.mountpoint, nonempty=cfg.nonempty)
    cache_root = cfg.resolved_cache_dir
    cache_dir.refuse_inside(cache_root, cfg.mountpoint)
    cache_dir.vet(cache_root)
    if cfg.log_file is not None:
        cfg.log_file = cfg.log_file.absolute()
        cache_dir.refuse_inside(cfg.log_file.parent, cfg.mountpoint)
    if cfg.foreground:
        from ..daemon import serve

        prefork.discard()  # this process serves
        setup_logging(cfg.debug)

        def notify(err: str | None) -> None:
            if err:
                log.error("%s", err)

        return serve(cfg, notify, snapshot=snap)
    return daemonize.start(cfg, snap)
