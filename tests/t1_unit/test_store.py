"""Unit tier: the counters every store keeps (`modelfs.store`)."""

from __future__ import annotations

from modelfs import store
from modelfs.store import StoreCounters


def test_the_origins_distance_is_the_least_first_byte_of_the_window() -> None:
    c = StoreCounters()
    assert c.first_byte_floor(now=0.0) is None  # no GET yet: not known
    c.first_byte(0.004, now=0.0)  # one quiet GET ...
    for i in range(100):  # ... then many behind a queue, far more than 32
        c.first_byte(0.030, now=1.0 + i)
    # A near origin looks far behind a queue; a far one never looks near.
    assert c.first_byte_floor(now=101.0) == 0.004
    # Once the quiet GET is older than the window, the slow ones are the distance.
    assert c.first_byte_floor(now=store.FIRST_BYTE_WINDOW + 0.5) == 0.030
    assert c.first_byte_floor(now=1000.0) is None


def test_the_window_keeps_a_bounded_number_of_samples() -> None:
    c = StoreCounters()
    for i in range(store.FIRST_BYTE_SAMPLES + 10):
        c.first_byte(0.001 if i < 10 else 0.02, now=0.0)
    # The oldest went first: memory stays bounded on a busy mount.
    assert len(c.first_bytes) == store.FIRST_BYTE_SAMPLES
    assert c.first_byte_floor(now=0.0) == 0.02
