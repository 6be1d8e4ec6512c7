"""Sequential read-ahead for one object version, shared by all its handles.

Several streams are tracked per object, because tensor-parallel ranks (and
several handles in one process) read the same file at different offsets.
A read continues a stream when it starts near where the stream left off:
mmap page faults arrive slightly out of order, so a skip of up to
`SEEK_TOLERANCE` either way keeps the stream. A stream's window starts at
`initial_window` and doubles with each read that lands inside what was
already read ahead, up to `max_window`. A stream that does not continue is
never read ahead for, so random access costs no extra fetches.

Read-ahead only asks the cache through `ChunkSource`, so prefetched bytes land in the
chunk cache (single-flight, never fetched twice) and are bounded by a
global budget of chunks in flight, which keeps memory bounded and leaves
room in the fetch pool for demand reads.

`OpenPrefetch` (below) is the other kind: whole model files fetched in the
background as soon as they are opened, in the order loaders read them.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .cache import Buffer, CachedObject, ChunkState, Priority
from .errors import ModelfsError

log = logging.getLogger(__name__)

SEEK_TOLERANCE = 4 << 20
MAX_STREAMS = 16

Spawn = Callable[..., Any]


class ChunkSource(Protocol):
    """All that read-ahead and prefetch on open use of the chunk cache
    (`ChunkCache` provides it): they never reach into its members."""

    @property
    def capacity(self) -> int: ...

    @property
    def memory_bytes(self) -> int: ...

    def chunk_state(self, obj: CachedObject, n: int) -> ChunkState: ...

    def run_length(self, obj: CachedObject) -> int: ...

    def origin_first_byte(self) -> float | None:
        """The origin's least recent time to first byte (None: not known)."""
        ...

    async def ensure_run(
        self,
        obj: CachedObject,
        chunks: list[int],
        priority: Priority = ...,
        arrived: Callable[[int], None] | None = None,
        wanted: Callable[[int], bool] | None = None,
    ) -> int:
        """Load consecutive chunks as background work; `arrived(n)` the
        moment chunk n is in memory, before it can be dropped from there;
        chunks `wanted` turns down when their turn comes are skipped."""
        ...

    async def read(
        self, obj: CachedObject, offset: int, size: int, *, priority: Priority = ...
    ) -> Buffer: ...

    def cached_bytes(self, obj: CachedObject) -> int:
        """Bytes of `obj` on disk (blocking: an index read)."""
        ...

    def hold(self, obj: CachedObject, n: int) -> Any:
        """A hold on chunk `n` in memory (None if it is not there), which
        keeps it from eviction until `let_go`."""
        ...

    def let_go(self, held: Any) -> None: ...

    def retain(self, obj: CachedObject) -> None: ...

    def close_object(self, obj: CachedObject) -> None: ...


@dataclass
class _Stream:
    next_off: int  # where the last read of the stream ended
    window: int
    ahead_until: int  # read-ahead has been issued up to here
    # Chunks past the disk limit below this were already looked up in the
    # index (and were on disk, or were fetched): not looked up again.
    scanned_until: int = 0
    last_used: int = 0
    progress: int = 0  # bytes consumed since the window last grew


# Prefetchers kept before those of closed objects are dropped.
PRUNE_AT = 64


class PrefetchBudget:
    """Chunks in flight for read-ahead, across every object of the mount."""

    def __init__(self, max_chunks: int) -> None:
        self.max_chunks = max_chunks
        self.in_flight = 0
        self.issued_chunks = 0


class ReadAhead:
    """Mount-wide read-ahead settings; hands out one Prefetcher per object."""

    def __init__(
        self,
        cache: ChunkSource,
        spawn: Spawn,
        *,
        max_chunks_in_flight: int,
        initial_window: int,
        max_window: int,
    ) -> None:
        self.cache = cache
        self.spawn = spawn
        self.budget = PrefetchBudget(max_chunks_in_flight)
        self.initial_window = initial_window
        self.max_window = max_window
        # One Prefetcher per open object version, shared by its handles;
        # kept here (not on the cache's object), dropped once the object
        # has no handle left.
        self._prefetchers: dict[bytes, Prefetcher] = {}

    def on_read(self, obj: CachedObject, off: int, size: int) -> None:
        if self.max_window <= 0:
            return
        p = self._prefetchers.get(obj.obj_id)
        if p is None or p.obj is not obj:
            if len(self._prefetchers) >= PRUNE_AT:
                self._prune()
            p = self._prefetchers[obj.obj_id] = Prefetcher(
                obj,
                self.cache,
                self.spawn,
                self.budget,
                initial_window=self.initial_window,
                max_window=self.max_window,
            )
        p.on_read(off, size)

    def _prune(self) -> None:
        for obj_id, p in list(self._prefetchers.items()):
            if p.obj.handles <= 0:
                del self._prefetchers[obj_id]

    def streams(self, obj: CachedObject) -> list[tuple[int, int]]:
        """(next offset, window) of each read stream of `obj` (for tests
        and debugging)."""
        p = self._prefetchers.get(obj.obj_id)
        if p is None or p.obj is not obj:
            return []
        return [(s.next_off, s.window) for s in p.streams]


