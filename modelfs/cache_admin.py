"""``modelfs cache ls|du|verify|gc|clear|pin|unpin``: managing a cache directory.

Owns the cache commands, which work whether or not a mount is using the
directory:

* inspection (``ls``, ``du``, the checking half of ``verify``) opens the
  LMDB index read-only and reads payload files directly; LMDB lets any
  number of readers run beside the daemon's writes;
* changes (``gc``, ``clear``, ``verify --repair``) open the cache as one
  more of its users and evict through the same code as a mount's LRU
  eviction, which locks each chunk's range first: a chunk a mount is
  fetching is skipped, and a mount that was about to read an evicted chunk
  from disk sees its checksum fail against the index and fetches it again.

A chunk evicted by a running daemon while ``verify`` reads it may look
corrupt for a moment; every failure is checked again against the index
before it is reported, so only chunks still recorded are reported.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .cache import disk
from .cache.directory import FORMAT_FILE, refuse_links
from .cache.index import CacheIndex, ObjectEntry, Victim
from .cache.maintenance import Maintenance, open_for_eviction
from .cache.payload import PayloadFile, PayloadStore
from .errors import CacheError
from .mounts import files_under, read_stats


def _require_cache(root: Path) -> None:
    if not (root / FORMAT_FILE).exists():
        raise CacheError(f"{root} is not a modelfs cache directory (no {FORMAT_FILE})")
    refuse_links(root)


def _index(root: Path) -> CacheIndex:
    _require_cache(root)
    return CacheIndex(root / "index", readonly=True)


def ls(root: Path) -> list[ObjectEntry]:
    index = _index(root)
    try:
        return sorted(index.objects(), key=lambda e: str(e.meta.get("key", "")))
    finally:
        index.close()


@dataclass
class Usage:
    used_bytes: int  # chunk bytes the index records
    chunks: int
    objects: int
    payload_disk_bytes: int  # blocks the payload files occupy
    index_disk_bytes: int
    fs_free_bytes: int


def du(root: Path) -> Usage:
    index = _index(root)
    try:
        st = index.stats()
    finally:
        index.close()
    files = PayloadStore(root, create=False)
    try:
        payload = sum(blocks * 512 for _, blocks in files.files())
    finally:
        files.close_all()
    idx = sum(p.lstat().st_blocks * 512 for p in (root / "index").iterdir())
    return Usage(
        st["used_bytes"],
        st["chunks"],
        st["objects"],
        payload,
        idx,
        shutil.disk_usage(root).free,
    )


def verify(root: Path, progress: Callable[[int], None] | None = None) -> tuple[int, list[Victim]]:
    """Check every cached chunk against its checksum.

    Returns (chunks checked, bad chunks). `progress` is called with the
    bytes of each chunk checked."""
    index = _index(root)
    payload = PayloadStore(root, create=False)
    # object id -> (payload file, chunk size), or None when the file is missing
    files: dict[bytes, tuple[PayloadFile, int] | None] = {}
    try:
        chunks = index.all_chunks()
        bad: list[Victim] = []
        for victim, digest in chunks:
            if victim.obj_id not in files:
                files[victim.obj_id] = _open_payload(payload, index, victim.obj_id)
            handle = files[victim.obj_id]
            if handle is None or not disk.chunk_ok(handle[0], victim, digest, handle[1]):
                rec = index.get(victim.obj_id, victim.chunk)
                # Still recorded with the same checksum: really corrupt, not
                # evicted by a running daemon while we read it.
                if rec is not None and rec.checksum == digest:
                    bad.append(victim)
            if progress:
                progress(victim.length)
        return len(chunks), bad
    finally:
        payload.close_all()
        index.close()


def _open_payload(
    payload: PayloadStore, index: CacheIndex, obj_id: bytes
) -> tuple[PayloadFile, int] | None:
    meta = index.object_meta(obj_id)
    if meta is None:
        return None
    try:
        pf = payload.acquire(obj_id, create=False)
    except FileNotFoundError:
        return None
    return pf, int(meta["chunk_size"])  # type: ignore[call-overload]


def _with_cache(root: Path, work: Callable[[Maintenance], Any]) -> Any:
    with open_for_eviction(root) as cache:
        return trio.run(work, cache)


def gc(root: Path, target: int) -> tuple[int, int]:
    """Evict least-recently-used chunks down to `target` bytes: (chunks, bytes)."""
    _require_cache(root)

    async def work(cache: Maintenance) -> tuple[int, int]:
        result = await cache.space.shrink_to(target)
        if cache.alone():
            _remove_orphans(cache.index, cache.payload)
        return result

    result: tuple[int, int] = _with_cache(root, work)
    return result


def _remove_orphans(index: CacheIndex, payload: PayloadStore) -> int:
    """Payload files no index record names (left by a crash mid-eviction, or
    emptied while another process used the cache). Only while no other
    process uses the cache: one may be about to store into such a file."""
    known = {e.obj_id.hex() for e in index.objects()}
    orphans = [name for name, _ in payload.files() if name not in known]
    for name in orphans:
        payload.remove_name(name)
    return len(orphans)


def repair(root: Path, bad: list[Victim]) -> None:
    """Drop chunks `verify` found corrupt; they are fetched again when read."""
    if not bad:
        return

    async def work(cache: Maintenance) -> None:
        await cache.space.drop(bad)

    _with_cache(root, work)


def object_url(meta: dict[str, object]) -> str:
    """s3://bucket/key of a cached object (just its key for entries an older
    modelfs recorded without the bucket)."""
    origin = meta.get("origin")
    return f"s3://{origin}" if origin else str(meta.get("key", "?"))


@dataclass(frozen=True)
class CorruptChunk:
    """A chunk that failed its checksum, named as a user can act on it."""

    url: str  # s3://bucket/key
    etag: str | None
    chunk: int
    start: int  # byte range in the object: [start, end)
    end: int
    object_id: str  # hex, as `cache ls --json` shows it


def describe(root: Path, bad: list[Victim]) -> list[CorruptChunk]:
    """`verify`'s corrupt chunks with their object's URL and byte range."""
    metas = {e.obj_id: e.meta for e in ls(root)} if bad else {}
    out = []
    for v in bad:
        meta = metas.get(v.obj_id, {})
        start = v.chunk * int(meta.get("chunk_size", 0))  # type: ignore[call-overload]
        etag = meta.get("etag")
        out.append(
            CorruptChunk(
                object_url(meta),
                str(etag) if etag else None,
                v.chunk,
                start,
                start + v.length,
                v.obj_id.hex(),
            )
        )
    return out


def pin_paths(paths: list[Path], pinned: bool) -> dict[Path, int]:
    """`cache pin|unpin PATH...`: PATHs inside a mount name the objects; the
    mount's cache directory holds the pins. Files (un)pinned per cache."""
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
    return {root: len(ids) for root, ids in by_root.items()}
