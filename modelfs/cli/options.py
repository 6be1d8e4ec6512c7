"""The one table of options: each written once, with its flag, the
`MountConfig` field it sets, its parser, help and metavar.

Its default is the field's default in `MountConfig`, never repeated here.
argparse is generated from the table (`add_options`), so is the mount(8)
``-o key=value`` translation (`mount_option_names`), and so is turning
parsed arguments back into a `MountConfig` (`config_from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (
    MountConfig,
    S3Location,
    format_size,
    parse_mode,
    parse_patterns,
    parse_s3_url,
    parse_size,
    parse_ttl,
)
from ..errors import ConfigError


class UsageError(ConfigError):
    """Arguments that do not make a valid configuration: reported like
    argparse's own errors (exit status 2)."""


class Group(enum.Enum):
    ORIGIN = "how the bucket is reached"  # every command that talks to the bucket
    CACHE = "the chunk cache"  # mount and pull
    MOUNT = "the mount"  # mount only
    LOG = "logging"  # mount, pull, snapshot


@dataclass(frozen=True)
class Option:
    flag: str  # "--cache-size"
    group: Group
    help: str  # "{default}" is replaced by the field's default, shown by `show`
    parse: Callable[[str], Any] | None = None  # None: a flag without a value
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    short: str | None = None
    show: Callable[[Any], str] = str
    field: str | None = None  # MountConfig field; default: the flag's name

    @property
    def name(self) -> str:
        return self.flag.removeprefix("--")

    @property
    def dest(self) -> str:
        return self.field or self.name.replace("-", "_")

    @property
    def default(self) -> Any:
        f = _FIELDS[self.dest]
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


