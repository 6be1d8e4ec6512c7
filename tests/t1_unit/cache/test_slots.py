"""Unit tier: `modelfs.cache.slots`, fetch slots and who goes first."""

from __future__ import annotations

import trio

from modelfs.cache.slots import FetchSlots, Priority, Ticket


def _order(slots: FetchSlots, tickets: list[tuple[str, Ticket]], promote: str = "") -> list[str]:
    got: list[str] = []

    async def one(name: str, ticket: Ticket) -> None:
        async with slots.held(ticket):
            got.append(name)
            await trio.sleep(0.001)

    async def main() -> None:
        first = Ticket(Priority.DEMAND)
        await slots.acquire(first)  # the only slot: everyone below queues
        async with trio.open_nursery() as nursery:
            for name, ticket in tickets:
                nursery.start_soon(one, name, ticket)
                await trio.sleep(0.001)
            if promote:
                slots.promote(dict(tickets)[promote])
            slots.release()

    trio.run(main)
    return got


def test_a_released_slot_goes_to_the_oldest_demand_fetch_first() -> None:
    tickets = [
        ("bg1", Ticket(Priority.BACKGROUND)),
        ("d1", Ticket(Priority.DEMAND)),
        ("bg2", Ticket(Priority.BACKGROUND)),
        ("d2", Ticket(Priority.DEMAND)),
    ]
    assert _order(FetchSlots(1), tickets) == ["d1", "d2", "bg1", "bg2"]


def test_a_promoted_background_fetch_queues_as_demand() -> None:
    tickets = [
        ("d1", Ticket(Priority.DEMAND)),
        ("bg1", Ticket(Priority.BACKGROUND)),
        ("bg2", Ticket(Priority.BACKGROUND)),
    ]
    assert _order(FetchSlots(1), tickets, promote="bg2") == ["d1", "bg2", "bg1"]


def test_a_cancelled_waiter_passes_a_slot_on() -> None:
    slots = FetchSlots(1)

    async def main() -> None:
        await slots.acquire(Ticket(Priority.DEMAND))
        with trio.move_on_after(0.01):
            await slots.acquire(Ticket(Priority.DEMAND))  # queued, then cancelled
        slots.release()
        assert slots.free == 1  # not lost to the cancelled waiter

    trio.run(main)
