"""Parsing and validation of user input: sizes, s3:// URLs, mount options.

Everything a user can type is checked here, before any network or FUSE work,
so a typo produces a one-line `ConfigError` instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .s3.settings import S3Settings

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# 8 MiB: see docs/architecture.md ("Choosing the chunk size") for the
# measurement behind it.
DEFAULT_CHUNK_SIZE = 8 * MiB
MIN_CHUNK_SIZE = 64 * KiB
MAX_CHUNK_SIZE = 1 * GiB
DEFAULT_METADATA_TTL = 60.0
# Largest read-ahead window of one sequential stream (0 turns read-ahead off).
DEFAULT_PREFETCH_WINDOW = 256 * MiB
# Timeouts of ranged GETs, in seconds (--connect-timeout, --read-timeout) and
# the bound on all retries of one GET (--retry-timeout): a read that cannot
# be served by then fails with EIO instead of hanging a loader.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_RETRY_TIMEOUT = 120.0
# Model files fetched whole in the background when opened (--prefetch-on-open).
DEFAULT_PREFETCH_ON_OPEN = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
# Recently fetched or verified chunks kept in RAM to answer reads without a pread.
DEFAULT_MEMORY_CACHE = 128 * MiB
# Parallel GETs to the origin (--fetch-concurrency).
DEFAULT_FETCH_CONCURRENCY = 16
# How long a node waits for another node fetching the same chunk into the
# shared tier before it fetches the chunk itself (--shared-cache-lease).
DEFAULT_SHARED_CACHE_LEASE = 30.0
DEFAULT_FILE_MODE = 0o444
DEFAULT_DIR_MODE = 0o555
# --metadata-ttl indefinite: listings are loaded once and trusted for the
# mount's life; the kernel is told to keep entries this long.
INDEFINITE = math.inf
KERNEL_TTL_CAP = 365 * 86400.0
# Without --cache-size the cache may use what its filesystem holds above
# --min-free-space (as mountpoint-s3 does): a 70B model in bf16 is ~140 GB.
MIN_DEFAULT_CACHE = 64 * MiB
# Free space the cache leaves on its filesystem (evicting to keep it) when
# --min-free-space is not given: this share of the filesystem, at most the cap.
DEFAULT_MIN_FREE_SHARE = 0.05
DEFAULT_MIN_FREE_CAP = 4 * GiB
# Timeouts (seconds) of the shared tier's requests.
TIER_CONNECT_TIMEOUT = 2.0
TIER_READ_TIMEOUT = 10.0
# Bounds that catch typos: a week for any duration, 1024 parallel GETs (each
# holds a thread, a connection and a chunk in memory).
MAX_SECONDS = 7 * 24 * 3600.0
MAX_FETCH_CONCURRENCY = 1024

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": TiB,
    "tb": TiB,
    "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_BUCKET_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,254}$")


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``8M``, ``8MiB``, ``1.5G`` or ``4096`` into bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"invalid {what} {text!r}: use a number with an optional unit, e.g. 8M, 10G"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise ConfigError(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ends with "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket[/prefix]`` -> S3Location; the prefix is a directory."""
    if not url.startswith("s3://"):
        raise ConfigError(f"invalid source {url!r}: expected s3://BUCKET[/PREFIX]")
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"invalid bucket name {bucket!r} in {url!r}")
    prefix = prefix.strip("/")
    if prefix:
        if any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ConfigError(f"invalid prefix in {url!r}: empty, '.' or '..' path parts")
        prefix += "/"
    return S3Location(bucket, prefix)


def parse_patterns(text: str) -> tuple[str, ...]:
    """``*.safetensors,*.bin`` (or ``:``-separated, for fstab) -> patterns;
    ``""`` or ``none`` -> () (off)."""
    if text.strip().lower() in ("", "none", "off"):
        return ()
    return tuple(p.strip() for p in re.split(r"[,:]", text) if p.strip())


def parse_ttl(text: str) -> float:
    """Seconds, or ``indefinite`` (also ``inf``, ``forever``)."""
    if text.strip().lower() in ("indefinite", "inf", "infinite", "forever"):
        return INDEFINITE
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ConfigError(
            f"--metadata-ttl must be a number of seconds or 'indefinite', not {text!r}"
        )
    return seconds


