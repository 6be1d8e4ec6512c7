"""Human-readable output of ``modelfs stats`` and ``modelfs cache``.

Owns reading a running mount's counters (the ``user.modelfs.stats`` xattr
of its root) and turning them, and the cache commands' results, into text.
The work itself is in `modelfs.cache_admin`; the numbers in `modelfs.fs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import cache_admin
from .cache.index import ObjectEntry
from .config import default_cache_dir, format_size
from .errors import CacheError, MountError
from .humane import escape
from .mounts import files_under, mount_root
from .progress import byte_bar, percent


def read_stats(mnt: Path) -> dict[str, Any]:
    mnt = mount_root(mnt)  # the mountpoint, or any path inside the mount
    try:
        return dict(json.loads(os.getxattr(mnt, "user.modelfs.stats")))
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"{mnt} is a dead mount (its daemon is gone)") from None
        raise MountError(f"cannot read the counters of {mnt}: {exc.strerror}") from None


def _duration(seconds: float) -> str:
    s = int(seconds)
    parts = [(s // 86400, "d"), (s // 3600 % 24, "h"), (s // 60 % 60, "m"), (s % 60, "s")]
    out = "".join(f"{v}{u}" for v, u in parts if v)
    return out or "0s"


def render_stats(s: dict[str, Any]) -> str:
    store, cache, recent = s["store"], s["cache"], s.get("last_minute", {})
    served = cache["hit_bytes"] + cache["miss_bytes"]
    errors = sum(n for r, n in store["get_results"].items() if r != "ok")
    gets = sum(store["latency_counts"])
    mean_ms = 1000 * store["latency_sum"] / gets if gets else 0.0
    lines = [
        f"modelfs {s.get('source', '?')} on {s.get('mountpoint', '?')} "
        f"(pid {s.get('pid', '?')}, up {_duration(time.time() - s.get('started', time.time()))})",
        f"served     {format_size(served)} to readers, {percent(cache['hit_bytes'], served)} "
        f"from the cache; last minute {format_size(recent.get('served_bytes_per_s', 0))}/s",
        f"origin     {format_size(store['get_bytes'])} in {store['get_requests']} GETs "
        f"(mean {mean_ms:.0f} ms, {errors} failed, {store['retries']} retried), "
        f"{store['list_requests']} listings; "
        f"last minute {format_size(recent.get('origin_bytes_per_s', 0))}/s",
        f"prefetch   {format_size(cache['prefetch_fetched_bytes'])} fetched ahead: "
        f"{format_size(cache['prefetch_used_bytes'])} used, "
        f"{format_size(cache['prefetch_wasted_bytes'])} evicted unused, "
        f"{format_size(cache['prefetch_pending_bytes'])} not read yet",
        f"cache      {format_size(cache['used_bytes'])} of {format_size(cache['capacity_bytes'])} "
        f"({percent(cache['used_bytes'], cache['capacity_bytes'])}) in {s.get('cache_dir', '?')}: "
        f"{cache['chunks']} chunks of {cache['objects']} objects; "
        f"{cache['evicted_chunks']} chunks evicted, {cache['corrupt_chunks']} found corrupt",
        f"now        {s['open_files']} open files, {store['in_flight']} GETs in flight",
    ]
    snap = s.get("snapshot")
    if snap is not None:
        lines.append(
            f"snapshot   {snap['objects']} objects pinned as of {snap['taken']} "
            f"({snap['version_ids']} by VersionId), {snap['stale']} stale at the origin"
            + (f"; manifest {snap['manifest']}" if snap["manifest"] else "")
        )
    t = s.get("shared")
    if t is not None:
        errors = sum(t["errors"].values())
        herd = {True: "on", False: "off (no conditional writes)", None: "not probed yet"}
        lines.insert(
            3,
            f"shared     {format_size(t['hit_bytes'])} from the tier in {t['hits']} chunks, "
            f"{t['misses']} misses; {t['uploads']} uploaded, {t['pending_uploads']} queued, "
            f"{t['uploads_dropped']} dropped; {t['leases_won']} leases won, "
            f"{t['lease_waits']} waits; {t['corrupt']} corrupt, {errors} errors; "
            f"herd control {herd[t['herd_control']]}"
            + ("" if t["available"] else "; UNAVAILABLE, backing off"),
        )
    return "\n".join(lines)


def _root(args: argparse.Namespace) -> Path:
    root = (args.cache_dir or default_cache_dir()).absolute()
    if not root.is_dir():
        raise CacheError(f"cache directory {root} does not exist")
    return root


def object_url(meta: dict[str, object]) -> str:
    """s3://bucket/key of a cached object (just its key for entries an older
    modelfs recorded without the bucket)."""
    origin = meta.get("origin")
    return f"s3://{origin}" if origin else str(meta.get("key", "?"))


def _entry_json(e: ObjectEntry) -> dict[str, object]:
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


def _pin(paths: list[Path], pinned: bool) -> int:
    """`cache pin|unpin PATH...`: PATHs inside a mount name the objects; the
    mount's cache directory holds the pins."""
    from .cache.index import CacheIndex

    by_root: dict[Path, set[bytes]] = {}
    for path in paths:  # one mount (and its counters) per PATH, not per file
        root = Path(read_stats(path)["cache_dir"])
        by_root.setdefault(root, set()).update(
            bytes.fromhex(os.getxattr(f, "user.modelfs.object").decode())
            for f in files_under([path])
        )
    for root, ids in by_root.items():
        index = CacheIndex(root / "index")
        try:
            index.pin(ids, pinned)
        finally:
            index.close()
        print(f"{'pinned' if pinned else 'unpinned'} {len(ids)} files in the cache {root}")
    return 0


