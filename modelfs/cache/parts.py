"""The parts of one chunk cache, assembled in the order they depend on
each other (docs/chunk_cache.md, "Modules"): the directory and its
membership, the index and its writer, payload files, the buffer pool, fetch
slots, chunk states, the space budget, the disk side, open objects, the
fetcher and coalesced runs. `ChunkCache` is built on them; so is nothing
else, and none of them calls back up.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import format_size
from ..errors import CacheError
from ..store import ObjectStore
from . import directory
from .chunks import DiskChunks, Hook
from .counters import CacheCounters, PrefetchLedger, StorageWarning
from .fetcher import Fetcher, Tier
from .index import CacheIndex, open_index
from .objects import ObjectTable
from .payload import PayloadStore
from .pool import BufferPool
from .runs import Runs
from .slots import FetchSlots
from .space import SpaceBudget
from .states import ChunkStates
from .writer import IndexWriter


@dataclass
class CacheParts:
    member: directory.Membership
    index: CacheIndex
    payload: PayloadStore
    counters: CacheCounters
    ledger: PrefetchLedger
    warn: StorageWarning
    writer: IndexWriter
    pool: BufferPool
    slots: FetchSlots
    states: ChunkStates
    space: SpaceBudget
    chunks: DiskChunks
    objects: ObjectTable
    fetcher: Fetcher
    runs: Runs
    reserve: int  # pool slabs background work leaves idle for readers


def open_parts(
    root: Path,
    store: ObjectStore,
    *,
    capacity: int | None,
    min_free: int | None,
    fetch_concurrency: int,
    disk_concurrency: int,
    memory_cache: int,
    chunk_size: int,
    tier: Tier | None,
    before_commit: Hook | None,
) -> CacheParts:
    directory.claim(root)
    fs_size = shutil.disk_usage(root).total
    if min_free and min_free >= fs_size:
        raise CacheError(
            f"--min-free-space {format_size(min_free)} is more than the filesystem of "
            f"{root} holds ({format_size(fs_size)})"
        )
    member = directory.Membership(root)
    try:
        directory.check_format(root)
        index = open_index(root, member.alone)
        payload = PayloadStore(root)
    except OSError as exc:
        member.close()
        raise CacheError(f"cannot use cache directory {root}: {exc.strerror or exc}") from None
    except BaseException:
        member.close()
        raise
    finally:
        member.set_up()
    counters = CacheCounters()
    ledger = PrefetchLedger(counters)
    warn = StorageWarning(root)
    writer = IndexWriter(index, counters)
    min_free = min_free if min_free is not None else directory.default_min_free(root)
    if capacity is None:
        capacity = directory.default_capacity(root, writer.used, min_free)
    # Slabs are cut at the mount's chunk size; an object cached earlier
    # with a larger one is read through overflow slabs.
    pool = BufferPool(memory_cache, chunk_size)
    # Slabs background work leaves idle, so readers find one at once.
    reserve = min(4, len(pool.slabs) // 4)
    slots = FetchSlots(fetch_concurrency)
    states = ChunkStates(pool, slots)
    space = SpaceBudget(
        root,
        writer,
        payload,
        member.alone,
        counters,
        capacity=capacity,
        min_free=min_free,
        states=states,
        pool=pool,
        ledger=ledger,
    )
    chunks = DiskChunks(
        pool,
        index,
        writer,
        space,
        counters,
        warn,
        disk_concurrency=disk_concurrency,
        before_commit=before_commit,
    )
    objects = ObjectTable(index, payload, pool, warn)
    fetcher = Fetcher(store, pool, counters, tier=tier, fetch_concurrency=fetch_concurrency)
    runs = Runs(
        states,
        pool,
        slots,
        fetcher,
        chunks,
        counters,
        ledger,
        fetch_concurrency=fetch_concurrency,
        reserve=reserve,
    )
    return CacheParts(
        member,
        index,
        payload,
        counters,
        ledger,
        warn,
        writer,
        pool,
        slots,
        states,
        space,
        chunks,
        objects,
        fetcher,
        runs,
        reserve,
    )