def parse_mode(text: str) -> int:
    """Permission bits in octal (``444``, ``0o440``); no write, setuid,
    setgid or sticky bits: the mount is read-only."""
    digits = text.strip().lower().removeprefix("0o")
    if not re.fullmatch(r"[0-7]{1,4}", digits):
        raise ConfigError(f"invalid mode {text!r}: expected octal permission bits, e.g. 444")
    mode = int(digits, 8)
    if mode & ~0o555:
        raise ConfigError(
            f"invalid mode {text!r}: only read and execute bits (at most 555); "
            "the mount is read-only"
        )
    return mode


def parse_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 if unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/modelfs")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "modelfs"


@dataclass
class MountConfig:
    source: S3Location
    mountpoint: Path
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials_file: Path | None = None
    addressing_style: str = "auto"
    cache_dir: Path | None = None
    cache_size: int | None = None  # None: derived from free space at mount
    min_free_space: int | None = None  # None: DEFAULT_MIN_FREE_SHARE of the filesystem
    # The shared cache tier (s3://BUCKET/PREFIX on an S3-compatible store).
    shared_cache: S3Location | None = None
    shared_cache_endpoint_url: str | None = None  # default: the origin's
    shared_cache_profile: str | None = None  # default: the origin's credentials
    shared_cache_lease: float = DEFAULT_SHARED_CACHE_LEASE  # waiting for another node's fetch
    chunk_size: int = DEFAULT_CHUNK_SIZE
    metadata_ttl: float = DEFAULT_METADATA_TTL  # INDEFINITE: never reloaded
    file_mode: int = DEFAULT_FILE_MODE
    dir_mode: int = DEFAULT_DIR_MODE
    allow_other: bool = False
    nonempty: bool = False  # mount over a directory with files in it
    allow_empty: bool = False  # mount a prefix with nothing under it (else an error)
    no_sign_request: bool = False  # anonymous requests to the origin (public buckets)
    uid: int | None = None
    gid: int | None = None
    foreground: bool = False
    debug: bool = False
    log_file: Path | None = None
    fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY
    prefetch_window: int = DEFAULT_PREFETCH_WINDOW
    memory_cache: int = DEFAULT_MEMORY_CACHE
    metrics_addr: str | None = None  # HOST:PORT of the Prometheus endpoint
    # Seconds: TCP connect, wait for the next bytes, and all retries of one GET.
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT
    # File-name patterns fetched whole, in the background, when opened.
    prefetch_on_open: tuple[str, ...] = DEFAULT_PREFETCH_ON_OPEN
    # Freeze the listing at mount (--snapshot), or mount the one a manifest
    # holds (--manifest PATH or s3:// URL; implies a snapshot mount).
    snapshot: bool = False
    preload: bool = False
    manifest: str | None = None

    def validate(self) -> None:
        """Refuse, with a ConfigError naming the option, what cannot work."""
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ConfigError("--addressing-style must be auto, path or virtual")
        self._validate_sizes()
        self._validate_durations()
        self._validate_counts()
        self._validate_addresses()
        self._validate_tier()
        if self.credentials_file is not None:
            self.credentials_file = self.credentials_file.absolute()
            if not self.credentials_file.is_file() or not os.access(self.credentials_file, os.R_OK):
                raise ConfigError(
                    f"credentials file {self.credentials_file} is missing or not readable"
                )

    def _validate_sizes(self) -> None:
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ConfigError(
                f"--chunk-size must be between {format_size(MIN_CHUNK_SIZE)} "
                f"and {format_size(MAX_CHUNK_SIZE)}"
            )
        if self.chunk_size % (4 * KiB):
            raise ConfigError("--chunk-size must be a multiple of 4 KiB")
        if self.memory_cache < self.chunk_size:
            # Reads from disk are checked a whole chunk at a time and served
            # from memory: with less than a chunk, each read would re-read it.
            raise ConfigError("--memory-cache must hold at least one chunk (--chunk-size)")
        ram = physical_memory()
        if ram and self.memory_cache > ram // 2:
            raise ConfigError(
                f"--memory-cache {format_size(self.memory_cache)} is more than half of this "
                f"machine's memory ({format_size(ram)})"
            )
        if self.cache_size is not None and self.cache_size < self.chunk_size * 4:
            raise ConfigError("--cache-size must hold at least four chunks")
        if self.prefetch_window < 0:
            raise ConfigError("--prefetch-window must be >= 0")

    def _validate_durations(self) -> None:
        if self.metadata_ttl != INDEFINITE and not (
            math.isfinite(self.metadata_ttl) and self.metadata_ttl <= MAX_SECONDS
        ):
            raise ConfigError(
                f"--metadata-ttl must be a number of seconds up to {MAX_SECONDS:g}, or 'indefinite'"
            )
        if self.metadata_ttl < 0:
            raise ConfigError("--metadata-ttl must be >= 0")
        for name, seconds in (
            ("--shared-cache-lease", self.shared_cache_lease),
            ("--connect-timeout", self.connect_timeout),
            ("--read-timeout", self.read_timeout),
            ("--retry-timeout", self.retry_timeout),
        ):
            if not math.isfinite(seconds) or seconds > MAX_SECONDS:
                raise ConfigError(f"{name} must be a number of seconds up to {MAX_SECONDS:g}")
            if not seconds > 0:
                # (the lease's own message predates the others')
                raise ConfigError(
                    "--shared-cache-lease must be > 0"
                    if name == "--shared-cache-lease"
                    else f"{name} must be a positive number of seconds"
                )

    def _validate_counts(self) -> None:
        if self.fetch_concurrency > MAX_FETCH_CONCURRENCY:
            raise ConfigError(f"--fetch-concurrency must be at most {MAX_FETCH_CONCURRENCY}")
        if self.fetch_concurrency < 1:
            raise ConfigError("--fetch-concurrency must be >= 1")
        for name, val in (("--uid", self.uid), ("--gid", self.gid)):
            if val is not None and not 0 <= val < 2**32 - 1:
                raise ConfigError(f"{name} must be a non-negative integer")

    def _validate_addresses(self) -> None:
        for name, url in (
            ("--endpoint-url", self.endpoint_url),
            ("--shared-cache-endpoint-url", self.shared_cache_endpoint_url),
        ):
            if url is not None and not re.match(r"^https?://[^/\s]+", url):
                raise ConfigError(f"invalid {name} {url!r}: expected http(s)://HOST[:PORT]")
        if self.metrics_addr is not None:
            try:
                parse_addr(self.metrics_addr)
            except ValueError:
                raise ConfigError(
                    f"invalid --metrics-addr {self.metrics_addr!r}: expected HOST:PORT, "
                    "e.g. 127.0.0.1:9100"
                ) from None

    def _validate_tier(self) -> None:
        tier = self.shared_cache
        if tier is None or self.shared_cache_endpoint_url not in (None, self.endpoint_url):
            return
        if tier.bucket == self.source.bucket and (
            tier.prefix.startswith(self.source.prefix) or self.source.prefix.startswith(tier.prefix)
        ):
            raise ConfigError(
                "--shared-cache must not overlap the mounted prefix "
                "(its chunk objects would show up in the mount)"
            )

    def origin_settings(self, pool: int | None = None) -> S3Settings:
        """How the origin is reached; `pool` connections (default: one per
        parallel GET, and a few for listings)."""
        return S3Settings(
            endpoint_url=self.endpoint_url,
            region=self.region,
            profile=self.profile,
            credentials_file=self.credentials_file,
            addressing_style=self.addressing_style,
            unsigned=self.no_sign_request,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retry_timeout=self.retry_timeout,
            pool=pool or self.fetch_concurrency + 4,
        )

    def tier_settings(self, pool: int) -> S3Settings:
        """How the shared tier is reached: its own endpoint and profile if
        given, signed, and short timeouts: a slow tier must cost a read
        little more than going to the origin straight away."""
        return dataclasses.replace(
            self.origin_settings(pool),
            endpoint_url=self.shared_cache_endpoint_url or self.endpoint_url,
            profile=self.shared_cache_profile or self.profile,
            unsigned=False,
            connect_timeout=TIER_CONNECT_TIMEOUT,
            read_timeout=TIER_READ_TIMEOUT,
        )

    @property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or default_cache_dir()).absolute()
