"""``--preload``: as soon as the mount answers, fetch in the background every
file a model loader will read, so the download runs while the model server
starts (vLLM spends many seconds before it opens its first shard).

Which files: those matching ``--prefetch-on-open``, and every small file
(at most SMALL_FILE: config, tokenizer, generation settings, which a
loader reads first), under the whole mount (a snapshot or manifest mount
walks its pinned listing, so it preloads exactly its pinned set), within
the cache's size. In which order: the small files; then the chunk holding
each safetensors file's header (a loader reads every header before any
tensor); then the model files whole, the shards of each ``*.index.json``
in the order its ``weight_map`` names them, then the others by name, each
in the loader's order (`OpenPrefetch`: header, then tensors by name).
Everything it fetches is `PRELOAD` work: demand reads, read-ahead and
prefetch on open all get fetch slots first, and a file a loader opens
while it is being preloaded is raised to prefetch-on-open priority.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass

import trio

from .cache import ChunkCache, Priority
from .errors import ModelfsError
from .namespace import ROOT_INODE, Namespace
from .prefetch import OpenPrefetch
from .stats import PreloadStats
from .store import ObjectVersion

log = logging.getLogger(__name__)

# Files fetched at once: two keep the link busy while one file's last runs
# finish (each file already fetches `fetch-concurrency / 2` chunks at once).
FILES_AT_ONCE = 2
INDEX_SUFFIX = ".index.json"
MAX_INDEX_BYTES = 64 << 20
# Files up to this size are preloaded whatever their name (configs,
# tokenizers): cheap, and a readiness probe (`warm --check`) waits for them.
SMALL_FILE = 16 << 20


@dataclass(frozen=True)
class _File:
    path: str  # relative to the mount root
    key: str
    version: ObjectVersion


def loader_order(files: list[_File], index_docs: dict[str, bytes]) -> list[_File]:
    """Files in the order a loader reads them: per directory, the shards
    each index names (in weight_map order), then the rest by path.
    `index_docs` maps an index file's path to its bytes (unparsable ones
    are ignored)."""
    by_path = {f.path: f for f in files}
    ordered: dict[str, _File] = {}
    for index_path in sorted(index_docs):
        try:
            weight_map = json.loads(index_docs[index_path]).get("weight_map", {})
            shards = [s for s in weight_map.values() if isinstance(s, str)]
        except (ValueError, AttributeError, RecursionError):
            continue
        base = posixpath.dirname(index_path)
        for shard in shards:
            f = by_path.get(posixpath.normpath(posixpath.join(base, shard)))
            if f is not None:
                ordered.setdefault(f.path, f)
    for f in sorted(files, key=lambda f: f.path):
        ordered.setdefault(f.path, f)
    return list(ordered.values())


class Preload:
    def __init__(
        self,
        ns: Namespace,
        cache: ChunkCache,
        prefetch: OpenPrefetch,
        *,
        chunk_size: int,
        patterns: tuple[str, ...],
    ) -> None:
        self.ns, self.cache, self.prefetch = ns, cache, prefetch
        self.chunk_size = chunk_size
        self.patterns = patterns
        self.state = "waiting"
        self.files = self.files_done = self.files_skipped = 0
        self.bytes = self.bytes_done = 0
        self.started = self.finished = 0.0

    def stats(self) -> PreloadStats:
        return PreloadStats(
            state=self.state,
            files=self.files,
            files_done=self.files_done,
            files_skipped=self.files_skipped,
            bytes=self.bytes,
            bytes_done=self.bytes_done,
            seconds=(self.finished or time.monotonic()) - self.started if self.started else 0.0,
        )

    async def run(self) -> None:
        self.started = time.monotonic()
        self.state = "listing"
        try:
            files, small, index_docs = await self._walk()
            chosen = self._within_cache(small + loader_order(files, index_docs))
            self.files = len(chosen)
            self.bytes = sum(f.version.size for f in chosen)
            self.state = "running"
            log.info(
                "preloading %d files (%d bytes)%s",
                self.files,
                self.bytes,
                f"; {self.files_skipped} left out: the cache cannot hold them"
                if self.files_skipped
                else "",
            )
            await self._headers(chosen)
            limit = trio.Semaphore(FILES_AT_ONCE)
            async with trio.open_nursery() as nursery:
                for f in chosen:
                    await limit.acquire()
                    nursery.start_soon(self._one, f, limit)
            self.state = "done"
            log.info(
                "preload done: %d files in %.1f s", self.files, time.monotonic() - self.started
            )
        except ModelfsError as exc:
            self.state = "failed"
            log.warning("preload stopped: %s", exc)
        finally:
            self.finished = time.monotonic()

    async def _walk(self) -> tuple[list[_File], list[_File], dict[str, bytes]]:
        """The files the patterns match, the other small files (by path), and
        the bytes of every index file (which are small files too)."""
        files: list[_File] = []
        small: list[_File] = []
        indexes: list[_File] = []
        pending: list[tuple[int, str]] = [(ROOT_INODE, "")]
        while pending:
            inode, where = pending.pop()
            for name_b, child in sorted((await self.ns.children(inode)).items()):
                name = name_b.decode("utf-8", "surrogateescape")
                if name in (".", ".."):
                    continue
                node = self.ns.get(child)
                path = posixpath.join(where, name)
                if node.is_dir:
                    pending.append((child, path))
                elif node.version is not None:
                    f = _File(path, node.key, node.version)
                    if self.prefetch.matches(name):
                        files.append(f)
                        continue
                    if name.endswith(INDEX_SUFFIX) and node.version.size <= MAX_INDEX_BYTES:
                        indexes.append(f)
                    if node.version.size <= SMALL_FILE:
                        small.append(f)
        docs = {f.path: await self._read_whole(f) for f in indexes}
        return files, sorted(small, key=lambda f: f.path), docs

    async def _read_whole(self, f: _File) -> bytes:
        obj = self.cache.open_object(f.key, f.version, self.chunk_size)
        try:
            return bytes(
                await self.cache.read(obj, 0, f.version.size, priority=Priority.BACKGROUND)
            )
        finally:
            self.cache.close_object(obj)

    def _within_cache(self, files: list[_File]) -> list[_File]:
        """The files that fit in the cache, in order; a file larger than
        half of it is left to read-ahead (as prefetch on open does)."""
        room = self.cache.capacity
        chosen = []
        for f in files:
            size = f.version.size
            if size == 0:
                continue
            if size > self.cache.capacity // 2 or size > room:
                self.files_skipped += 1
                continue
            room -= size
            chosen.append(f)
        return chosen

    async def _headers(self, files: list[_File]) -> None:
        """The first chunk of every safetensors file, where its header is:
        a loader opens every shard and reads its header first."""
        for f in files:
            if f.path.endswith(".safetensors"):
                obj = self.cache.open_object(f.key, f.version, self.chunk_size)
                try:
                    await self.cache.ensure(obj, 0, priority=Priority.PRELOAD)
                except ModelfsError as exc:
                    log.debug("preload of the header of %s failed: %s", f.path, exc)
                finally:
                    self.cache.close_object(obj)

    async def _one(self, f: _File, limit: trio.Semaphore) -> None:
        obj = self.cache.open_object(f.key, f.version, self.chunk_size)
        try:
            await self.prefetch.fetch_file(obj, posixpath.basename(f.path), Priority.PRELOAD)
            while self.prefetch.is_running(obj):  # a loader's open got there first
                await trio.sleep(0.05)
        finally:
            self.cache.close_object(obj)
            self.files_done += 1
            self.bytes_done += f.version.size
            limit.release()