class Prefetcher:
    def __init__(
        self,
        obj: CachedObject,
        cache: ChunkSource,
        spawn: Spawn,
        budget: PrefetchBudget,
        *,
        initial_window: int,
        max_window: int,
    ) -> None:
        self.obj = obj
        self.cache = cache
        self.spawn = spawn
        self.budget = budget
        self.initial_window = initial_window
        self.max_window = max_window
        self.streams: list[_Stream] = []
        self._clock = 0

    def on_read(self, off: int, size: int) -> None:
        """Record a demand read [off, off+size) and issue read-ahead for it."""
        self._clock += 1
        end = off + size
        stream = self._match(off)
        if stream is None:
            self._add(_Stream(end, self.initial_window, end, last_used=self._clock))
            return
        stream.last_used = self._clock
        if end > stream.next_off:
            stream.progress += end - stream.next_off
            stream.next_off = end
        # The window doubles each time the stream consumes half of it.
        if stream.progress >= stream.window // 2:
            stream.window = min(self.max_window, stream.window * 2)
            stream.progress = 0
        self._issue(stream)

    def _match(self, off: int) -> _Stream | None:
        best = None
        for s in self.streams:
            if s.next_off - SEEK_TOLERANCE <= off <= s.next_off + SEEK_TOLERANCE and (
                best is None or abs(s.next_off - off) < abs(best.next_off - off)
            ):
                best = s
        return best

    def _add(self, stream: _Stream) -> None:
        if len(self.streams) >= MAX_STREAMS:
            self.streams.remove(min(self.streams, key=lambda s: s.last_used))
        self.streams.append(stream)

    def _issue(self, stream: _Stream) -> None:
        cs = self.obj.chunk_size
        target = min(self.obj.size, stream.next_off + stream.window)
        first = max(stream.ahead_until, stream.next_off) // cs
        last = (target - 1) // cs
        # Chunks already on disk are loaded ahead into the memory cache; past
        # half of it they would push out nearer ones the reader has not got
        # to yet (each then read and checked twice), so they wait for the
        # reader to come closer, while origin fetches beyond them go on.
        disk_limit = stream.next_off + self.cache.memory_bytes // 2
        waiting = None  # the first chunk left for later
        run: list[int] = []  # consecutive chunks for one coalesced GET
        longest = self.cache.run_length(self.obj)
        n = first
        while n <= last and self.budget.in_flight < self.budget.max_chunks:
            state = self.cache.chunk_state(self.obj, n)
            if state is ChunkState.READY:
                self._start(run)
            elif n * cs >= disk_limit and n * cs < stream.scanned_until:
                # Looked up before: on disk (or it would be in flight by now).
                self._start(run)
                waiting = n if waiting is None else waiting
            elif state is ChunkState.ON_DISK:
                self._start(run)
                if n * cs >= disk_limit:
                    waiting = n if waiting is None else waiting
                else:
                    self.budget.in_flight += 1
                    self._start([n])
            else:
                run.append(n)
                self.budget.in_flight += 1
                if len(run) == longest:
                    self._start(run)
            n += 1
        self._start(run)
        stream.scanned_until = max(stream.scanned_until, n * cs)
        done = n if waiting is None else waiting
        stream.ahead_until = max(stream.ahead_until, min(self.obj.size, done * cs))

    def _start(self, run: list[int]) -> None:
        """Spawn the load of `run` (its chunks already counted in the budget
        by the caller) and empty it."""
        if not run:
            return
        chunks = list(run)
        run.clear()
        self.budget.issued_chunks += len(chunks)
        self.cache.retain(self.obj)  # the payload file stays open meanwhile
        self.spawn(self._fetch, chunks)

    async def _fetch(self, chunks: list[int]) -> None:
        try:
            await self.cache.ensure_run(self.obj, chunks)
        except ModelfsError as exc:
            # The demand read of these chunks will fetch them again and report.
            log.debug("read-ahead of chunks %s of %s failed: %s", chunks, self.obj.key, exc)
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("read-ahead of chunks %s of %s failed", chunks, self.obj.key)
        finally:
            self.budget.in_flight -= len(chunks)
            self.cache.close_object(self.obj)