def cmd_cache(action: str, args: argparse.Namespace) -> int:
    if action in ("pin", "unpin"):
        return _pin(args.paths, action == "pin")
    root = _root(args)
    as_json = getattr(args, "json", False)
    if action == "ls":
        entries = cache_admin.ls(root)
        if as_json:
            print(json.dumps([_entry_json(e) for e in entries], indent=2))
            return 0
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
        return 0
    if action == "du":
        u = cache_admin.du(root)
        if as_json:
            print(json.dumps({"cache_dir": str(root), **dataclasses.asdict(u)}, indent=2))
            return 0
        print(f"cache      {root}")
        print(f"chunks     {format_size(u.used_bytes)} in {u.chunks} chunks of {u.objects} objects")
        print(
            f"on disk    {format_size(u.payload_disk_bytes + u.index_disk_bytes)} "
            f"(payload {format_size(u.payload_disk_bytes)}, "
            f"index {format_size(u.index_disk_bytes)})"
        )
        print(f"free       {format_size(u.fs_free_bytes)} on its filesystem")
        return 0
    if action == "verify":
        if as_json:
            checked, bad = cache_admin.verify(root)
        else:
            with byte_bar("verify", cache_admin.du(root).used_bytes) as bar:
                checked, bad = cache_admin.verify(root, bar.update)
        metas = {e.obj_id: e.meta for e in cache_admin.ls(root)} if bad else {}
        corrupt = []
        for v in bad:
            meta = metas.get(v.obj_id, {})
            start = v.chunk * int(meta.get("chunk_size", 0))  # type: ignore[call-overload]
            corrupt.append(
                {
                    "url": object_url(meta),
                    "etag": meta.get("etag"),
                    "chunk": v.chunk,
                    "start": start,
                    "end": start + v.length,
                    "object_id": v.obj_id.hex(),
                }
            )
        repaired = bool(bad) and args.repair
        if repaired:
            cache_admin.repair(root, bad)
        if as_json:
            print(
                json.dumps({"checked": checked, "corrupt": corrupt, "repaired": repaired}, indent=2)
            )
            return 1 if bad and not repaired else 0
        print(f"checked {checked} chunks: {len(bad)} corrupt")
        for c in corrupt[:20]:
            print(
                f"corrupt: {escape(str(c['url']))} bytes {c['start']}-{int(c['end']) - 1} "
                f"(chunk {c['chunk']}, etag {c['etag'] or '-'})"
            )
        if repaired:
            print(f"dropped {len(bad)} corrupt chunks; they are fetched again when read")
        elif bad:
            print("run 'modelfs cache verify --repair' to drop them", file=sys.stderr)
            return 1
        return 0
    if action in ("gc", "clear"):
        target = args.size if action == "gc" else 0
        chunks, nbytes = cache_admin.gc(root, target)
        print(
            f"evicted {chunks} chunks, {format_size(nbytes)}; "
            f"{format_size(cache_admin.du(root).used_bytes)} left"
        )
        return 0
    raise AssertionError(action)
