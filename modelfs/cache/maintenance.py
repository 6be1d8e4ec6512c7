"""A cache directory opened for eviction alone (``modelfs cache gc``,
``clear``, ``verify --repair``): one more user of the directory, with the
index writer and the space budget of a mount, and no origin, memory or
fetching at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from ..errors import CacheError
from . import directory
from .counters import CacheCounters
from .index import CacheIndex, open_index
from .payload import PayloadStore
from .space import SpaceBudget
from .writer import IndexWriter


@dataclass
class Maintenance:
    index: CacheIndex
    payload: PayloadStore
    space: SpaceBudget
    member: directory.Membership

    def alone(self) -> bool:
        """Whether no other process uses the directory."""
        return self.member.alone()


@contextlib.contextmanager
def open_for_eviction(root: Path) -> Iterator[Maintenance]:
    directory.claim(root)
    member = directory.Membership(root)
    try:
        try:
            directory.check_format(root)
            index = open_index(root, member.alone)
            payload = PayloadStore(root)
        except OSError as exc:
            raise CacheError(f"cannot use cache directory {root}: {exc.strerror or exc}") from None
        finally:
            member.set_up()
        try:
            counters = CacheCounters()
            writer = IndexWriter(index, counters)
            space = SpaceBudget(
                root, writer, payload, member.alone, counters, capacity=writer.used, min_free=0
            )
            yield Maintenance(index, payload, space, member)
        finally:
            payload.close_all()
            with contextlib.suppress(lmdb.Error):
                index.close()
    finally:
        member.close()
