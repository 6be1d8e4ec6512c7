"""Fetch slots: how many GETs to the origin run at once, and who goes first.

Every fetch has a `Priority`, decided where the work starts: a reader
blocked on the bytes is `DEMAND`; read-ahead and prefetch on open are
`BACKGROUND`, and `--preload` is `PRELOAD`. A released slot goes to the
longest-waiting demand fetch, then to background ones, then to preload,
and is handed over directly, so it cannot be taken in between. A
background fetch that a reader starts waiting for is promoted
(`promote`): a reader never waits behind other readers' fetches for
bytes that were only queued as background work.
"""

from __future__ import annotations

import contextlib
import enum
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio


class Priority(enum.IntEnum):
    DEMAND = 0  # a reader is blocked on it
    BACKGROUND = 1  # read-ahead, prefetch on open
    PRELOAD = 2  # --preload: whatever nobody has asked for yet


@dataclass(eq=False)
class Ticket:
    """One fetch's place in the queue for a slot."""

    priority: Priority
    granted: bool = False
    event: trio.Event = field(default_factory=trio.Event)


class FetchSlots:
    def __init__(self, n: int) -> None:
        self.free = n
        self._queues: dict[Priority, deque[Ticket]] = {p: deque() for p in Priority}

    @contextlib.asynccontextmanager
    async def held(self, ticket: Ticket) -> AsyncIterator[None]:
        """Hold a slot for the block (waiting for one in `ticket`'s queue)."""
        await self.acquire(ticket)
        try:
            yield
        finally:
            self.release()

    def promote(self, ticket: Ticket) -> None:
        """A reader now waits for this fetch: it queues as DEMAND."""
        if ticket.priority == Priority.DEMAND:
            return
        queue = self._queues[ticket.priority]
        ticket.priority = Priority.DEMAND
        if ticket in queue:
            queue.remove(ticket)
            self._queues[Priority.DEMAND].append(ticket)

    async def acquire(self, ticket: Ticket) -> None:
        """Take a slot, waiting in `ticket`'s queue; `release` gives it back."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.free > 0:
            self.free -= 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._queues[ticket.priority].append(ticket)
        try:
            await ticket.event.wait()  # set by `_release`, which hands its slot over
        except BaseException:
            if ticket.granted:
                self.release()  # handed over as we were cancelled: pass it on
            else:
                self._queues[ticket.priority].remove(ticket)
            raise

    def release(self) -> None:
        for priority in Priority:
            queue = self._queues[priority]
            if queue:
                ticket = queue.popleft()
                ticket.granted = True
                ticket.event.set()
                return
        self.free += 1