_FIELDS = {f.name: f for f in dataclasses.fields(MountConfig)}


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser whose ConfigError argparse reports as a usage error."""

    def run(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return run


def _size(flag: str) -> Callable[[str], int]:
    return lambda text: parse_size(text, flag)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"invalid number of seconds {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"invalid integer {text!r}") from None


def _ttl_shown(seconds: float) -> str:
    return f"{seconds:g}"


OPTIONS: tuple[Option, ...] = (
    # -- how the bucket is reached ------------------------------------------
    Option(
        "--endpoint-url",
        Group.ORIGIN,
        "S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS)",
        str,
        "URL",
    ),
    Option("--region", Group.ORIGIN, "region (default: the profile's)", str, "REGION"),
    Option("--profile", Group.ORIGIN, "profile from the shared AWS config", str, "PROFILE"),
    Option(
        "--credentials-file",
        Group.ORIGIN,
        "AWS shared-credentials file to read instead of ~/.aws/credentials",
        Path,
        "PATH",
    ),
    Option(
        "--addressing-style",
        Group.ORIGIN,
        "bucket in the path or in the host name (default {default})",
        str,
        choices=("auto", "path", "virtual"),
    ),
    Option(
        "--no-sign-request",
        Group.ORIGIN,
        "send anonymous requests to the origin (a public bucket); no credentials needed",
    ),
    Option(
        "--connect-timeout",
        Group.ORIGIN,
        "TCP connect timeout of a GET (default {default})",
        _seconds,
        "SECONDS",
        show=_ttl_shown,
    ),
    Option(
        "--read-timeout",
        Group.ORIGIN,
        "longest wait for the next bytes of a GET (default {default})",
        _seconds,
        "SECONDS",
        show=_ttl_shown,
    ),
    Option(
        "--retry-timeout",
        Group.ORIGIN,
        "time all retries of one GET may take; then EIO (default {default})",
        _seconds,
        "SECONDS",
        show=_ttl_shown,
    ),
    # -- the chunk cache ------------------------------------------------------
    Option(
        "--cache-dir",
        Group.CACHE,
        "default: $XDG_CACHE_HOME/modelfs, /var/cache/modelfs for root",
        Path,
        "DIR",
    ),
    Option(
        "--cache-size",
        Group.CACHE,
        "disk budget of the cache (default: what its filesystem holds above "
        "--min-free-space, counting what the cache already holds)",
        _size("--cache-size"),
        "SIZE",
    ),
    Option(
        "--min-free-space",
        Group.CACHE,
        "free space the cache leaves on its filesystem, evicting to keep it "
        "(default: 5%% of the filesystem, at most 4 GiB; 0 turns the guard off)",
        _size("--min-free-space"),
        "SIZE",
    ),
    Option(
        "--shared-cache",
        Group.CACHE,
        "a bucket shared by many nodes as a second cache tier, read before the origin",
        parse_s3_url,
        "s3://BUCKET/PREFIX",
    ),
    Option(
        "--shared-cache-endpoint-url",
        Group.CACHE,
        "endpoint of the shared cache (default: the origin's)",
        str,
        "URL",
    ),
    Option(
        "--shared-cache-profile",
        Group.CACHE,
        "AWS profile (in the same credentials files) for the shared cache "
        "(default: the origin's credentials)",
        str,
        "PROFILE",
    ),
    Option(
        "--shared-cache-lease",
        Group.CACHE,
        "how long a node waits for another node fetching the same chunk "
        "before it fetches the chunk itself (default {default})",
        _seconds,
        "SECONDS",
        show=_ttl_shown,
    ),
    Option(
        "--chunk-size",
        Group.CACHE,
        "cache and fetch unit (default {default})",
        _size("--chunk-size"),
        "SIZE",
        show=format_size,
    ),
    Option(
        "--fetch-concurrency",
        Group.CACHE,
        "parallel GETs (default {default})",
        _integer,
        "N",
    ),
    Option(
        "--memory-cache",
        Group.CACHE,
        "RAM for chunks: every chunk being received, read from disk or replied "
        "from lives in it, and it keeps recent ones; the daemon's RSS is about this "
        "plus 60-140 MiB (default {default})",
        _size("--memory-cache"),
        "SIZE",
        show=format_size,
    ),
    # -- the mount ------------------------------------------------------------
    Option(
        "--snapshot",
        Group.MOUNT,
        "list the prefix once at mount and serve exactly those object versions "
        "for the life of the mount (VersionIds where the bucket keeps versions)",
    ),
    Option(
        "--manifest",
        Group.MOUNT,
        "serve exactly the object versions of this manifest (from 'modelfs "
        "snapshot'); every node given it serves the same bytes",
        str,
        "PATH|s3://BUCKET/KEY",
    ),
    Option(
        "--metadata-ttl",
        Group.MOUNT,
        "seconds listings and attributes are trusted, or 'indefinite' for a bucket "
        "whose objects never change (default {default})",
        parse_ttl,
        "SECONDS",
        show=_ttl_shown,
    ),
    Option(
        "--file-mode",
        Group.MOUNT,
        "permission bits of every file, in octal (default {default}); write bits "
        "are refused: the mount is read-only",
        parse_mode,
        "MODE",
        show=lambda mode: f"{mode:o}",
    ),
    Option(
        "--dir-mode",
        Group.MOUNT,
        "permission bits of every directory, in octal (default {default}); write "
        "bits are refused: the mount is read-only",
        parse_mode,
        "MODE",
        show=lambda mode: f"{mode:o}",
    ),
    Option(
        "--prefetch-window",
        Group.MOUNT,
        "largest read-ahead of a sequential reader, at most a quarter of --memory-cache; "
        "0 turns it off (default {default})",
        _size("--prefetch-window"),
        "SIZE",
        show=format_size,
    ),
    Option(
        "--prefetch-on-open",
        Group.MOUNT,
        "fetch files whose name matches one of these comma- or colon-separated "
        "patterns whole, in the background, when opened; '' or none turns it off "
        "(default {default})",
        parse_patterns,
        "PATTERNS",
        show=",".join,
    ),
    Option(
        "--preload",
        Group.MOUNT,
        "as soon as the mount answers, fetch every file --prefetch-on-open matches "
        "(in loader order, within the cache's size) in the background, behind reads",
    ),
    Option(
        "--metrics-addr",
        Group.MOUNT,
        "serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
        str,
        "HOST:PORT",
    ),
    Option("--allow-other", Group.MOUNT, "let other users see the mount"),
    Option(
        "--allow-empty",
        Group.MOUNT,
        "mount a prefix with no objects under it (by default that is an error: "
        "usually a typo in the prefix)",
    ),
    Option(
        "--nonempty",
        Group.MOUNT,
        "mount over a directory that has files in it (they are hidden while mounted)",
    ),
    Option("--uid", Group.MOUNT, "owner of every file (default: yours)", _integer, "N"),
    Option("--gid", Group.MOUNT, "group of every file (default: yours)", _integer, "N"),
    Option("--foreground", Group.MOUNT, "do not detach", short="-f"),
    Option("--log-file", Group.MOUNT, "daemon log (default: CACHE_DIR/modelfs.log)", Path, "PATH"),
    # -- logging ----------------------------------------------------------------
    Option("--debug", Group.LOG, "verbose logging"),
)


def options_of(groups: Iterable[Group]) -> list[Option]:
    wanted = set(groups)
    return [o for o in OPTIONS if o.group in wanted]


def add_options(parser: argparse.ArgumentParser, groups: Iterable[Group]) -> None:
    """The table's options of these groups, as argparse arguments."""
    for o in options_of(groups):
        names = [o.flag] if o.short is None else [o.flag, o.short]
        text = o.help.replace("{default}", o.show(o.default)) if "{default}" in o.help else o.help
        if o.parse is None:
            parser.add_argument(*names, dest=o.dest, action="store_true", help=text)
            continue
        parser.add_argument(
            *names,
            dest=o.dest,
            type=argparse_type(o.parse),
            default=o.default,
            metavar=o.metavar,
            choices=o.choices,
            help=text,
        )


def mount_option_names() -> tuple[frozenset[str], frozenset[str]]:
    """Long options of ``modelfs mount`` without dashes: (flags, options
    taking a value), for the mount(8) ``-o`` form."""
    opts = options_of(MOUNT_GROUPS)
    return (
        frozenset(o.name for o in opts if o.parse is None),
        frozenset(o.name for o in opts if o.parse is not None),
    )


MOUNT_GROUPS = (Group.ORIGIN, Group.CACHE, Group.MOUNT, Group.LOG)
PULL_GROUPS = (Group.ORIGIN, Group.CACHE, Group.LOG)
SNAPSHOT_GROUPS = (Group.ORIGIN, Group.LOG)


def config_from_args(args: argparse.Namespace, source: S3Location, mountpoint: Path) -> MountConfig:
    """A validated MountConfig from parsed arguments: each table option the
    command has sets its field; the others keep their defaults."""
    given = {o.dest: getattr(args, o.dest) for o in OPTIONS if hasattr(args, o.dest)}
    cfg = MountConfig(source=source, mountpoint=mountpoint, **given)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return cfg
