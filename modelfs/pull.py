"""``modelfs pull s3://BUCKET/PREFIX DIR``: a plain local copy, without FUSE.

Owns walking the prefix, deciding what is already up to date, and writing
files atomically. Bytes go through the same chunk cache as a mount (fetched
at most once, checksummed, kept across runs), so an interrupted pull resumes
from the chunks it already has, and a pull after a mount of the same model
reads from the cache instead of the bucket.

Compatible with the AIBrix downloader's bookkeeping: next to the files,
``DIR/.cache/s3/download/<relative path>.metadata`` holds the object's raw
ETag. A file whose size matches the object's and whose metadata file holds
its ETag is up to date and skipped, whichever tool wrote it; every file
written here gets its metadata file too.

The walk applies the mount's key rules (`namespace.level`), so a key such
as ``../x`` can never write outside DIR.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import assemble
from .cache import CachedObject, ChunkCache
from .config import MountConfig
from .errors import ModelfsError, single_domain_error
from .files import write_atomically
from .namespace import level
from .process import raise_fd_limit, tune_malloc
from .s3.origin import S3Store
from .snapshot import Snapshot
from .store import Listing, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

METADATA_DIR = Path(".cache/s3/download")
PART_SUFFIX = ".modelfs-part"  # a file being written; removed by the next pull if left
# Bytes of a file's name kept in its temporary name: 255, less the dots, the
# random part of mkstemp (8) and the longest suffix.
TEMP_NAME_ROOM = 255 - 2 - 8 - len(PART_SUFFIX) - 8


@dataclass
class PullResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes_written: int = 0


def metadata_path(dest: Path, rel: str) -> Path:
    return dest / METADATA_DIR / f"{rel}.metadata"


def walk(list_dir: Callable[[str], Listing], prefix: str) -> list[tuple[str, ObjectInfo]]:
    """(relative path, object) for every file under `prefix`, as a mount
    shows them (`namespace.level`: the same key rules)."""
    out: list[tuple[str, ObjectInfo]] = []
    pending = [prefix]
    while pending:
        dir_key = pending.pop()
        seen = level(dir_key, list_dir(dir_key))
        pending.extend(seen.dirs.values())
        out.extend((obj.key[len(prefix) :], obj) for obj in seen.files.values())
    return sorted(out, key=lambda item: item[0])


def collides(rel: str) -> bool:
    """Whether a file at `rel` would take the place of pull's own metadata
    (``.cache/s3/download/...``, or ``.cache``, ``.cache/s3`` and
    ``.cache/s3/download`` themselves): such a key is not copied, and is
    reported as not copied."""
    parts = Path(rel).parts
    own = METADATA_DIR.parts
    return parts[: len(own)] == own or parts == own[: len(parts)]


def up_to_date(dest: Path, rel: str, obj: ObjectInfo) -> bool:
    """Size and ETag match what is on disk (the AIBrix downloader's test)."""
    etag = obj.version.etag
    path = dest / rel
    try:
        if not etag or path.stat().st_size != obj.version.size:
            return False
        return metadata_path(dest, rel).read_text() == etag
    except OSError:
        return False


def _temp_prefix(name: str) -> str:
    """``.NAME.`` for a temporary file beside NAME, with NAME cut so the
    whole temporary name (random part and suffix added) fits in 255 bytes:
    a file name of 236-255 bytes must be copyable too."""
    raw = name.encode("utf-8", "surrogateescape")[:TEMP_NAME_ROOM]
    return "." + raw.decode("utf-8", "ignore") + "."


async def _copy(
    cache: ChunkCache, obj: CachedObject, fd: int, on_bytes: Callable[[int], None], concurrency: int
) -> None:
    """All chunks of `obj` into `fd` at their offsets, `concurrency` at a time."""
    limit = trio.Semaphore(concurrency)
    nchunks = -(-obj.size // obj.chunk_size)

    async def one(n: int) -> None:
        async with limit:
            start, end = obj.chunk_span(n)
            async with cache.view(obj, start, end - start) as data:
                await trio.to_thread.run_sync(os.pwrite, fd, data, start)
            on_bytes(end - start)

    try:
        async with trio.open_nursery() as nursery:
            for n in range(nchunks):
                nursery.start_soon(one, n)
    except BaseExceptionGroup as group:
        # Chunks fail together (403, 404, 412, the retry bound): one error
        # for the file, as a one-chunk copy would give, never a group.
        leaf = single_domain_error(group, (ModelfsError, OSError))
        if leaf is None:
            raise
        raise leaf from None


async def _pull_one(
    cache: ChunkCache,
    dest: Path,
    rel: str,
    info: ObjectInfo,
    chunk_size: int,
    concurrency: int,
    on_bytes: Callable[[int], None],
) -> None:
    path = dest / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise ModelfsError(f"{path} is a directory")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=PART_SUFFIX)
    try:
        os.ftruncate(fd, info.version.size)
        obj = cache.open_object(info.key, info.version, chunk_size)
        try:
            await _copy(cache, obj, fd, on_bytes, concurrency)
        finally:
            cache.close_object(obj)
        await trio.to_thread.run_sync(os.fsync, fd)
        os.fchmod(fd, 0o644)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    # Written after the file: a crash in between leaves a file without
    # metadata, which the next pull copies again (from the cache).
    meta = metadata_path(dest, rel)
    if len(meta.name.encode("utf-8", "surrogateescape")) > 255:
        return  # no room for AIBrix's ".metadata" name: the next pull copies it again
    if info.version.etag:
        meta.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(meta, info.version.etag.encode(), prefix=_temp_prefix(meta.name))
    else:
        meta.unlink(missing_ok=True)


def pull(
    cfg: MountConfig,
    dest: Path,
    *,
    force: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    store: ObjectStore | None = None,
    snapshot: Snapshot | None = None,
) -> PullResult:
    """Copy s3://cfg.source (or exactly the versions of `snapshot`, a
    manifest) into `dest`. `progress(files, total_bytes)` returns the
    callback fed with bytes as they are written."""
    tune_malloc()
    raise_fd_limit()
    store = store or S3Store(cfg.origin_settings(), cfg.source.bucket)
    store.probe(cfg.source.prefix, allow_empty=snapshot is not None)
    files = walk(snapshot.list_dir if snapshot else store.list_dir, cfg.source.prefix)
    result = PullResult()
    todo = []
    for rel, info in files:
        if collides(rel):
            result.failed[rel] = (
                f"not copied: {METADATA_DIR} is where pull keeps each file's ETag, "
                "and this key would take its place"
            )
        elif not force and up_to_date(dest, rel, info):
            result.skipped.append(rel)
        else:
            todo.append((rel, info))
    on_bytes = progress(len(todo), sum(i.version.size for _, i in todo)) if progress else None
    dest.mkdir(parents=True, exist_ok=True)
    for part in dest.rglob(f".*{PART_SUFFIX}"):  # left by a pull that was killed
        part.unlink(missing_ok=True)
    cache, tier = assemble.chunk_cache(cfg, store)

    def count(n: int) -> None:
        result.bytes_written += n
        if on_bytes:
            on_bytes(n)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            # Shared-tier uploads and recency; no write-behind: a Ctrl-C
            # must not lose chunks already fetched (the resumed pull reuses them).
            nursery.start_soon(functools.partial(cache.run_background, write_behind=False))
            for rel, info in todo:
                try:
                    await _pull_one(
                        cache, dest, rel, info, cfg.chunk_size, cfg.fetch_concurrency, count
                    )
                    result.written.append(rel)
                except (ModelfsError, OSError) as exc:
                    log.debug("pulling %s failed: %s", rel, exc)
                    result.failed[rel] = str(exc)
            await cache.settle(60)  # chunks written behind the copy reach the cache
            if tier is not None:
                await tier.drain()  # what this node fetched, others can read
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        cache.close()
    return result
