"""Progress of long work on stderr: a tqdm bar on a terminal, plain
periodic lines elsewhere (init containers, journald, CI logs).

Used by ``pull``, ``warm`` and ``cache verify``; owns nothing else.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .config import format_size


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def byte_bar(desc: str, total: int) -> Any:
    """Progress in bytes on stderr: a tqdm bar (rate, ETA) on a terminal;
    elsewhere (init containers, journald, CI logs) a plain line every
    PROGRESS_INTERVAL seconds and one at the end."""
    if not sys.stderr.isatty():
        return PlainProgress(desc, total)
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


PROGRESS_INTERVAL = 10.0  # seconds; MODELFS_PROGRESS_INTERVAL overrides it


class PlainProgress:
    """A progress bar's interface (`update`, `close`) as periodic log-style
    lines; `update` may be called from several threads."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.interval = float(os.environ.get("MODELFS_PROGRESS_INTERVAL", PROGRESS_INTERVAL))
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._line(now)

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-9)
        print(
            f"{self.desc}: {format_size(self.done)} of {format_size(self.total)} "
            f"({percent(self.done, self.total)}), {format_size(int(rate))}/s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        with self._lock:
            if self.done:
                self._line(time.monotonic())

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Progress = Callable[[int, int], Callable[[int], None]]


@contextlib.contextmanager
def files_progress(verb: str) -> Iterator[Progress]:
    """A `progress(files, total_bytes)` for pull and warm: it opens a byte
    bar and returns its update function; bars close on exit."""
    bars: list[Any] = []

    def start(files: int, total: int) -> Callable[[int], None]:
        bar = byte_bar(f"{verb} {files} files", total)
        bars.append(bar)
        update: Callable[[int], None] = bar.update
        return update

    try:
        yield start
    finally:
        for bar in bars:
            bar.close()
