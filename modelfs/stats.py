"""The mount's counters as typed, frozen snapshots.

Every layer counts in plain integers and answers with its own frozen
snapshot: `StoreStats` (the origin store), `CacheStats` (the chunk cache),
`TierStats` (the shared tier), `SnapshotStats` (a snapshot mount's pins),
`FsStats` (the FUSE operations). `modelfs.report.MountReport`, which the
daemon builds, assembles them with the one-minute rates into a
`MountStats`: `fs` serves
it as JSON (the root's ``user.modelfs.stats`` xattr), `metrics` exports its
attributes, and ``modelfs stats`` reads it back with `MountStats.from_json`.

This module imports no layer at run time, so every layer can import it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

RATE_WINDOW = 60.0  # seconds behind the "last minute" throughput
# Upper bounds (seconds) of the GET latency histogram; +Inf is implied.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class StoreStats:
    """What was asked of the origin and what it sent."""

    list_requests: int = 0
    get_requests: int = 0
    get_bytes: int = 0
    retries: int = 0
    in_flight: int = 0
    # result label ("ok", "stale", "not_found", ...) -> requests
    get_results: dict[str, int] = field(default_factory=dict)
    list_results: dict[str, int] = field(default_factory=dict)
    # Requests per LATENCY_BUCKETS bound, then above the last one.
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    # The least time to first byte of the last minutes' requests (the probe
    # listing, GETs): how far the origin is (whole-file fetches size their
    # GETs by it); None: none timed yet.
    first_byte_floor: float | None = None


@dataclass(frozen=True)
class CacheStats:
    """The chunk cache: what it holds, and what it served and fetched."""

    used_bytes: int = 0
    chunks: int = 0
    objects: int = 0
    capacity_bytes: int = 0
    prefetch_pending_bytes: int = 0  # read ahead, cached, not read yet
    open_objects: int = 0
    pending_writes: int = 0  # chunks served whose store has not finished
    memory_bytes: int = 0
    memory_cached_bytes: int = 0
    memory_overflow_chunks: int = 0
    hits: int = 0
    misses: int = 0
    hit_bytes: int = 0  # bytes handed to readers from chunks already cached
    miss_bytes: int = 0  # ... whose chunk had to come from the origin
    prefetch_fetched_bytes: int = 0
    prefetch_used_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    uncached_chunks: int = 0  # fetched but not stored: the cache could not be written
    fetched_chunks: int = 0
    verified_chunks: int = 0
    peer_chunks: int = 0  # a chunk we missed that another process stored meanwhile
    tier_chunks: int = 0  # a chunk we missed that came from the shared tier
    corrupt_chunks: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    index_commits: int = 0


@dataclass(frozen=True)
class TierStats:
    """The shared tier (--shared-cache)."""

    hits: int = 0
    hit_bytes: int = 0
    misses: int = 0
    corrupt: int = 0
    uploads: int = 0
    upload_bytes: int = 0
    uploads_dropped: int = 0  # the upload queue was full
    upload_failures: int = 0
    leases_won: int = 0
    lease_waits: int = 0  # another node held the lease: waited for its upload
    lease_wait_hits: int = 0  # ... and the chunk arrived in the tier
    lease_timeouts: int = 0  # ... and it did not: fetched from the origin anyway
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    pending_uploads: int = 0
    herd_control: bool | None = None  # None: not probed yet
    available: bool = True


@dataclass(frozen=True)
class SnapshotStats:
    """A snapshot mount's pins (--snapshot, --manifest)."""

    objects: int = 0
    version_ids: int = 0
    stale: int = 0  # pinned objects found changed or gone at the origin
    manifest: str | None = None
    taken: str = ""


@dataclass(frozen=True)
class PreloadStats:
    """--preload: the files a loader will read, fetched after mount."""

    state: str = "off"  # waiting, listing, running, done, failed
    files: int = 0
    files_done: int = 0
    files_skipped: int = 0  # left out: the cache cannot hold them
    bytes: int = 0
    bytes_done: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class FsStats:
    """The FUSE operations' own counts."""

    open_files: int = 0
    lookups: int = 0  # lookups of a name that reached the daemon
    negative_lookups: int = 0  # of those, names that do not exist
    inodes: int = 0


@dataclass(frozen=True)
class MountStats:
    """Everything ``modelfs stats`` shows about one mount."""

    source: str = "?"
    mountpoint: str = "?"
    cache_dir: str = "?"
    pid: int = 0
    started: float = 0.0
    store: StoreStats = field(default_factory=StoreStats)
    cache: CacheStats = field(default_factory=CacheStats)
    shared: TierStats | None = None
    snapshot: SnapshotStats | None = None
    preload: PreloadStats | None = None
    open_files: int = 0
    lookups: int = 0
    negative_lookups: int = 0
    inodes: int = 0
    readahead_chunks: int = 0
    prefetched_on_open: int = 0
    fetched_ahead_of_open: int = 0  # of those, the next model file before its opening
    last_minute: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MountStats:
        """Back from `to_json`; keys this version does not know (a daemon
        of another version) are skipped, missing ones keep their defaults."""
        nested = {
            "store": StoreStats,
            "cache": CacheStats,
            "shared": TierStats,
            "snapshot": SnapshotStats,
            "preload": PreloadStats,
        }
        values = {
            k: _known(nested[k], v) if k in nested and isinstance(v, dict) else v
            for k, v in doc.items()
        }
        return _known(cls, values)


T = TypeVar("T")


def _known(cls: type[T], values: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in names})


class RecentRates:
    """Byte counters sampled once a second; rates over the last minute."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque()

    def sample(self, counters: dict[str, int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, dict(counters)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rates(self) -> dict[str, float]:
        """Per-second rate of each counter over the samples kept (0 if < 2)."""
        if len(self._samples) < 2:
            return {}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, 1e-9)
        return {k: (last[k] - first.get(k, 0)) / span for k in last}


# What a collector or an xattr asks for: the mount's stats now.
StatsSource = Callable[[], MountStats]
