"""A mount's report: its layers' snapshots assembled into one `MountStats`.

The daemon builds one `MountReport` with the mount's facts and its layers,
samples the one-minute rates through it, and gives it to `fs.Operations`,
which serves `snapshot()` as the stats xattr; the Prometheus endpoint reads
the same snapshot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .stats import FsStats, MountStats, RecentRates

if TYPE_CHECKING:
    from .cache import ChunkCache
    from .prefetch import OpenPrefetch, ReadAhead
    from .preload import Preload
    from .snapshot import Pins
    from .store import ObjectStore
    from .tier import SharedTier


@dataclass(frozen=True)
class MountInfo:
    """Facts about a mount that do not change while it runs."""

    source: str
    mountpoint: str
    cache_dir: str
    pid: int
    started: float


class MountReport:
    """Assembles a mount's `MountStats` from its layers' snapshots; the
    daemon calls `sample` once a second for the one-minute rates."""

    def __init__(
        self,
        store: ObjectStore,
        cache: ChunkCache,
        *,
        info: MountInfo | None = None,
        tier: SharedTier | None = None,
        pins: Pins | None = None,
        readahead: ReadAhead | None = None,
        open_prefetch: OpenPrefetch | None = None,
        preload: Preload | None = None,
    ) -> None:
        self.store, self.cache, self.info, self.pins = store, cache, info, pins
        self.tier = tier
        self.preload = preload
        self.readahead, self.open_prefetch = readahead, open_prefetch
        self.rates = RecentRates()

    def sample(self) -> None:
        self.rates.sample(
            {
                "origin_bytes_per_s": self.store.counters.get_bytes,
                "served_bytes_per_s": self.cache.served_bytes,
            }
        )

    def snapshot(self, fs: FsStats) -> MountStats:
        info = dataclasses.asdict(self.info) if self.info is not None else {}
        tier = self.tier
        return MountStats(
            **info,
            store=self.store.counters.snapshot(),
            cache=self.cache.stats(),
            shared=tier.snapshot() if tier is not None else None,
            snapshot=self.pins.stats() if self.pins is not None else None,
            preload=self.preload.stats() if self.preload is not None else None,
            **dataclasses.asdict(fs),
            readahead_chunks=self.readahead.budget.issued_chunks if self.readahead else 0,
            prefetched_on_open=self.open_prefetch.started_files if self.open_prefetch else 0,
            fetched_ahead_of_open=self.open_prefetch.files_ahead if self.open_prefetch else 0,
            last_minute=self.rates.rates(),
        )
