"""Command line: ``modelfs mount`` and ``modelfs umount``, and the mount(8) forms.

Owns argument parsing, logging set-up and daemonisation. ``modelfs SOURCE
MOUNTPOINT -o OPTIONS`` (how mount.fuse3 calls us for fstab type
``fuse.modelfs``) and the ``mount.modelfs`` helper (type ``modelfs``) are
rewritten into ``modelfs mount`` by `modelfs.mountopts`. Every user error
ends as one line on stderr, ``modelfs: error: ...``, and a non-zero status;
a traceback reaches the user only from a bug, and then goes to the log too.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .cache import directory as cache_dir
from .config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    DEFAULT_MEMORY_CACHE,
    DEFAULT_METADATA_TTL,
    DEFAULT_PREFETCH_ON_OPEN,
    DEFAULT_PREFETCH_WINDOW,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETRY_TIMEOUT,
    MountConfig,
    format_size,
    parse_mode,
    parse_patterns,
    parse_s3_url,
    parse_size,
    parse_ttl,
)
from .errors import ConfigError, ModelfsError, MountError
from .humane import HumaneFormatter, for_humans
from .mountopts import expand_o, helper_argv
from .mounts import (
    FSTYPE,
    check_mountpoint,
    clear_stale_mount,
    find_mount,
    fusermount_unmount,
    mount_root,
    process_alive,
    require_modelfs_mount,
)

if TYPE_CHECKING:
    from .snapshot import Snapshot

log = logging.getLogger("modelfs")

STARTUP_TIMEOUT = 120.0
UMOUNT_WAIT = 30.0


def _size(what: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            return parse_size(text, what)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _ttl(text: str) -> float:
    try:
        return parse_ttl(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelfs")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_origin_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that talks to the bucket."""
    p.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:9000")
    p.add_argument("--region")
    p.add_argument("--profile", help="profile from the shared AWS config")
    p.add_argument(
        "--credentials-file",
        type=Path,
        help="AWS shared-credentials file to read instead of ~/.aws/credentials",
    )
    p.add_argument("--addressing-style", choices=("auto", "path", "virtual"), default="auto")
    p.add_argument(
        "--no-sign-request",
        action="store_true",
        help="send anonymous requests to the origin (a public bucket); no credentials needed",
    )
    for name, default, text in (
        ("connect-timeout", DEFAULT_CONNECT_TIMEOUT, "TCP connect timeout of a GET"),
        ("read-timeout", DEFAULT_READ_TIMEOUT, "longest wait for the next bytes of a GET"),
        ("retry-timeout", DEFAULT_RETRY_TIMEOUT, "time all retries of one GET may take; then EIO"),
    ):
        p.add_argument(
            f"--{name}",
            type=float,
            default=default,
            metavar="SECONDS",
            help=f"{text} (default {default:g})",
        )