def _runs(
    order: list[int], longest: Callable[[], int], stored: Callable[[int], bool]
) -> Iterator[list[int]]:
    """`order` cut into runs of consecutive chunks not yet stored, each at
    most `longest()` long (asked as each run begins); `stored` is asked
    lazily, as the runs are taken, so chunks stored meanwhile (a reader
    got there first) are skipped."""
    run: list[int] = []
    most = 0
    for n in order:
        if stored(n):
            continue
        if run and (n != run[-1] + 1 or len(run) == most):
            yield run
            run = []
        if not run:
            most = max(1, longest())
        run.append(n)
    if run:
        yield run


# -- prefetch on open ------------------------------------------------------
SAFETENSORS_MAX_HEADER = 100 << 20  # what the safetensors format itself allows
# A reader that reads nothing for this long while the whole-file fetch waits
# for it has stopped or reads only part of the file: the fetch goes on
# without a lead limit.
LEAD_STALL_SECONDS = 2.0
# An origin whose GETs answer within this (the least time to first byte of
# its recent GETs) is near: on the same host or network, where a request
# costs the server and the daemon CPU rather than time on the wire (the
# JuiceFS gateway on this host: 4-5 ms; S3 itself: tens of ms, AWS's
# guidance says 100-200). docs/benchmarks.md, "GET length and distance".
NEAR_ORIGIN_SECONDS = 0.010
# A file fetched ahead of its opening (the next model file in the directory)
# waits this long for a reader after its first lead's worth of chunks;
# nobody came: the fetch ends (what it fetched stays on disk).
OPEN_AHEAD_WAIT = 30.0

# The next model file after one, its object opened in the cache (the caller
# closes it), and how to find the one after it; None: no next file.
Upcoming = Callable[[], Awaitable["tuple[CachedObject, str, Upcoming] | None"]]


