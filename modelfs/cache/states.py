"""The states of chunks in this process: in flight (single flight per
chunk), storing (fetched, their payload write and commit pending), and
pinned by a read. One owner for the table of docs/chunk_cache.md, so
eviction and read-ahead ask one question each (`busy`, `ready`).

Touched only from the trio thread.
"""

from __future__ import annotations

import contextlib
import enum
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import trio

from .counters import ChunkKey
from .pool import BufferPool, Slab
from .slots import FetchSlots, Priority, Ticket


class ChunkState(enum.Enum):
    """What read-ahead needs to know of a chunk (`ChunkCache.chunk_state`)."""

    READY = "ready"  # in memory, or being loaded: nothing to do
    ON_DISK = "on disk"  # recorded in the index: a disk read away
    MISSING = "missing"  # to be fetched


@dataclass
class Flight:
    """One load of a chunk (from disk or a fetch), or an eviction."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    slab: Slab | None = None  # None: failed, cancelled, or an eviction
    fetched: bool = False  # the bytes came from the origin, not the disk
    waiters: int = 0  # readers waiting; each is handed a hold on the slab
    ticket: Ticket | None = None  # its place in the queue for a fetch slot

    def land(self, pool: BufferPool, slab: Slab | None) -> None:
        """End the flight: every waiter gets its own hold on `slab`."""
        self.slab = slab
        if slab is not None:
            for _ in range(self.waiters):
                pool.hold(slab)
        self.done.set()


class ChunkStates:
    def __init__(self, pool: BufferPool, slots: FetchSlots) -> None:
        self.pool = pool
        self.slots = slots
        self._flights: dict[ChunkKey, Flight] = {}
        # Fetched chunks whose payload write and commit are pending
        # (write-behind): readers take them from here, never from the origin
        # a second time. Each holds its slab.
        self._storing: dict[ChunkKey, Slab] = {}
        self._pins: Counter[ChunkKey] = Counter()

    # -- questions ---------------------------------------------------------
    def ready(self, key: ChunkKey) -> bool:
        """Being loaded or held in memory: nothing for read-ahead to do."""
        return key in self._flights or key in self.pool or key in self._storing

    def busy(self, key: ChunkKey) -> bool:
        """Not to be evicted: a read waits on it, it is being loaded, or its
        store is in progress (its record may be about to be written)."""
        return key in self._pins or key in self._flights or key in self._storing

    @property
    def storing_count(self) -> int:
        return len(self._storing)

    # -- flights -----------------------------------------------------------
    def flight(self, key: ChunkKey) -> Flight | None:
        return self._flights.get(key)

    def start(self, key: ChunkKey, ticket: Ticket | None = None) -> Flight:
        flight = self._flights[key] = Flight(ticket=ticket)
        return flight

    def end(self, key: ChunkKey) -> Flight:
        return self._flights.pop(key)

    def claim(self, keys: Iterable[ChunkKey]) -> dict[ChunkKey, Flight]:
        """Flights for an eviction: a reader that wants one of these chunks
        waits for it, then loads the chunk again."""
        return {key: self.start(key) for key in keys}

    def unclaim(self, flights: dict[ChunkKey, Flight]) -> None:
        for key, flight in flights.items():
            del self._flights[key]
            flight.done.set()

    async def join(self, flight: Flight, priority: Priority) -> tuple[Slab, bool] | None:
        """Wait for another task's load of the chunk: its slab (held for
        us) and whether it came from the origin, or None if it landed
        without one (to look again). A demand reader promotes a queued
        background fetch."""
        flight.waiters += 1
        if priority == Priority.DEMAND and flight.ticket is not None:
            self.slots.promote(flight.ticket)
        try:
            await flight.done.wait()
        except BaseException:
            if not flight.done.is_set():
                flight.waiters -= 1
            elif flight.slab is not None:
                self.pool.release(flight.slab)  # handed to us all the same
            raise
        if flight.slab is not None:
            return flight.slab, flight.fetched
        if flight.error is not None and not isinstance(flight.error, trio.Cancelled):
            raise flight.error
        return None

    # -- storing -----------------------------------------------------------
    def begin_store(self, key: ChunkKey, slab: Slab) -> None:
        """The chunk is fetched and published; its store starts. The caller's
        hold on the slab goes with it (released by `end_store`'s caller)."""
        self._storing[key] = slab

    def end_store(self, key: ChunkKey) -> None:
        del self._storing[key]

    def in_memory(self, key: ChunkKey) -> Slab | None:
        """The chunk's slab, held for the caller, if it is in RAM: cached,
        or fetched with its disk write not done yet."""
        slab = self.pool.get(key)
        if slab is None:
            slab = self._storing.get(key)
            if slab is not None:
                self.pool.hold(slab)
        return slab

    # -- pins --------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self, obj_id: bytes, chunks: range) -> Iterator[None]:
        keys = [(obj_id, n) for n in chunks]
        self._pins.update(keys)
        try:
            yield
        finally:
            self._pins.subtract(keys)
            for k in keys:
                if self._pins[k] <= 0:
                    del self._pins[k]