def _add_origin_and_cache_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that reads the bucket through a chunk cache."""
    _add_origin_options(p)
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="default: $XDG_CACHE_HOME/modelfs, /var/cache/modelfs for root",
    )
    p.add_argument(
        "--cache-size",
        type=_size("--cache-size"),
        metavar="SIZE",
        help="disk budget of the cache (default: what its filesystem holds above "
        "--min-free-space, counting what the cache already holds)",
    )
    p.add_argument(
        "--shared-cache",
        metavar="s3://BUCKET/PREFIX",
        help="a bucket shared by many nodes as a second cache tier, read before the origin",
    )
    p.add_argument(
        "--shared-cache-endpoint-url",
        metavar="URL",
        help="endpoint of the shared cache (default: the origin's)",
    )
    p.add_argument(
        "--shared-cache-profile",
        metavar="PROFILE",
        help="AWS profile (in the same credentials files) for the shared cache "
        "(default: the origin's credentials)",
    )
    p.add_argument(
        "--shared-cache-lease",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a node waits for another node fetching the same chunk "
        "before it fetches the chunk itself (default 30)",
    )
    p.add_argument(
        "--min-free-space",
        type=_size("--min-free-space"),
        metavar="SIZE",
        help="free space the cache leaves on its filesystem, evicting to keep it "
        "(default: 5%% of the filesystem, at most 4 GiB; 0 turns the guard off)",
    )
    p.add_argument(
        "--chunk-size",
        type=_size("--chunk-size"),
        metavar="SIZE",
        default=DEFAULT_CHUNK_SIZE,
        help=f"cache and fetch unit (default {format_size(DEFAULT_CHUNK_SIZE)})",
    )
    p.add_argument(
        "--fetch-concurrency", type=int, default=16, metavar="N", help="parallel GETs (default 16)"
    )
    p.add_argument(
        "--memory-cache",
        type=_size("--memory-cache"),
        metavar="SIZE",
        default=DEFAULT_MEMORY_CACHE,
        help="RAM for chunks: every chunk being received, read from disk or replied "
        "from lives in it, and it keeps recent ones; the daemon's RSS is about this "
        f"plus 60-140 MiB (default {format_size(DEFAULT_MEMORY_CACHE)})",
    )


class _Parser(argparse.ArgumentParser):
    """One line per usage error, like every other error of modelfs, instead
    of argparse's usage block; --help still shows everything."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"modelfs: error: {for_humans(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="modelfs",
        description="Mount an S3-compatible bucket read-only, with a persistent chunk cache.",
    )
    p.add_argument("--version", action="version", version=f"modelfs {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    _add_origin_and_cache_options(m)
    m.add_argument(
        "--snapshot",
        action="store_true",
        help="list the prefix once at mount and serve exactly those object versions "
        "for the life of the mount (VersionIds where the bucket keeps versions)",
    )
    m.add_argument(
        "--manifest",
        metavar="PATH|s3://BUCKET/KEY",
        help="serve exactly the object versions of this manifest (from 'modelfs "
        "snapshot'); every node given it serves the same bytes",
    )
    m.add_argument(
        "--metadata-ttl",
        type=_ttl,
        default=DEFAULT_METADATA_TTL,
        metavar="SECONDS",
        help="seconds listings and attributes are trusted, or 'indefinite' for a bucket "
        f"whose objects never change (default {DEFAULT_METADATA_TTL:g})",
    )
    for kind, default in (("file", DEFAULT_FILE_MODE), ("dir", DEFAULT_DIR_MODE)):
        m.add_argument(
            f"--{kind}-mode",
            type=_mode,
            default=default,
            metavar="MODE",
            help=f"permission bits of every {'file' if kind == 'file' else 'directory'}, "
            f"in octal (default {default:o}); write bits are refused: the mount is read-only",
        )
    m.add_argument(
        "--prefetch-window",
        type=_size("--prefetch-window"),
        metavar="SIZE",
        default=DEFAULT_PREFETCH_WINDOW,
        help="largest read-ahead of a sequential reader; 0 turns it off "
        f"(default {format_size(DEFAULT_PREFETCH_WINDOW)})",
    )
    m.add_argument(
        "--prefetch-on-open",
        type=parse_patterns,
        default=DEFAULT_PREFETCH_ON_OPEN,
        metavar="PATTERNS",
        help="fetch files whose name matches one of these comma- or colon-separated "
        "patterns whole, in the background, when opened; '' or none turns it off "
        f"(default {','.join(DEFAULT_PREFETCH_ON_OPEN)})",
    )
    m.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    m.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    m.add_argument(
        "--allow-empty",
        action="store_true",
        help="mount a prefix with no objects under it (by default that is an error: "
        "usually a typo in the prefix)",
    )
    m.add_argument(
        "--nonempty",
        action="store_true",
        help="mount over a directory that has files in it (they are hidden while mounted)",
    )
    m.add_argument("--uid", type=int, help="owner of every file (default: yours)")
    m.add_argument("--gid", type=int, help="group of every file (default: yours)")
    m.add_argument("--foreground", "-f", action="store_true", help="do not detach")
    m.add_argument("--debug", action="store_true", help="verbose logging")
    m.add_argument("--log-file", type=Path, help="daemon log (default: CACHE_DIR/modelfs.log)")

    u = sub.add_parser("umount", aliases=["unmount"], help="unmount a modelfs mount")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--lazy", "-z", action="store_true", help="detach even if files are open")

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
    _add_origin_and_cache_options(pl)
    pl.add_argument(
        "--manifest",
        metavar="PATH|s3://BUCKET/KEY",
        help="copy exactly the object versions of this manifest (from 'modelfs snapshot')",
    )
    pl.add_argument("--force", action="store_true", help="copy every file, even if up to date")
    pl.add_argument("--debug", action="store_true", help="verbose logging")

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
        "--check",
        metavar="PATH|s3://BUCKET/KEY",
        help="compare this manifest with the bucket now",
    )
    sn.add_argument("--json", action="store_true", help="with --check: the differences as JSON")
    _add_origin_options(sn)
    sn.add_argument("--debug", action="store_true", help="verbose logging")

    st = sub.add_parser("stats", help="what a running mount is doing")
    st.add_argument("mountpoint", type=Path)
    st.add_argument("--json", action="store_true", help="the raw counters, as JSON")

    c = sub.add_parser("cache", help="inspect or trim a cache directory (mounted or not)")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    actions = {
        "ls": "cached objects: key, ETag, cached bytes of the size, last access",
        "du": "space used by the cache",
        "verify": "check every cached chunk against its checksum",
        "gc": "evict least-recently-used chunks down to SIZE",
        "clear": "evict everything not being read",
        "pin": "never evict the files under PATH (inside a mount) from its cache",
        "unpin": "let the files under PATH be evicted again",
    }
    for name, text in actions.items():
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
            a.add_argument("size", type=_size("SIZE"), metavar="SIZE", help="e.g. 10G")
        if name in ("pin", "unpin"):
            a.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    return p