class _Lead:
    """How far a whole-file fetch has run ahead of the file's readers.

    Chunks fetched ahead of a reader are only worth their fetch if they are
    still in memory when it gets there; past the memory cache they are
    dropped after their disk write and read back from disk. So the fetch
    holds each chunk it fetched in memory until readers have read all of
    it, and waits while more than `limit` of them are unread.
    """

    def __init__(self, cache: ChunkSource, obj: CachedObject, *, unopened: bool = False) -> None:
        self.cache, self.obj = cache, obj
        self.limit = 0  # chunks; 0: no limit (not sized yet, or given up after a stall)
        self.stopped = False  # given up: the readers' own read-ahead takes over
        # Fetched ahead of its opening, and not read yet: it waits for its
        # first reader (OPEN_AHEAD_WAIT) rather than going on without one.
        self.unopened = unopened
        self.abandoned = False  # fetched ahead, and nobody came: the fetch ends
        self.ahead: set[int] = set()  # fetched by the prefetch, not yet read
        self.read: set[int] = set()  # read whole by readers
        # What was read so far of chunks not yet read whole: a chunk that
        # holds the end of one tensor and the start of another is read in
        # two visits, and must stay in memory for the second. Spans (start,
        # end in the file), merged: the same bytes may be asked for twice
        # (the kernel's readahead beside a reader's own read), and a sum of
        # sizes would call the chunk read whole before it is.
        self._partial: dict[int, list[tuple[int, int]]] = {}
        self.held: dict[int, Any] = {}  # ahead and in memory: kept there
        self._moved = trio.Event()

    def on_read(self, offset: int, size: int) -> None:
        self.unopened = False
        cs, end = self.obj.chunk_size, min(offset + size, self.obj.size)
        for n in range(offset // cs, (end - 1) // cs + 1):
            if n in self.read:
                continue
            spans = _merged(
                [*self._partial.get(n, ()), (max(offset, n * cs), min(end, (n + 1) * cs))]
            )
            if sum(e - s for s, e in spans) < min(cs, self.obj.size - n * cs):
                self._partial[n] = spans
                # Read in part (a page fault or a readahead window that
                # does not start on a chunk boundary): kept in memory for
                # the rest, also when the reader fetched it itself, not this
                # fetch. (The traces of the next-shard test had chunk-aligned
                # reads only; an mmap loader's need not be.)
                if self.limit and n not in self.held:
                    held = self.cache.hold(self.obj, n)
                    if held is not None:
                        self.held[n] = held
                continue
            self._partial.pop(n, None)
            self.read.add(n)
            self.ahead.discard(n)
            held = self.held.pop(n, None)
            if held is not None:
                self.cache.let_go(held)
        self._moved.set()
        self._moved = trio.Event()

    def unread(self, n: int) -> bool:
        """Whether chunk `n` is still to be read: the kernel's readahead
        (16 MiB) runs ahead of this lead, so a reader can get to a chunk of
        a run before the run's GET does, and then it is in memory or on
        disk already (loaded from disk again for nobody, in a trace of the
        next-shard test)."""
        return n not in self.read

    def fetching(self, run: list[int]) -> None:
        self.ahead.update(n for n in run if n not in self.read)

    def fetched(self, n: int) -> None:
        """Chunk `n` is in memory: kept there until it is read. Told as it
        arrives, not when its GET ends: between the end of the GET (its
        thread lets go of the slabs, which wakes fetches waiting for one)
        and this fetch's next step, another GET's slab could take it
        (`test_arrival_evict_race`)."""
        if self.limit and n in self.ahead and n not in self.held:
            held = self.cache.hold(self.obj, n)
            if held is not None:
                self.held[n] = held

    async def room(self, chunks: int) -> None:
        """Wait until `chunks` more fit in the lead, or the reader stalls
        (the fetch goes on without a limit), or nobody opens a file fetched
        ahead (`abandoned`: the fetch ends). An empty lead takes any run
        (one sized before the limit shrank must not wait for a stall)."""
        while self.limit and self.ahead and len(self.ahead) + chunks > self.limit:
            if not await self._readers_moved():
                if self.unopened:
                    self.abandoned = True
                    return
                self.stop()

    async def drained(self) -> None:
        """Wait until readers have read all that was fetched ahead, or stall."""
        while self.limit and self.ahead:
            if not await self._readers_moved():
                return

    async def _readers_moved(self) -> bool:
        """Wait for the next read (or a new limit); False if none came for
        LEAD_STALL_SECONDS (OPEN_AHEAD_WAIT while nobody has read a file
        fetched ahead of its opening)."""
        with trio.move_on_after(OPEN_AHEAD_WAIT if self.unopened else LEAD_STALL_SECONDS):
            await self._moved.wait()
            return True
        return False

    def resize(self, limit: int) -> None:
        """A new limit (other files' fetches began or ended); none for a
        lead not sized yet or given up (limit 0)."""
        if self.limit:
            self.limit = limit
            self._moved.set()
            self._moved = trio.Event()

    def stop(self) -> None:
        """No more limit, and nothing kept in memory for the reader."""
        self.limit = 0
        self.stopped = True
        for held in self.held.values():
            self.cache.let_go(held)
        self.held.clear()


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`spans` (start, end) as disjoint spans, in order."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def whole_file_get_length(longest: int, first_byte: float | None, limit: int | None) -> int:
    """Chunks per GET (at most `longest`) of a whole-file fetch from an
    origin answering in `first_byte` seconds (None: not known yet), paced
    by a lead of `limit` chunks (None: --preload, no reader to wait for).

    Far, the fetch needs several GETs in flight: on a link capped per
    connection one stream at a time is slow (behind 25 ms and 80 MiB/s per
    connection, --preload in one-chunk GETs: 322-326 MiB/s, in 32 MiB GETs
    211; a lead of two-chunk GETs: -22 %). Near, each request costs the
    server and the daemon CPU on the cores they share, so GETs are long:
    two fill a lead (four-chunk GETs on loopback: daemon -12 %, server -8 %
    CPU per GiB). Not known: as near for --preload, as far for a lead."""
    near = first_byte is not None and first_byte <= NEAR_ORIGIN_SECONDS
    if limit is None:
        return longest if near or first_byte is None else 1
    return max(1, min(longest, limit // 2 if near else limit // 8))


def safetensors_order(header: bytes, data_start: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges of a safetensors file in the order loaders touch them.

    vLLM and `safe_open` users call `get_tensor` for keys in sorted order, so
    the tensors come in name order, not file order. Returns (start, end)
    absolute offsets. The header is input from the bucket: a malformed one,
    or one naming bytes outside the object's `size`, gives [] (the caller
    falls back to sequential order).
    """
    try:
        meta = json.loads(header)
        spans = []
        for name in sorted(k for k in meta if k != "__metadata__"):
            begin, end = meta[name]["data_offsets"]
            if type(begin) is not int or type(end) is not int:
                return []  # 1e18 is a float; offsets are integers
            if not 0 <= begin <= end or data_start + end > size:
                return []
            spans.append((data_start + begin, data_start + end))
        return spans
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return []


def chunk_order(spans: list[tuple[int, int]], chunk_size: int, size: int) -> list[int]:
    """Every chunk of an object of `size` bytes, once each: first those under
    `spans`, in span order, then the rest in file order. Linear in spans
    plus chunks however the spans overlap: each chunk is visited once
    (`skip` jumps over runs already placed)."""
    nchunks = -(-size // chunk_size)
    skip = list(range(nchunks + 1))  # skip[n]: the first chunk >= n not yet placed

    def next_free(n: int) -> int:
        root = n
        while skip[root] != root:
            root = skip[root]
        while skip[n] != root:  # path compression
            skip[n], n = root, skip[n]
        return root

    order: list[int] = []
    for start, end in spans:
        first = min(start // chunk_size, nchunks - 1)
        last = min((max(end, start + 1) - 1) // chunk_size, nchunks - 1)
        n = next_free(first)
        while n <= last:
            order.append(n)
            skip[n] = n + 1
            n = next_free(n + 1)
    order += (n for n in range(nchunks) if skip[n] == n)
    return order


class OpenPrefetch:
    """Fetches whole model files in the background when they are opened.

    Matching files (fnmatch on the file name) are fetched chunk by chunk in
    the order a loader needs them: for safetensors the 8-byte length and the
    JSON header first, then the tensors in name order; other files from the
    start. Fetches are background work (`ChunkSource.ensure_run`): a reader
    waiting on data always gets the next fetch slot first. One file is
    fetched at most once at a time, and a file larger than half the cache
    is left to read-ahead rather than evicting itself. A file fetched
    because it was opened runs at most half the memory cache (shared by
    the files being fetched) ahead of its readers (`_Lead`), so what it
    fetched is still in memory when they read it; a --preload fetch
    (`fetch_file`) has no reader to wait for and fills the disk cache.
    """

    def __init__(
        self,
        cache: ChunkSource,
        spawn: Spawn,
        patterns: tuple[str, ...],
        *,
        concurrency: int,
    ) -> None:
        self.cache = cache
        self.spawn = spawn
        self.patterns = patterns
        self.concurrency = max(1, concurrency)
        # Files being fetched whole, with the priority their fetches take
        # now (a cell: a loader opening a file --preload is fetching raises
        # it to BACKGROUND, ahead of the rest of the preload).
        self._running: dict[bytes, list[Priority]] = {}
        self._leads: dict[bytes, _Lead] = {}
        # How to find the model file after each one being fetched.
        self._upcoming: dict[bytes, Upcoming] = {}
        self.started_files = 0
        self.files_ahead = 0  # files fetched ahead of their opening

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def on_open(self, obj: CachedObject, name: str, upcoming: Upcoming | None = None) -> None:
        """A reader opened `obj`; `upcoming` finds the model file that a
        loader opens after it (its fetch starts when this one's has been
        issued whole)."""
        running = self._running.get(obj.obj_id)
        if running is not None:
            running[0] = min(running[0], Priority.BACKGROUND)
            if upcoming is not None:
                self._upcoming.setdefault(obj.obj_id, upcoming)
            return
        if not self._wanted(obj, name):
            return
        self._running[obj.obj_id] = [Priority.BACKGROUND]
        self._leads[obj.obj_id] = _Lead(self.cache, obj)  # sized once its order is known
        if upcoming is not None:
            self._upcoming[obj.obj_id] = upcoming
        self.started_files += 1
        self.cache.retain(obj)  # the background fetch outlives the handle
        self.spawn(self._run, obj, name)

    def _wanted(self, obj: CachedObject, name: str) -> bool:
        return bool(
            self.patterns and 0 < obj.size <= self.cache.capacity // 2 and self.matches(name)
        )

    async def _fetch_ahead(self, upcoming: Upcoming) -> None:
        """Fetch the next model file before a loader opens it: a loader
        reads its shards one after another, and between two of them the
        link idled while the next one's header was fetched and ordered (a
        third of a cold read behind a 25 ms first byte). Its lead waits
        for a reader once it is full, and ends if none comes."""
        try:
            got = await upcoming()
        except ModelfsError as exc:
            log.debug("no file fetched ahead: %s", exc)
            return
        except Exception:
            # A guess at what comes next must never end the mount.
            log.exception("finding the file to fetch ahead failed")
            return
        if got is None:
            return
        obj, name, after = got
        if obj.obj_id in self._running or not self._wanted(obj, name):
            self.cache.close_object(obj)
            return
        self._running[obj.obj_id] = [Priority.BACKGROUND]
        self._leads[obj.obj_id] = _Lead(self.cache, obj, unopened=True)
        self._upcoming[obj.obj_id] = after
        self.files_ahead += 1
        log.debug("fetching %s ahead of its opening", obj.key)
        await self._run(obj, name)  # closes obj

    def _lead_limit(self, obj: CachedObject, leads: int) -> int:
        """Chunks of `obj` one of `leads` paced fetches may run ahead: half
        of memory, shared by the files being fetched for readers (their
        read-ahead stands aside meanwhile, see on_read)."""
        return max(1, self.cache.memory_bytes // obj.chunk_size // (2 * leads))

    def _size_leads(self) -> None:
        for lead in self._leads.values():
            lead.resize(self._lead_limit(lead.obj, len(self._leads)))

    def on_read(self, obj: CachedObject, offset: int, size: int) -> bool:
        """A reader has read `size` bytes at `offset` of `obj` (told after
        the read, with the bytes in memory). Returns `paces(obj)`."""
        lead = self._leads.get(obj.obj_id)
        if lead is None:
            return False
        if size > 0 and offset < obj.size:
            lead.on_read(offset, size)
        return not lead.stopped

    def paces(self, obj: CachedObject) -> bool:
        """Whether a whole-file fetch paced by its readers runs for `obj`
        (or is about to: it reads the header first). It is then their
        read-ahead, in the loader's order, and a second one in file order
        would fetch chunks that memory drops before the loader gets to them
        (read-ahead started on the header's reads fetched 4 chunks a
        name-order loader read only much later, from disk)."""
        lead = self._leads.get(obj.obj_id)
        return lead is not None and not lead.stopped

    def is_running(self, obj: CachedObject) -> bool:
        """Whether a whole-file fetch of `obj` is running."""
        return obj.obj_id in self._running

    async def fetch_file(self, obj: CachedObject, name: str, priority: Priority) -> bool:
        """Fetch a whole file now, at `priority` (--preload), in the same
        order and single flight as prefetch on open; False if a fetch of
        it is running already (that one finishes it)."""
        if obj.obj_id in self._running:
            return False
        self._running[obj.obj_id] = [priority]
        self.cache.retain(obj)
        await self._run(obj, name)
        return True

    async def _run(self, obj: CachedObject, name: str) -> None:
        try:
            if await trio.to_thread.run_sync(self.cache.cached_bytes, obj) >= obj.size:
                return
            order, head = await self._order(obj, name)
            lead = self._leads.get(obj.obj_id)
            if lead is not None:
                lead.limit = 1  # sized now, with the others
                self._size_leads()
                # The header's chunks were read before the lead had a size:
                # kept for the reader now, like any chunk fetched ahead (a
                # file fetched ahead of its opening found its first chunk
                # evicted by the time it was opened: read back from disk in
                # a trace of the next-shard test).
                first = list(range(-(-head // obj.chunk_size)))
                lead.fetching(first)
                for n in first:
                    lead.fetched(n)
            await self._fetch_in_order(obj, order, lead)
            if lead is not None and lead.abandoned:
                return
            log.debug("prefetched %s whole (%d chunks)", obj.key, len(order))
            if lead is not None:
                # Still the file's read-ahead, and still holding what it
                # fetched ahead, until the readers have read it: released
                # now, read-ahead in file order took over and read chunks
                # back from disk that the loader had read already.
                await lead.drained()
        except ModelfsError as exc:
            log.debug("prefetch of %s stopped: %s", obj.key, exc)
        except Exception:
            log.exception("prefetch of %s failed", obj.key)
        finally:
            del self._running[obj.obj_id]
            self._upcoming.pop(obj.obj_id, None)
            lead = self._leads.pop(obj.obj_id, None)
            if lead is not None:
                if lead.unopened:
                    log.debug("%s was fetched ahead and not opened", obj.key)
                lead.stop()
                self._size_leads()
            self.cache.close_object(obj)

    async def _fetch_in_order(
        self, obj: CachedObject, order: list[int], lead: _Lead | None
    ) -> None:
        """Fetch the chunks of `order` not stored yet, in runs, paced by
        `lead` (if any); once every run is issued, start the next model
        file's fetch (a lead's readers are a loader going through them)."""
        priority = self._running[obj.obj_id]
        alone = self._lead_limit(obj, 1) if lead is not None else None

        def longest() -> int:
            # Asked as each run begins, from the distance the origin's GETs
            # have shown so far (a fetch sized once at its start from a
            # mount's first, slow GETs went on in one-chunk GETs from the
            # gateway on this host: 43-110 GETs per GiB where 32 MiB GETs
            # make 36). By the lead this fetch has alone (a file fetched
            # ahead begins beside the end of the one before, with half of
            # it), at most the limit it has now, so that the run fits.
            n = whole_file_get_length(
                self.cache.run_length(obj), self.cache.origin_first_byte(), alone
            )
            return min(n, lead.limit) if lead is not None and lead.limit else n

        # Chunks in flight, whatever the length of the GETs carrying them.
        in_flight = trio.Semaphore(self.concurrency)
        async with trio.open_nursery() as nursery:
            stored = lambda n: self.cache.chunk_state(obj, n) is not ChunkState.MISSING  # noqa: E731
            for run in _runs(order, longest, stored):
                if lead is not None:
                    await lead.room(len(run))
                    if lead.abandoned:
                        return
                tokens = min(len(run), self.concurrency)
                for _ in range(tokens):  # the only acquirer: no deadlock
                    await in_flight.acquire()
                if lead is not None:
                    lead.fetching(run)
                nursery.start_soon(self._one, obj, run, in_flight, tokens, priority, lead)
            upcoming = self._upcoming.pop(obj.obj_id, None)
            if lead is not None and upcoming is not None and not lead.stopped:
                self.spawn(self._fetch_ahead, upcoming)

    async def _one(
        self,
        obj: CachedObject,
        run: list[int],
        in_flight: trio.Semaphore,
        tokens: int,
        priority: list[Priority],
        lead: _Lead | None,
    ) -> None:
        # A failed chunk never ends the mount: a reader that needs it fetches
        # it again and gets the error itself.
        try:
            if lead is None:
                await self.cache.ensure_run(obj, run, priority[0])
            else:
                await self.cache.ensure_run(obj, run, priority[0], lead.fetched, lead.unread)
        except ModelfsError as exc:
            log.debug("prefetch on open of chunks %s of %s failed: %s", run, obj.key, exc)
        finally:
            for _ in range(tokens):
                in_flight.release()

    async def _order(self, obj: CachedObject, name: str) -> tuple[list[int], int]:
        """The chunks of `obj` in the order a loader reads them, and how
        many bytes from the start were read to learn it (the header)."""
        header, head = b"", 0
        if name.endswith(".safetensors") and obj.size >= 8:
            (hlen,) = struct.unpack(
                "<Q", await self.cache.read(obj, 0, 8, priority=Priority.BACKGROUND)
            )
            head = 8
            if hlen <= min(SAFETENSORS_MAX_HEADER, obj.size - 8):
                header = bytes(await self.cache.read(obj, 8, hlen, priority=Priority.BACKGROUND))
                head += hlen
        # Parsing up to 100 MiB of JSON and ordering every chunk of the
        # object must not stall the trio thread, which answers every FUSE
        # request of the mount.
        order = await trio.to_thread.run_sync(_open_order, header, obj.size, obj.chunk_size)
        return order, head


def _open_order(header: bytes, size: int, chunk_size: int) -> list[int]:
    spans: list[tuple[int, int]] = []
    if header:
        data_start = 8 + len(header)
        spans = [(0, data_start), *safetensors_order(header, data_start, size)]
    return chunk_order(spans, chunk_size, size)
