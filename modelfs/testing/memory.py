"""In-memory doubles of the object store and of the shared tier's bucket,
for unit tests of the layers above them (no server, no network).

`MemoryStore` follows S3's listing rules and enforces If-Match the way a
real server does; `MemoryTier` can ignore If-None-Match or be down.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence

from ..errors import EmptySource, EndpointUnreachable, NoSuchObject, ObjectChanged
from ..store import (
    Deliver,
    Listing,
    ObjectInfo,
    ObjectVersion,
    StoreCounters,
    Tree,
    empty_source_message,
)


class MemoryStore:
    """In-memory store with S3's listing and If-Match semantics, for unit tests."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, ObjectVersion]] = {}
        self.counters = StoreCounters()
        # (key, start, end) of each chunk-sized piece fetched, and of each
        # request (a coalesced GET is one request, several pieces).
        self.get_log: list[tuple[str, int, int]] = []
        self.requests: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()
        self._mtime = 1_700_000_000 * 10**9

    def put(self, key: str, data: bytes) -> ObjectVersion:
        with self._lock:
            self._mtime += 10**9
            version = ObjectVersion(
                f'"{hashlib.md5(data).hexdigest()}"', len(data), self._mtime, origin=f"mem/{key}"
            )
            self.objects[key] = (data, version)
            return version

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)

    def probe(self, prefix: str, *, allow_empty: bool = True) -> Listing | None:
        if not allow_empty and not any(k.startswith(prefix) for k in self.objects):
            raise EmptySource(empty_source_message("mem", prefix))
        return None

    def list_dir(self, prefix: str) -> Listing:
        self.counters.add_list()
        out = Listing()
        prefixes: set[str] = set()
        with self._lock:
            for key in sorted(self.objects):
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix) :]
                if "/" in rest:
                    prefixes.add(prefix + rest.split("/", 1)[0] + "/")
                else:
                    out.objects.append(ObjectInfo(key, self.objects[key][1]))
        out.prefixes = sorted(prefixes)
        return out

    def list_tree(self, prefix: str) -> Tree:
        self.counters.add_list()
        with self._lock:
            return Tree(
                [
                    ObjectInfo(k, v)
                    for k, (_, v) in sorted(self.objects.items())
                    if k.startswith(prefix)
                ],
                versioned=False,
            )

    def current(self, key: str) -> ObjectVersion | None:
        with self._lock:
            got = self.objects.get(key)
        return got[1] if got else None

    def _data(self, key: str, version: ObjectVersion, start: int, end: int) -> bytes:
        with self._lock:
            if key not in self.objects:
                raise NoSuchObject(f"{key}: no such key")
            data, current = self.objects[key]
            if current != version:
                raise ObjectChanged(f"{key}: object changed since it was opened")
            self.requests.append((key, start, end))
        self.counters.add_get(end - start)
        return data[start:end]

    def get_into(
        self,
        key: str,
        version: ObjectVersion,
        start: int,
        bufs: Sequence[memoryview],
        deliver: Deliver | None = None,
    ) -> None:
        end = start + sum(len(b) for b in bufs)
        data = self._data(key, version, start, end)
        off = 0
        for i, buf in enumerate(bufs):
            buf[:] = data[off : off + len(buf)]
            self.get_log.append((key, start + off, start + off + len(buf)))
            off += len(buf)
            if deliver is not None:
                deliver(i)


class SlowStore(MemoryStore):
    """A MemoryStore that holds every GET long enough for concurrent readers
    to pile up, and fails the next GET with `fail_next` if set."""

    def __init__(self, delay: float = 0.2) -> None:
        super().__init__()
        self.delay = delay
        self.fail_next: Exception | None = None

    def get_into(
        self,
        key: str,
        version: ObjectVersion,
        start: int,
        bufs: Sequence[memoryview],
        deliver: Deliver | None = None,
    ) -> None:
        time.sleep(self.delay)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        super().get_into(key, version, start, bufs, deliver)


class MemoryTier:
    """An in-memory tier for unit tests; `conditional=False` behaves like a
    store that ignores If-None-Match; `down` makes every call fail."""

    def __init__(self, *, conditional: bool = True) -> None:
        self.objects: dict[str, bytes] = {}
        self.conditional = conditional
        self.down = False
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _check(self, op: str, key: str) -> None:
        with self._lock:
            self.log.append((op, key))
        if self.down:
            raise EndpointUnreachable("tier down")

    def get(self, key: str) -> bytes | None:
        self._check("GET", key)
        with self._lock:
            return self.objects.get(key)

    def put(self, key: str, body: bytes, *, exclusive: bool = False) -> bool:
        self._check("PUT", key)
        with self._lock:
            if exclusive and self.conditional and key in self.objects:
                return False
            self.objects[key] = body
            return True

    def delete(self, key: str) -> None:
        self._check("DELETE", key)
        with self._lock:
            self.objects.pop(key, None)
