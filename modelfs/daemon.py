"""Mount lifecycle: build the layers, mount, serve, and always unmount.

`serve` runs in the daemon process (or in the foreground). It reports
readiness through `notify` only after the mounted filesystem has answered a
stat of its own root, so `modelfs mount` returns when the mount is usable.
Whatever fails before that is reported through `notify` as one line, and the
kernel mount, if it was made, is removed before the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import assemble
from .cache import ChunkCache
from .config import INDEFINITE, MountConfig, parse_addr
from .errors import MountError
from .fs import Operations
from .kernel import tune_mount
from .mounts import FSTYPE, check_mountpoint
from .namespace import Namespace
from .prefetch import OpenPrefetch, ReadAhead
from .preload import Preload
from .process import raise_fd_limit, tune_malloc
from .report import MountInfo, MountReport
from .s3.origin import S3Store
from .sdnotify import notify as sd_notify
from .snapshot import Pins, Snapshot
from .snapshot import take as take_snapshot
from .stats import StatsSource
from .store import ObjectStore
from .tier import SharedTier

log = logging.getLogger(__name__)

Notify = Callable[[str | None], None]

# Signals whose default action would kill the daemon mid-serve; ignored.
# (SIGTERM, SIGINT and SIGHUP unmount cleanly: `_stop_on_signal`.)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGALRM)
# Seconds requests in progress get to finish after a stop signal.
SHUTDOWN_GRACE = 2.0
# Seconds fetched chunks get to reach the disk at unmount.
SETTLE_TIMEOUT = 5.0


def fuse_options(cfg: MountConfig) -> set[str]:
    source = str(cfg.source)
    opts = {
        "ro",
        "default_permissions",
        f"subtype={FSTYPE.split('.', 1)[1]}",
        # libfuse takes ASCII only, and a comma would split the option
        # string: anything else is percent-encoded (s3://b/%D0%BC...).
        f"fsname={urllib.parse.quote(source, safe='/:@')}",
    }
    if cfg.allow_other:
        opts.add("allow_other")
    return opts


def build_store(cfg: MountConfig) -> ObjectStore:
    return S3Store(cfg.origin_settings(), cfg.source.bucket)


def serve(
    cfg: MountConfig,
    notify: Notify,
    store: ObjectStore | None = None,
    snapshot: Snapshot | None = None,
) -> int:
    """Mount and serve until unmounted. `snapshot` is a manifest already
    read; with --snapshot and none, the prefix is snapshotted here."""
    tune_malloc()
    raise_fd_limit()
    # Their default action ends the process and leaves a dead mount; a
    # stray `kill -USR1` (log-rotation scripts send it) must not.
    for stray in IGNORED_SIGNALS:
        signal.signal(stray, signal.SIG_IGN)
    mnt = check_mountpoint(cfg.mountpoint, nonempty=cfg.nonempty)
    store = store or build_store(cfg)
    # A manifest's objects may all be gone from the listing, and a versioned
    # bucket still serves them: then only access is probed.
    first_level = store.probe(
        cfg.source.prefix, allow_empty=cfg.allow_empty or snapshot is not None
    )
    pins = _pins(cfg, store, snapshot)
    ttl = INDEFINITE if pins is not None else cfg.metadata_ttl
    cache, tier = assemble.chunk_cache(cfg, store)
    metrics_server = None
    try:
        ns = Namespace(
            store,
            cfg.source.prefix,
            ttl,
            lister=pins.snapshot.list_dir if pins is not None else None,
        )
        if first_level is not None and pins is None:
            ns.seed(first_level)
        spawn = _Spawner()
        readahead = ReadAhead(
            cache,
            spawn,
            max_chunks_in_flight=max(1, cfg.fetch_concurrency - 2),
            initial_window=2 * cfg.chunk_size,
            # No further ahead than a quarter of memory (prefetch on open
            # takes another quarter): a chunk read ahead and dropped from
            # memory before its reader gets there is read twice.
            max_window=min(cfg.prefetch_window, max(cfg.chunk_size, cfg.memory_cache // 4)),
        )
        open_prefetch = OpenPrefetch(
            cache,
            spawn,
            cfg.prefetch_on_open,
            # Half the fetch slots at most per file, so one big shard does
            # not starve the others; demand reads are served first anyway.
            concurrency=max(1, cfg.fetch_concurrency // 2),
        )
        preload = (
            Preload(
                ns, cache, open_prefetch, chunk_size=cfg.chunk_size, patterns=cfg.prefetch_on_open
            )
            if cfg.preload and cfg.prefetch_on_open
            else None
        )
        report = MountReport(
            store,
            cache,
            info=MountInfo(str(cfg.source), str(mnt), str(cache.root), os.getpid(), time.time()),
            tier=tier,
            pins=pins,
            readahead=readahead,
            open_prefetch=open_prefetch,
            preload=preload,
        )
        ops = Operations(
            ns,
            cache,
            chunk_size=cfg.chunk_size,
            uid=os.getuid() if cfg.uid is None else cfg.uid,
            gid=os.getgid() if cfg.gid is None else cfg.gid,
            ttl=ttl,
            file_mode=cfg.file_mode,
            dir_mode=cfg.dir_mode,
            pins=pins,
            readahead=readahead,
            open_prefetch=open_prefetch,
            report=report,
        )
        if cfg.metrics_addr:
            metrics_server = _start_metrics(cfg.metrics_addr, ops.stats)
        try:
            pyfuse3.init(ops, str(mnt), fuse_options(cfg))
        except RuntimeError as exc:
            raise MountError(f"the kernel refused to mount {mnt}: {exc}") from None
        try:
            trio.run(_main, spawn, report, cache, tier, preload, cfg, mnt, notify)
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mnt)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        cache.close()
    return 0


def _pins(cfg: MountConfig, store: ObjectStore, snap: Snapshot | None) -> Pins | None:
    """A snapshot mount's pins: the manifest's, or a snapshot taken now."""
    if snap is None and not cfg.snapshot:
        return None
    if snap is None:
        snap = take_snapshot(store, cfg.source)
    log.info(
        "serving the snapshot of %s taken %s%s: %d objects, pinned by ETag%s",
        snap.source,
        snap.taken,
        f" (manifest {cfg.manifest})" if cfg.manifest else "",
        len(snap.objects),
        " and VersionId" if snap.versioned else "",
    )
    return Pins(snap, store, manifest=cfg.manifest)


class _Spawner:
    """`start_soon` of the daemon's nursery, for the objects built before it
    opens (read-ahead, prefetch on open): bound in `_main` before any FUSE
    request is served."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None

    def __call__(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self.nursery is not None, "a request was served before the nursery opened"
        self.nursery.start_soon(fn, *args)


def _start_metrics(addr: str, stats: StatsSource) -> Any:
    # Imported here: prometheus-client is 17 ms of every mount's start, and
    # most mounts export no metrics.
    from prometheus_client import start_http_server

    from .metrics import make_registry

    host, port = parse_addr(addr)
    try:
        server, _ = start_http_server(port, host, registry=make_registry(stats))
    except OSError as exc:
        raise MountError(f"cannot serve metrics on {addr}: {exc.strerror}") from None
    log.info("metrics at http://%s/metrics", addr)
    return server


async def _main(
    spawn: _Spawner,
    report: MountReport,
    cache: ChunkCache,
    tier: SharedTier | None,
    preload: Preload | None,
    cfg: MountConfig,
    mnt: Path,
    notify: Notify,
) -> None:
    async with trio.open_nursery() as nursery:
        spawn.nursery = nursery
        nursery.start_soon(cache.run_background)
        nursery.start_soon(_sample_rates, report)
        serving = trio.CancelScope()
        nursery.start_soon(_stop_on_signal, serving)
        nursery.start_soon(_announce_ready, mnt, cfg, notify, preload)
        with serving:
            await pyfuse3.main()
        # Chunks served before their payload write finished: a few seconds
        # to store them, so a remount does not fetch them again.
        await cache.settle(SETTLE_TIMEOUT)
        if tier is not None:
            # Chunks other nodes may wait for: a few seconds to send them.
            with trio.move_on_after(10):
                await tier.drain()
        nursery.cancel_scope.cancel()


async def _sample_rates(report: MountReport) -> None:
    while True:
        report.sample()
        await trio.sleep(1.0)


async def _stop_on_signal(serving: trio.CancelScope) -> None:
    """Stop on SIGTERM/SIGINT/SIGHUP. pyfuse3.main() returns only once every
    request in progress is answered, and a read may wait on a GET that stalls
    for the whole --retry-timeout: after SHUTDOWN_GRACE the requests still
    running are cancelled (their GET threads are abandoned, their readers get
    an error when the mount goes), so systemd's stop timeout is never hit."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            pyfuse3.terminate()
            break
    await trio.sleep(SHUTDOWN_GRACE)
    if not serving.cancel_called:
        log.info("cancelling the requests still in progress")
        serving.cancel()


async def _announce_ready(
    mnt: Path, cfg: MountConfig, notify: Notify, preload: Preload | None
) -> None:
    try:
        await trio.to_thread.run_sync(os.stat, mnt)
    except OSError as exc:
        notify(f"the mount at {mnt} does not answer: {exc.strerror}")
        pyfuse3.terminate()
        return
    tuned = tune_mount(mnt)
    log.info("serving on %s (kernel settings: %s)", mnt, tuned or "defaults")
    notify(None)
    # MAINPID: with a forking `modelfs mount` the daemon is not the process
    # systemd started; with --foreground it is, and the line is harmless.
    sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {cfg.source} on {mnt}")
    if preload is not None:
        # Right after the mount answers: the download runs while the model
        # server starts, behind every read it makes.
        await preload.run()