def config_from_args(args: argparse.Namespace) -> MountConfig:
    """A MountConfig from the arguments of `mount`, `pull` or `snapshot`:
    every option is named as its MountConfig field; those a command lacks
    keep their defaults. Without a source (a manifest names it) the source
    is a stand-in until the manifest is read (`_with_manifest`)."""
    import dataclasses

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(MountConfig)
        if f.name not in ("source", "mountpoint", "shared_cache") and hasattr(args, f.name)
    }
    manifest = getattr(args, "manifest", None) or getattr(args, "check", None)
    source = args.source or _manifest_stand_in(manifest)
    cfg = MountConfig(
        source=parse_s3_url(source),
        mountpoint=getattr(args, "mountpoint", None) or getattr(args, "dest", None) or Path("."),
        shared_cache=parse_s3_url(args.shared_cache)
        if getattr(args, "shared_cache", None)
        else None,
        **given,
    )
    cfg.validate()
    return cfg


def _manifest_stand_in(manifest: str | None) -> str:
    # The bucket holding an s3:// manifest, else any valid name: replaced by
    # the manifest's own source once it is read.
    if manifest and manifest.startswith("s3://"):
        return f"s3://{parse_s3_url(manifest).bucket}"
    return "s3://manifest"


def _fix_positionals(args: argparse.Namespace, second: str, metavar: str) -> None:
    """`mount --manifest M MNT`: with a manifest the source may be left out,
    and the one positional given is the second one."""
    if getattr(args, second) is None:
        if args.source is None or not args.manifest:
            raise ConfigError(f"the following arguments are required: {metavar}")
        setattr(args, second, Path(args.source))
        args.source = None
    if args.source is None and not args.manifest:
        raise ConfigError("the following arguments are required: s3://BUCKET[/PREFIX]")


def _with_manifest(cfg: MountConfig, named_source: bool) -> Snapshot | None:
    """The snapshot of --manifest, vetted against the source named (if one
    was), which then becomes the manifest's own; None without --manifest."""
    if not cfg.manifest:
        return None
    from . import snapshot

    ref = cfg.manifest
    if not ref.startswith("s3://"):
        ref = cfg.manifest = str(Path(ref).absolute())
    snap = snapshot.load(ref, _document_reader(cfg))
    snapshot.fit(snap, cfg.source if named_source else None, ref, cfg.allow_empty)
    cfg.source = snap.source
    cfg.snapshot = True
    cfg.validate()
    return snap


