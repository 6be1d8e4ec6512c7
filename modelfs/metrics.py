"""What a running mount reports: Prometheus metrics and recent throughput.

Owns turning a mount's typed stats (`modelfs.stats.MountStats`) into
Prometheus metric families at scrape time, and the HTTP endpoint behind
``--metrics-addr``. The layers below never import prometheus-client:
counting costs them an integer increment, and nothing is computed unless
someone scrapes.

Byte counters say where the bytes came from in their name: ``origin`` (the
bucket) or ``cache`` (the local chunk cache).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .stats import LATENCY_BUCKETS, StatsSource, TierStats


class ModelfsCollector(Collector):
    """Exports one `MountStats` snapshot (see `modelfs.stats`) per scrape."""

    def __init__(self, stats: StatsSource) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        store, cache = s.store, s.cache

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"modelfs_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"modelfs_{name}", doc, value=value)

        yield counter(
            "origin_received_bytes", "Payload bytes received from the origin", store.get_bytes
        )
        requests = CounterMetricFamily(
            "modelfs_origin_requests", "Requests sent to the origin", labels=["op", "result"]
        )
        for result, n in sorted(store.get_results.items()):
            requests.add_metric(["get", result], n)
        for result, n in sorted(store.list_results.items()):
            requests.add_metric(["list", result], n)
        yield requests
        yield counter(
            "origin_retries", "Requests the S3 client retried (5xx, throttling)", store.retries
        )
        buckets, acc = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), store.latency_counts, strict=True):
            acc += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        yield HistogramMetricFamily(
            "modelfs_origin_get_seconds",
            "Latency of ranged GETs, whole body received",
            buckets=buckets,
            sum_value=store.latency_sum,
        )
        errors = CounterMetricFamily(
            "modelfs_errors", "Failed origin reads and corrupt cached chunks", labels=["kind"]
        )
        for result, n in sorted(store.get_results.items()):
            if result != "ok":
                errors.add_metric([result], n)
        errors.add_metric(["corrupt_chunk"], cache.corrupt_chunks)
        yield errors
        yield counter(
            "cache_hit_bytes",
            "Bytes served to readers from chunks already cached",
            cache.hit_bytes,
        )
        yield counter(
            "cache_miss_bytes",
            "Bytes served to readers whose chunk had to come from the origin",
            cache.miss_bytes,
        )
        yield counter(
            "prefetch_origin_bytes",
            "Bytes read-ahead fetched from the origin",
            cache.prefetch_fetched_bytes,
        )
        yield counter(
            "prefetch_used_bytes",
            "Read-ahead bytes a reader then used",
            cache.prefetch_used_bytes,
        )
        yield counter(
            "prefetch_wasted_bytes",
            "Read-ahead bytes evicted before any reader used them",
            cache.prefetch_wasted_bytes,
        )
        yield gauge(
            "prefetch_pending_bytes",
            "Read-ahead bytes cached and not used yet",
            cache.prefetch_pending_bytes,
        )
        yield gauge("cache_size_bytes", "Bytes held by the chunk cache", cache.used_bytes)
        yield gauge("cache_capacity_bytes", "Disk budget of the chunk cache", cache.capacity_bytes)
        yield counter("cache_evicted_bytes", "Bytes evicted from the cache", cache.evicted_bytes)
        yield counter("cache_evictions", "Chunks evicted from the cache", cache.evicted_chunks)
        yield gauge("open_files", "Files open through the mount", s.open_files)
        yield from _shared_tier(s.shared)
        yield gauge("origin_requests_in_flight", "GETs in progress", store.in_flight)
        if store.first_byte_floor is not None:
            yield gauge(
                "origin_first_byte_floor_seconds",
                "Least time to first byte of the last minutes' requests (the origin's distance)",
                store.first_byte_floor,
            )
        yield counter("prefetch_on_open_files", "Files fetched whole on open", s.prefetched_on_open)
        yield counter(
            "prefetch_ahead_of_open_files",
            "Files fetched whole before a loader opened them (the next model file)",
            s.fetched_ahead_of_open,
        )
        pre = s.preload
        if pre is not None:
            yield gauge("preload_bytes", "Bytes --preload is to fetch", pre.bytes)
            yield gauge(
                "preload_done_bytes", "Bytes of files --preload has finished", pre.bytes_done
            )
            yield gauge("preload_files", "Files --preload is to fetch", pre.files)
            yield gauge("preload_done_files", "Files --preload has finished", pre.files_done)
        snap = s.snapshot
        if snap is not None:
            yield gauge("snapshot_objects", "Objects pinned by the mount's snapshot", snap.objects)
            yield gauge(
                "snapshot_stale_objects",
                "Pinned objects found changed or gone at the origin (ESTALE)",
                snap.stale,
            )


def _shared_tier(t: TierStats | None) -> Iterator[Any]:
    """The shared cache tier's metrics (only when --shared-cache is set)."""
    if t is None:
        return
    for name, doc, value in (
        ("shared_hit_bytes", "Chunk bytes read from the shared cache tier", t.hit_bytes),
        ("shared_hits", "Chunks read from the shared cache tier", t.hits),
        ("shared_misses", "Chunks the shared cache tier did not have", t.misses),
        ("shared_corrupt", "Shared-tier objects that failed their checks", t.corrupt),
        ("shared_uploads", "Chunks uploaded to the shared cache tier", t.uploads),
        ("shared_upload_bytes", "Chunk bytes uploaded to the tier", t.upload_bytes),
        ("shared_uploads_dropped", "Uploads dropped: queue full", t.uploads_dropped),
        ("shared_upload_failures", "Uploads the tier refused", t.upload_failures),
        ("shared_leases_won", "Chunks this node fetched for others", t.leases_won),
        ("shared_lease_waits", "Chunks another node was fetching", t.lease_waits),
        ("shared_lease_wait_hits", "... that arrived in the tier", t.lease_wait_hits),
        ("shared_lease_timeouts", "... that did not arrive in time", t.lease_timeouts),
    ):
        yield CounterMetricFamily(f"modelfs_{name}", doc, value=value)
    errors = CounterMetricFamily(
        "modelfs_shared_errors", "Failed shared-tier requests, by kind", labels=["kind"]
    )
    for kind, n in sorted(t.errors.items()):
        errors.add_metric([kind], n)
    yield errors
    yield GaugeMetricFamily(
        "modelfs_shared_pending_uploads", "Chunks queued for the tier", value=t.pending_uploads
    )
    yield GaugeMetricFamily(
        "modelfs_shared_available",
        "1 while the tier is used, 0 while it is skipped after a failure",
        value=1 if t.available else 0,
    )


def make_registry(stats: StatsSource) -> CollectorRegistry:
    """The mount's metrics, the process's own (RSS, CPU seconds, open file
    descriptors: `process_*`, prometheus-client's collector) and
    `modelfs_build_info`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ModelfsCollector(stats))
    ProcessCollector(registry=registry)
    registry.register(_BuildInfo())
    return registry


class _BuildInfo(Collector):
    def collect(self) -> Iterator[Any]:
        import platform
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("modelfs")
        except PackageNotFoundError:
            ours = "unknown"
        info = GaugeMetricFamily(
            "modelfs_build_info",
            "Always 1; the labels say which modelfs and Python serve this mount",
            labels=["version", "python"],
        )
        info.add_metric([ours, platform.python_version()], 1)
        yield info
