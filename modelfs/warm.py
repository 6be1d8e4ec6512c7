"""``modelfs warm PATH...``: fetch files inside a mount into its cache.

Owns choosing what to read and reading it. Files are read through the mount
itself, so the bytes land in the daemon's chunk cache by the same path as a
model loader's reads (single-flight, checksummed, read-ahead). Before and
after reading, the ``user.modelfs.cached`` xattr says how much of a file's
current version is cached: a file already complete is skipped without a
read, which makes a second run cost one xattr per file, and a file still
incomplete after its read (a cache smaller than the files) is reported.

Interrupting loses nothing: every chunk fetched is already in the cache.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import format_size
from .mounts import files_under

# How long `warm` waits for a file's cached bytes to stop growing.
SETTLE_SECONDS = 2.0
READ_SIZE = 8 << 20
TASK_SIZE = 64 << 20  # one worker reads this much of a file sequentially


@dataclass
class WarmResult:
    files: int = 0
    already_cached: int = 0
    bytes_read: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def cached_bytes(path: Path) -> int:
    return int(os.getxattr(path, "user.modelfs.cached"))


def _settled_cached_bytes(path: Path, size: int) -> int:
    """Cached bytes of `path` once the daemon's writes have landed: a chunk
    is served as soon as it arrives and written to disk just after, so the
    count may trail the read briefly. Waits while it still grows."""
    have = cached_bytes(path)
    deadline = time.monotonic() + SETTLE_SECONDS
    while have < size and time.monotonic() < deadline:
        time.sleep(0.05)
        now = cached_bytes(path)
        if now > have:
            deadline = time.monotonic() + SETTLE_SECONDS
        have = now
    return have


def _read_range(path: Path, start: int, end: int, progress: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        off = start
        while off < end:
            n = len(os.pread(fd, min(READ_SIZE, end - off), off))
            if n == 0:
                break
            progress(n)
            off += n
        # The point is the daemon's cache, not this host's page cache.
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(
    paths: list[Path],
    jobs: int = 8,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> WarmResult:
    result = WarmResult()
    todo: list[tuple[Path, int]] = []
    for f in files_under(paths):
        result.files += 1
        size = f.stat().st_size
        try:
            if cached_bytes(f) >= size:
                result.already_cached += 1
                continue
        except OSError as exc:
            result.failed[str(f)] = exc.strerror or str(exc)
            continue
        todo.append((f, size))
    on_bytes = progress(len(todo), sum(s for _, s in todo)) if progress else None

    def count(n: int) -> None:
        result.bytes_read += n  # int += is atomic enough under the GIL for a counter
        if on_bytes:
            on_bytes(n)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            pool.submit(_read_range, f, start, min(start + TASK_SIZE, size), count): f
            for f, size in todo
            for start in range(0, size, TASK_SIZE)
        }
        for fut in concurrent.futures.as_completed(futures):
            err = fut.exception()
            if err is not None:
                msg = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                result.failed.setdefault(str(futures[fut]), msg)
    for f, size in todo:
        if str(f) in result.failed:
            continue
        try:
            have = _settled_cached_bytes(f, size)
        except OSError as exc:
            result.failed[str(f)] = exc.strerror or str(exc)
            continue
        if have < size:
            result.failed[str(f)] = (
                f"only {format_size(have)} of {format_size(size)} stayed cached "
                "(is --cache-size smaller than the files?)"
            )
    return result


def check(paths: list[Path]) -> dict[str, object]:
    """Whether everything under `paths` is fully cached, reading nothing."""
    files, missing = 0, []
    for f in files_under(paths):
        files += 1
        size = f.stat().st_size
        have = cached_bytes(f)
        if have < size:
            missing.append({"path": str(f), "cached_bytes": have, "size": size})
    return {"files": files, "cached": files - len(missing), "missing": missing}