def _document_reader(cfg: MountConfig) -> Callable[[str, str], bytes]:
    def fetch(bucket: str, key: str) -> bytes:
        from .s3.origin import S3Store
        from .snapshot import MAX_MANIFEST

        return S3Store(cfg.origin_settings(pool=1), cfg.source.bucket).read_document(
            bucket, key, MAX_MANIFEST
        )

    return fetch


def journal_stderr() -> bool:
    """True when stderr is systemd's journal stream (systemd sets
    $JOURNAL_STREAM to its device:inode); journald then adds time and pid."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


# With --debug (a line per GET) the log file is rolled over to FILE.1 at
# this size, so it cannot fill the disk when nobody rotates it.
DEBUG_LOG_CAP = 256 << 20


class LogFile(logging.handlers.WatchedFileHandler):
    """The daemon's log file: reopened when logrotate (or anyone) moves or
    deletes it, created owner-only (it names keys and byte ranges), and,
    given a `cap`, rolled over to ``FILE.1`` when it grows past it."""

    def __init__(self, path: Path, cap: int | None = None) -> None:
        self.cap = cap
        super().__init__(path, delay=False)

    def _open(self) -> Any:
        fd = os.open(
            self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        return open(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.cap is not None and self.stream is not None and self.stream.tell() > self.cap:
            try:
                self.stream.close()
                os.replace(self.baseFilename, self.baseFilename + ".1")
            except OSError:
                pass
            self.stream = self._open()
            self._statstream()


def _setup_logging(debug: bool, stream: object = None, path: Path | None = None) -> None:
    handler: logging.Handler
    fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    if path is not None:
        try:
            for above in (path.parent, *path.parent.parents):
                if os.path.lexists(above):
                    if not above.is_dir():
                        raise ConfigError(
                            f"cannot write the log file {path}: {above} is not a directory"
                        )
                    break
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Owner only, like the cache: the log names keys and ranges.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise ConfigError(f"cannot write the log file {path}: {exc.strerror or exc}") from None
        handler = LogFile(path, cap=DEBUG_LOG_CAP if debug else None)
    else:
        handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
        if journal_stderr():
            fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(HumaneFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Never below WARNING, even with --debug: botocore's debug output
    # carries request headers (signatures, session tokens).
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_mount(cfg: MountConfig, snap: Snapshot | None = None) -> int:
    from .daemon import serve

    # A dead modelfs mount left by a crashed daemon is cleared, so that
    # mounting again is all the recovery it takes.
    if clear_stale_mount(cfg.mountpoint):
        print(
            f"modelfs: removed the disconnected mount a dead daemon left on {cfg.mountpoint}",
            file=sys.stderr,
        )
    # Fail before forking, and before writing anything, on obvious mistakes.
    cfg.mountpoint = check_mountpoint(cfg.mountpoint, nonempty=cfg.nonempty)
    cache_root = cfg.resolved_cache_dir
    cache_dir.refuse_inside(cache_root, cfg.mountpoint)
    cache_dir.vet(cache_root)
    if cfg.log_file is not None:
        cfg.log_file = cfg.log_file.absolute()
        cache_dir.refuse_inside(cfg.log_file.parent, cfg.mountpoint)
    if cfg.foreground:
        _setup_logging(cfg.debug)

        def notify(err: str | None) -> None:
            if err:
                log.error("%s", err)

        return serve(cfg, notify, snapshot=snap)

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os._exit(_daemon_child(cfg, write_fd, snap))
    os.close(write_fd)
    return _wait_for_daemon(pid, read_fd, cfg)


def _daemon_child(cfg: MountConfig, write_fd: int, snap: Snapshot | None) -> int:
    os.setsid()
    # Descriptors the caller passed on (a deploy script's `flock 9`) would
    # stay held for the life of the mount: keep only stdio and the pipe.
    os.closerange(3, write_fd)
    os.closerange(write_fd + 1, 1 << 20)
    sent = False

    def notify(err: str | None) -> None:
        nonlocal sent
        if not sent:
            sent = True
            line = "OK\n" if err is None else "ERR " + err.replace("\n", " ") + "\n"
            os.write(write_fd, line.encode())
            os.close(write_fd)

    try:
        # Under systemd (a .mount unit, or mount(8) run by one) stderr is the
        # journal: keep it and log there unless --log-file says otherwise.
        to_journal = cfg.log_file is None and journal_stderr()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1) if to_journal else (0, 1, 2):
            os.dup2(devnull, fd)
        if to_journal:
            _setup_logging(cfg.debug)
        else:
            if cfg.log_file is None:
                cache_dir.claim(cfg.resolved_cache_dir)  # vetted: empty or a cache
            _setup_logging(cfg.debug, path=cfg.log_file or cfg.resolved_cache_dir / "modelfs.log")
        from .daemon import serve

        rc = serve(cfg, notify, snapshot=snap)
        notify("the daemon stopped before the mount was ready")
        return rc
    except ModelfsError as exc:
        log.error("%s", exc)
        notify(str(exc))
        return 1
    except BaseException as exc:  # a bug: keep the traceback in the log
        log.exception("daemon failed")
        notify(f"internal error: {type(exc).__name__}: {exc} (see the log)")
        return 1


def _wait_for_daemon(pid: int, read_fd: int, cfg: MountConfig) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([read_fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            _cleanup_mount(cfg.mountpoint)
            raise MountError(f"the mount did not become ready within {STARTUP_TIMEOUT:.0f} s")
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        buf += chunk
    os.close(read_fd)
    line = buf.decode(errors="replace").strip()
    if line == "OK":
        return 0
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    _cleanup_mount(cfg.mountpoint)
    if line.startswith("ERR "):
        raise MountError(for_humans(line[4:]))
    raise MountError("the daemon exited during start-up; see its log")


def _cleanup_mount(mnt: Path) -> None:
    entry = find_mount(mnt)
    if entry is not None and entry.fstype == FSTYPE:
        try:
            fusermount_unmount(mnt, lazy=True)
        except MountError:
            pass


def cmd_umount(mnt: Path, lazy: bool) -> int:
    mnt = mount_root(mnt)  # the mountpoint, or any path inside the mount
    require_modelfs_mount(mnt)
    pid = None
    try:
        pid = int(os.getxattr(mnt, "user.modelfs.pid"))
    except (OSError, ValueError):
        pass  # a dead daemon: unmounting is all that is left to do
    fusermount_unmount(mnt, lazy=lazy)
    if pid is not None:
        deadline = time.monotonic() + UMOUNT_WAIT
        while time.monotonic() < deadline and process_alive(pid):
            time.sleep(0.05)
    return 0


COMMANDS = ("mount", "umount", "unmount", "stats", "cache", "pull", "warm", "snapshot")


def _mount_option_names(parser: argparse.ArgumentParser) -> tuple[frozenset[str], frozenset[str]]:
    """Long options of ``modelfs mount``: (flags, options taking a value)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags: set[str] = set()
    valued: set[str] = set()
    for action in sub.choices["mount"]._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                (flags if action.nargs == 0 else valued).add(opt[2:])
    return frozenset(flags), frozenset(valued)


