"""Everything the commands print: one-line summaries, tables and --json.

The commands (`modelfs.cli.<command>`) do their work through the layers,
which return results; each result is turned into text here, and only here.
Errors are printed by `modelfs.cli.main` (one line, ``modelfs: error: ...``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import format_size
from ..humane import escape, for_humans
from ..progress import percent
from ..stats import MountStats, SnapshotStats, TierStats
from ..store import FIRST_BYTE_WINDOW

if TYPE_CHECKING:
    # Types only: importing the layers (trio, lmdb) would slow every
    # command's start, `warm --check` as a readiness probe above all.
    from ..cache.index import ObjectEntry
    from ..cache_admin import CorruptChunk, Usage
    from ..pull import PullResult
    from ..snapshot import Difference, Snapshot
    from ..warm import WarmResult


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def error(text: str) -> None:
    print(f"modelfs: error: {for_humans(text)}", file=sys.stderr)


def notice(text: str) -> None:
    print(f"modelfs: {text}", file=sys.stderr)


# -- stats ----------------------------------------------------------------------
def stats(raw: dict[str, Any], as_json: bool) -> None:
    """`raw`: what the mount serves (`MountStats.to_json`), printed as is
    with --json."""
    if as_json:
        print(json.dumps(raw, indent=2, sort_keys=True))
    else:
        print(render_stats(MountStats.from_json(raw)))


def _duration(seconds: float) -> str:
    s = int(seconds)
    parts = [(s // 86400, "d"), (s // 3600 % 24, "h"), (s // 60 % 60, "m"), (s % 60, "s")]
    out = "".join(f"{v}{u}" for v, u in parts if v)
    return out or "0s"


def render_stats(s: MountStats) -> str:
    store, cache, recent = s.store, s.cache, s.last_minute
    served = cache.hit_bytes + cache.miss_bytes
    errors = sum(n for r, n in store.get_results.items() if r != "ok")
    gets = sum(store.latency_counts)
    mean_ms = 1000 * store.latency_sum / gets if gets else 0.0
    lines = [
        f"modelfs {s.source} on {s.mountpoint} "
        f"(pid {s.pid}, up {_duration(time.time() - (s.started or time.time()))})",
        f"served     {format_size(served)} to readers, {percent(cache.hit_bytes, served)} "
        f"from the cache; last minute {format_size(recent.get('served_bytes_per_s', 0))}/s",
        f"origin     {format_size(store.get_bytes)} in {store.get_requests} GETs "
        f"(mean {mean_ms:.0f} ms, {errors} failed, {store.retries} retried), "
        f"{store.list_requests} listings; "
        f"last minute {format_size(recent.get('origin_bytes_per_s', 0))}/s",
        f"distance   {_distance(store.first_byte_floor)}",
        f"prefetch   {format_size(cache.prefetch_fetched_bytes)} fetched ahead: "
        f"{format_size(cache.prefetch_used_bytes)} used, "
        f"{format_size(cache.prefetch_wasted_bytes)} evicted unused, "
        f"{format_size(cache.prefetch_pending_bytes)} not read yet; "
        f"{s.prefetched_on_open} files fetched whole on open, "
        f"{s.fetched_ahead_of_open} of them before their opening",
        f"cache      {format_size(cache.used_bytes)} of {format_size(cache.capacity_bytes)} "
        f"({percent(cache.used_bytes, cache.capacity_bytes)}) in {s.cache_dir}: "
        f"{cache.chunks} chunks of {cache.objects} objects; "
        f"{cache.evicted_chunks} chunks evicted, {cache.corrupt_chunks} found corrupt",
        f"now        {s.open_files} open files, {store.in_flight} GETs in flight",
    ]
    if s.snapshot is not None:
        lines.append(_snapshot_line(s.snapshot))
    if s.preload is not None:
        p = s.preload
        lines.append(
            f"preload    {p.state}: {p.files_done} of {p.files} files, "
            f"{format_size(p.bytes_done)} of {format_size(p.bytes)} in {p.seconds:.1f} s"
            + (f"; {p.files_skipped} left out (cache too small)" if p.files_skipped else "")
        )
    if s.shared is not None:
        lines.insert(3, _tier_line(s.shared))
    return "\n".join(lines)


def _distance(first_byte: float | None) -> str:
    if first_byte is None:
        return "not known yet (no request timed)"
    return (
        f"first byte in {first_byte * 1000:.1f} ms at the least "
        f"(requests of the last {FIRST_BYTE_WINDOW / 60:g} minutes)"
    )


def _snapshot_line(snap: SnapshotStats) -> str:
    return (
        f"snapshot   {snap.objects} objects pinned as of {snap.taken} "
        f"({snap.version_ids} by VersionId), {snap.stale} stale at the origin"
        + (f"; manifest {snap.manifest}" if snap.manifest else "")
    )


def _tier_line(t: TierStats) -> str:
    herd = {True: "on", False: "off (no conditional writes)", None: "not probed yet"}
    return (
        f"shared     {format_size(t.hit_bytes)} from the tier in {t.hits} chunks, "
        f"{t.misses} misses; {t.uploads} uploaded, {t.pending_uploads} queued, "
        f"{t.uploads_dropped} dropped; {t.leases_won} leases won, "
        f"{t.lease_waits} waits; {t.corrupt} corrupt, {sum(t.errors.values())} errors; "
        f"herd control {herd[t.herd_control]}"
        + ("" if t.available else "; UNAVAILABLE, backing off")
    )


# -- pull and warm ----------------------------------------------------------------
def pull(result: PullResult, as_json: bool) -> int:
    summary = (
        f"{len(result.written)} files written ({format_size(result.bytes_written)}), "
        f"{len(result.skipped)} up to date, {len(result.failed)} failed"
    )
    return _files_done(result, summary, list(result.failed.items()), as_json)


def warm(result: WarmResult, as_json: bool) -> int:
    summary = (
        f"{result.files} files: {result.already_cached} were cached already, "
        f"{format_size(result.bytes_read)} read into the cache, {len(result.failed)} failed"
    )
    return _files_done(result, summary, sorted(result.failed.items()), as_json)


def _files_done(
    result: PullResult | WarmResult, summary: str, failed: list[tuple[str, str]], as_json: bool
) -> int:
    """The result as JSON, or the summary and one error line per failed
    file; exit status 1 if any failed."""
    if as_json:
        _json(dataclasses.asdict(result))
    else:
        print(summary)
        for name, err in failed:
            error(f"{name}: {err}")
    return 1 if failed else 0


def warm_check(state: dict[str, Any], as_json: bool) -> int:
    missing = state["missing"]
    if as_json:
        _json({**state, "ready": not missing})
    else:
        print(f"{state['files']} files: {state['cached']} fully cached, {len(missing)} not")
        for m in missing[:20]:
            print(
                f"not cached: {escape(m['path'])} "
                f"({format_size(m['cached_bytes'])} of {format_size(m['size'])})"
            )
    return 1 if missing else 0


# -- cache --------------------------------------------------------------------------
def cache_ls(entries: list[ObjectEntry], as_json: bool) -> None:
    from ..cache_admin import object_url

    if as_json:
        _json([_entry_json(e) for e in entries])
        return
    print(f"{'CACHED':>10} {'SIZE':>10} {'%':>4}  {'LAST ACCESS':<19}  {'ETAG':<34}  OBJECT")
    for e in entries:
        size = int(e.meta.get("size", 0))  # type: ignore[call-overload]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.atime)) if e.atime else "-"
        print(
            f"{format_size(e.cached_bytes):>10} {format_size(size):>10} "
            f"{percent(e.cached_bytes, size):>4}  {when:<19}  "
            f"{str(e.meta.get('etag') or '-'):<34}  {escape(object_url(e.meta))}"
            + ("  (pinned)" if e.pinned else "")
        )


def _entry_json(e: ObjectEntry) -> dict[str, object]:
    from ..cache_admin import object_url

    return {
        "url": object_url(e.meta),
        "key": e.meta.get("key"),
        "etag": e.meta.get("etag"),
        "size": e.meta.get("size"),
        "cached_bytes": e.cached_bytes,
        "chunks": e.chunks,
        "last_access": e.atime,
        "pinned": e.pinned,
        "object_id": e.obj_id.hex(),
    }


def cache_du(root: Path, u: Usage, as_json: bool) -> None:
    if as_json:
        _json({"cache_dir": str(root), **dataclasses.asdict(u)})
        return
    print(f"cache      {root}")
    print(f"chunks     {format_size(u.used_bytes)} in {u.chunks} chunks of {u.objects} objects")
    print(
        f"on disk    {format_size(u.payload_disk_bytes + u.index_disk_bytes)} "
        f"(payload {format_size(u.payload_disk_bytes)}, "
        f"index {format_size(u.index_disk_bytes)})"
    )
    print(f"free       {format_size(u.fs_free_bytes)} on its filesystem")


def cache_verify(checked: int, corrupt: list[CorruptChunk], repaired: bool, as_json: bool) -> int:
    failed = 1 if corrupt and not repaired else 0
    if as_json:
        _json(
            {
                "checked": checked,
                "corrupt": [dataclasses.asdict(c) for c in corrupt],
                "repaired": repaired,
            }
        )
        return failed
    print(f"checked {checked} chunks: {len(corrupt)} corrupt")
    for c in corrupt[:20]:
        print(
            f"corrupt: {escape(c.url)} bytes {c.start}-{c.end - 1} "
            f"(chunk {c.chunk}, etag {c.etag or '-'})"
        )
    if repaired:
        print(f"dropped {len(corrupt)} corrupt chunks; they are fetched again when read")
    elif corrupt:
        print("run 'modelfs cache verify --repair' to drop them", file=sys.stderr)
    return failed


def cache_evicted(chunks: int, nbytes: int, left: int) -> None:
    print(f"evicted {chunks} chunks, {format_size(nbytes)}; {format_size(left)} left")


def cache_pins(counts: dict[Path, int], pinned: bool) -> None:
    for root, n in counts.items():
        print(f"{'pinned' if pinned else 'unpinned'} {n} files in the cache {root}")


# -- snapshot -----------------------------------------------------------------------
def snapshot_taken(snap: Snapshot) -> None:
    total = sum(o.version.size for o in snap.objects)
    pinned_by = "ETag and VersionId" if snap.versioned else "ETag (the bucket keeps no versions)"
    notice(
        f"snapshot of {snap.source}: {len(snap.objects)} objects, "
        f"{format_size(total)}, each pinned by {pinned_by}"
    )


def snapshot_check(pinned: Snapshot, diffs: list[Difference], as_json: bool) -> int:
    if as_json:
        _json([_difference_json(d) for d in diffs])
    else:
        for d in diffs:
            print(for_humans(d.describe(pinned.bucket)))
    n = len(pinned.objects)
    notice(
        f"{len(diffs)} of the keys under {pinned.source} differ from the manifest ({n} objects)"
        if diffs
        else f"{pinned.source} matches the manifest ({n} objects)"
    )
    return 1 if diffs else 0


def _difference_json(d: Difference) -> dict[str, Any]:
    def version(v: Any) -> dict[str, Any] | None:
        if v is None:
            return None
        return {"etag": v.etag, "size": v.size, "version_id": v.version_id}

    return {
        "key": d.key,
        "change": d.change,
        "manifest": version(d.pinned),
        "now": version(d.now),
        "pinned_readable": d.pinned_readable,
    }