def normalize_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``SOURCE MNT -o OPTS`` -> ``mount SOURCE MNT --opt value ...``."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["mount", *argv]
    if argv and argv[0] == "mount":
        argv = ["mount", *expand_o(argv[1:], *_mount_option_names(parser))]
    return argv


def cmd_pull(
    cfg: MountConfig,
    dest: Path,
    force: bool,
    debug: bool,
    as_json: bool = False,
    snap: Snapshot | None = None,
) -> int:
    import dataclasses

    from .progress import files_progress
    from .pull import pull

    _setup_logging(debug)
    with files_progress("pull") as progress:
        result = pull(cfg, dest, force=force, progress=progress, snapshot=snap)
    if as_json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return 1 if result.failed else 0
    print(
        f"{len(result.written)} files written ({format_size(result.bytes_written)}), "
        f"{len(result.skipped)} up to date, {len(result.failed)} failed"
    )
    for rel, err in result.failed.items():
        print(f"modelfs: error: {for_humans(f'{rel}: {err}')}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_snapshot(cfg: MountConfig, args: argparse.Namespace) -> int:
    """`modelfs snapshot`: write a manifest, or (--check) compare one with
    the bucket now."""
    from . import snapshot
    from .s3.origin import S3Store

    _setup_logging(args.debug)
    if args.check:
        cfg.manifest = args.check
        pinned = _with_manifest(cfg, named_source=args.source is not None)
        assert pinned is not None
        store = S3Store(cfg.origin_settings(pool=1), cfg.source.bucket)
        store.probe(cfg.source.prefix)
        diffs = snapshot.differences(pinned, snapshot.take(store, cfg.source))
        if args.json:
            print(json.dumps([_difference_json(d) for d in diffs], indent=2))
        for d in [] if args.json else diffs:
            print(for_humans(d.describe(pinned.bucket)))
        print(
            f"modelfs: {len(diffs)} of the keys under {pinned.source} differ from the manifest "
            f"({len(pinned.objects)} objects)"
            if diffs
            else f"modelfs: {pinned.source} matches the manifest ({len(pinned.objects)} objects)",
            file=sys.stderr,
        )
        return 1 if diffs else 0
    if args.json:
        raise ConfigError("--json goes with --check; a manifest is JSON already")
    if args.source is None:
        raise ConfigError("the following arguments are required: s3://BUCKET[/PREFIX]")
    store = S3Store(cfg.origin_settings(pool=1), cfg.source.bucket)
    store.probe(cfg.source.prefix, allow_empty=False)
    snap = snapshot.take(store, cfg.source)
    try:
        snapshot.write(snap, args.output)
    except OSError as exc:
        raise ModelfsError(f"cannot write {args.output}: {exc.strerror}") from None
    total = sum(o.version.size for o in snap.objects)
    pinned_by = "ETag and VersionId" if snap.versioned else "ETag (the bucket keeps no versions)"
    print(
        f"modelfs: snapshot of {snap.source}: {len(snap.objects)} objects, "
        f"{format_size(total)}, each pinned by {pinned_by}",
        file=sys.stderr,
    )
    return 0


def _difference_json(d: Any) -> dict[str, Any]:
    def version(v: Any) -> dict[str, Any] | None:
        if v is None:
            return None
        return {"etag": v.etag, "size": v.size, "version_id": v.version_id}

    return {"key": d.key, "change": d.change, "manifest": version(d.pinned), "now": version(d.now)}


def cmd_stats(mnt: Path, as_json: bool) -> int:
    from .report import read_stats, render_stats

    stats = read_stats(mnt)
    print(json.dumps(stats, indent=2, sort_keys=True) if as_json else render_stats(stats))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = normalize_argv(parser, list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        parser.error(str(exc))
    args = parser.parse_args(argv)
    try:
        if args.command in ("mount", "pull", "snapshot"):
            try:
                if args.command == "mount":
                    _fix_positionals(args, "mountpoint", "mountpoint")
                if args.command == "pull":
                    _fix_positionals(args, "dest", "DIR")
                cfg = config_from_args(args)
            except ConfigError as exc:
                parser.error(str(exc))
            if args.command == "snapshot":
                return cmd_snapshot(cfg, args)
            snap = _with_manifest(cfg, named_source=args.source is not None)
            if args.command == "mount":
                return cmd_mount(cfg, snap)
            return cmd_pull(cfg, args.dest, args.force, args.debug, args.json, snap)
        if args.command == "warm":
            from .warm import cmd_warm

            return cmd_warm(args.paths, args.jobs, check=args.check, as_json=args.json)
        if args.command == "stats":
            return cmd_stats(args.mountpoint, args.json)
        if args.command == "cache":
            from .report import cmd_cache

            return cmd_cache(args.cache_command, args)
        return cmd_umount(args.mountpoint, args.lazy)
    except ModelfsError as exc:
        print(f"modelfs: error: {for_humans(str(exc))}", file=sys.stderr)
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
    print("modelfs: interrupted; what was fetched stays in the cache", file=sys.stderr)
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
