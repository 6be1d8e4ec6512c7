"""The LMDB index of the chunk cache: which chunks are on disk, and their LRU order.

Owns five named databases inside ``<cache-dir>/index``:

``meta``     format version, bytes in use, the LRU clock.
``objects``  object id (16 bytes) -> JSON {etag, size, mtime_ns, chunk_size, key}.
``chunks``   object id + chunk number (u64 BE) -> length, xxh3-64, LRU tick.
``lru``      LRU tick (u64 BE) + object id + chunk number -> b"" (oldest first).
``atime``    object id -> last access, Unix seconds (u64), for ``modelfs cache ls``.
             Added without a format change: a cache without it shows "-".

The object id is a hash of (ETag, size), see `ObjectVersion.identity`, so two
keys holding the same content share chunks and a new version never sees the
old one's. All methods are blocking and run in worker threads; LMDB
serialises writers itself, across processes too (several mounts may share
one cache directory). Reads never write: recency is recorded by `touch`,
which the chunk cache batches.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from ..errors import CacheError, CacheFormatError, IndexDamaged
from .directory import index_damage

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
_CKEY = struct.Struct(">16sQ")
_CREC = struct.Struct("<IQQ")
_LKEY = struct.Struct(">Q16sQ")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class ChunkRecord:
    length: int
    checksum: int
    tick: int


@dataclass(frozen=True)
class NewChunk:
    """A chunk written to its payload file, to be recorded."""

    obj_id: bytes
    chunk: int
    length: int
    checksum: int
    meta: bytes  # the object's record, written with its first chunk
    chunk_size: int


@dataclass(frozen=True)
class Victim:
    obj_id: bytes
    chunk: int
    length: int


@dataclass(frozen=True)
class ObjectEntry:
    obj_id: bytes
    meta: dict[str, object]
    cached_bytes: int
    chunks: int
    atime: int | None
    pinned: bool = False


class _Envs:
    """LMDB environments open in this process, one per index path.

    LMDB forbids opening one environment twice in a process (closing one
    copy would drop the other's file locks), but two users of one cache
    directory may live in one process (a test, or ``modelfs cache`` beside
    a cache it opened): they share the environment, counted."""

    _open: dict[str, tuple[lmdb.Environment, int, threading.Lock]] = {}
    _lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, **kwargs: Any) -> tuple[lmdb.Environment, threading.Lock]:
        """The environment and its writer lock: py-lmdb refuses a second
        write transaction on one environment while another thread holds
        one (EBUSY) instead of waiting, so users that share it take turns."""
        key = os.path.realpath(path)
        with cls._lock:
            env, refs, writer = cls._open.get(key, (None, 0, threading.Lock()))
            if env is None:
                env = lmdb.open(str(path), **kwargs)
            elif env.flags()["readonly"] and not kwargs.get("readonly"):
                raise lmdb.Error(f"{path} is open read-only in this process")
            cls._open[key] = (env, refs + 1, writer)
            return env, writer

    @classmethod
    def close(cls, env: lmdb.Environment) -> None:
        with cls._lock:
            key = next(k for k, (e, _, _) in cls._open.items() if e is env)
            _, refs, writer = cls._open[key]
            if refs > 1:
                cls._open[key] = (env, refs - 1, writer)
                return
            del cls._open[key]
            if not env.flags()["readonly"]:
                env.sync(True)
            env.close()


class CacheIndex:
    def __init__(self, path: Path, map_size: int = 4 << 30, *, readonly: bool = False) -> None:
        """`readonly` opens an index another process may be writing (LMDB
        allows any number of readers beside one writer): for inspection."""
        if not readonly:
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise CacheError(
                    f"cannot create cache index {path}: {exc.strerror or exc}"
                ) from None
        damage = index_damage(path)
        if damage is not None:
            hint = "; `modelfs cache clear` sets it aside" if readonly else ""
            raise IndexDamaged(f"cache index {path} is damaged: {damage}{hint}")
        try:
            # metasync=False: one fsync per commit instead of two. A system
            # crash may lose the last commits but never corrupts the index;
            # a lost record only means a chunk is fetched again.
            self.env, self._writer = _Envs.open(
                path,
                max_dbs=8,
                map_size=map_size,
                metasync=False,
                readahead=False,
                readonly=readonly,
                create=not readonly,
                mode=0o600,  # the cache names what a node reads: owner only
            )
            self._meta = self.env.open_db(b"meta", create=not readonly)
            self._objects = self.env.open_db(b"objects", create=not readonly)
            self._chunks = self.env.open_db(b"chunks", create=not readonly)
            self._lru = self.env.open_db(b"lru", create=not readonly)
            # Free reader slots a killed process left (several share the index).
            self.env.reader_check()
        except (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError) as exc:
            raise IndexDamaged(f"cache index {path} is damaged: {exc}") from None
        except lmdb.Error as exc:
            raise CacheError(f"cannot open cache index {path}: {exc}") from None
        try:
            self._check_format(path, readonly)
            self._walk()
        except lmdb.Error as exc:
            _Envs.close(self.env)
            raise IndexDamaged(f"cache index {path} is damaged: {exc}") from None
        except BaseException:
            _Envs.close(self.env)
            raise

    def _walk(self) -> None:
        """Read every record once: a garbled page fails here, at open, with
        an lmdb error, rather than in the middle of serving reads."""
        with self.env.begin() as txn:
            for db in (self._meta, self._objects, self._chunks, self._lru, self._atime, self._pins):
                if db is None:
                    continue
                for _ in txn.cursor(db=db).iternext(keys=True, values=True):
                    pass

    def _check_format(self, path: Path, readonly: bool) -> None:
        try:
            self._atime: Any = self.env.open_db(b"atime", create=not readonly)
        except lmdb.NotFoundError:
            self._atime = None  # an index written before `atime` existed, read-only
        try:
            # Object ids never evicted (`modelfs cache pin`).
            self._pins: Any = self.env.open_db(b"pins", create=not readonly)
        except lmdb.NotFoundError:
            self._pins = None  # nothing was ever pinned, read-only
        if readonly:
            with self.env.begin() as txn:
                fmt = txn.get(b"format", db=self._meta)
            if fmt != str(INDEX_FORMAT).encode():
                raise CacheFormatError(f"cache index {path} has an unknown format")
            return
        with self._writer, self.env.begin(write=True) as txn:
            fmt = txn.get(b"format", db=self._meta)
            if fmt is None:
                txn.put(b"format", str(INDEX_FORMAT).encode(), db=self._meta)
            elif fmt != str(INDEX_FORMAT).encode():
                raise CacheFormatError(
                    f"cache index {path} has format {fmt.decode(errors='replace')}, "
                    f"this modelfs reads format {INDEX_FORMAT}; use another --cache-dir"
                )

    def close(self) -> None:
        _Envs.close(self.env)

    # -- helpers (inside a transaction) ----------------------------------
    def _u64(self, txn: lmdb.Transaction, key: bytes) -> int:
        raw = txn.get(key, db=self._meta)
        return _U64.unpack(raw)[0] if raw else 0

    def _next_tick(self, txn: lmdb.Transaction) -> int:
        tick = self._u64(txn, b"tick") + 1
        txn.put(b"tick", _U64.pack(tick), db=self._meta)
        return tick

    def _add_used(self, txn: lmdb.Transaction, delta: int) -> None:
        txn.put(b"used", _U64.pack(max(0, self._u64(txn, b"used") + delta)), db=self._meta)

    # -- queries ---------------------------------------------------------
    def used(self) -> int:
        with self.env.begin() as txn:
            return self._u64(txn, b"used")

    def get(self, obj_id: bytes, chunk: int) -> ChunkRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(_CKEY.pack(obj_id, chunk), db=self._chunks)
        return ChunkRecord(*_CREC.unpack(raw)) if raw else None

    def object_meta(self, obj_id: bytes) -> dict[str, object] | None:
        with self.env.begin() as txn:
            raw = txn.get(obj_id, db=self._objects)
        return json.loads(raw) if raw else None

    def _sum_chunks(self, txn: lmdb.Transaction, obj_id: bytes) -> tuple[int, int]:
        """(bytes, chunks) cached for one object."""
        total = n = 0
        cur = txn.cursor(db=self._chunks)
        if cur.set_range(obj_id):
            for key, rec in cur:
                if key[:16] != obj_id:
                    break
                total += _CREC.unpack(rec)[0]
                n += 1
        return total, n

    def cached_bytes(self, obj_id: bytes) -> int:
        with self.env.begin() as txn:
            return self._sum_chunks(txn, obj_id)[0]

    def stats(self) -> dict[str, int]:
        with self.env.begin() as txn:
            return {
                "used_bytes": self._u64(txn, b"used"),
                "chunks": txn.stat(self._chunks)["entries"],
                "objects": txn.stat(self._objects)["entries"],
            }

    # -- updates ---------------------------------------------------------
    def put(
        self, obj_id: bytes, chunk: int, length: int, checksum: int, meta: bytes, chunk_size: int
    ) -> bool:
        """Record a chunk whose bytes are already written to the payload file.

        False (nothing recorded) when the object is recorded with another
        chunk size: a process that opened the object at the same moment as
        another, with another --chunk-size, cut its chunks differently."""
        return self.put_many([NewChunk(obj_id, chunk, length, checksum, meta, chunk_size)])[0][0]

    def put_many(self, chunks: Sequence[NewChunk]) -> tuple[list[bool], int]:
        """`put` for several chunks in one transaction (one commit, one
        fdatasync); returns whether each was recorded, and the cache's
        used bytes after the commit."""
        results = []
        with self._writer, self.env.begin(write=True) as txn:
            for c in chunks:
                results.append(self._put(txn, c))
            used = self._u64(txn, b"used")
        return results, used

    def _put(self, txn: lmdb.Transaction, c: NewChunk) -> bool:
        ckey = _CKEY.pack(c.obj_id, c.chunk)
        known = txn.get(c.obj_id, db=self._objects)
        if known is None:
            txn.put(c.obj_id, c.meta, db=self._objects)
        elif json.loads(bytes(known))["chunk_size"] != c.chunk_size:
            return False
        old = txn.get(ckey, db=self._chunks)
        if old:
            rec = ChunkRecord(*_CREC.unpack(old))
            txn.delete(_LKEY.pack(rec.tick, c.obj_id, c.chunk), db=self._lru)
            self._add_used(txn, -rec.length)
        tick = self._next_tick(txn)
        txn.put(ckey, _CREC.pack(c.length, c.checksum, tick), db=self._chunks)
        txn.put(_LKEY.pack(tick, c.obj_id, c.chunk), b"", db=self._lru)
        self._add_used(txn, c.length)
        txn.put(c.obj_id, _U64.pack(int(time.time())), db=self._atime)
        return True

    def touch(self, keys: Iterable[tuple[bytes, int]]) -> None:
        """Move chunks to the most-recently-used end (absent ones are skipped)."""
        now = _U64.pack(int(time.time()))
        with self._writer, self.env.begin(write=True) as txn:
            for obj_id, chunk in keys:
                ckey = _CKEY.pack(obj_id, chunk)
                raw = txn.get(ckey, db=self._chunks)
                if raw is None:
                    continue
                txn.put(obj_id, now, db=self._atime)
                rec = ChunkRecord(*_CREC.unpack(raw))
                txn.delete(_LKEY.pack(rec.tick, obj_id, chunk), db=self._lru)
                tick = self._next_tick(txn)
                txn.put(ckey, _CREC.pack(rec.length, rec.checksum, tick), db=self._chunks)
                txn.put(_LKEY.pack(tick, obj_id, chunk), b"", db=self._lru)

    def pin(self, obj_ids: Iterable[bytes], pinned: bool = True) -> None:
        """Keep these objects' chunks out of eviction (or, not `pinned`, no
        longer). Corrupt chunks are still dropped by `verify --repair`."""
        with self._writer, self.env.begin(write=True) as txn:
            for obj_id in obj_ids:
                if pinned:
                    txn.put(obj_id, b"", db=self._pins)
                else:
                    txn.delete(obj_id, db=self._pins)

    def pinned(self) -> set[bytes]:
        if self._pins is None:
            return set()
        with self.env.begin() as txn:
            return set(txn.cursor(db=self._pins).iternext(keys=True, values=False))

    def oldest(self, limit_bytes: int) -> list[Victim]:
        """Least-recently-used chunks, oldest first, until `limit_bytes` are
        covered; chunks of pinned objects are never among them."""
        out: list[Victim] = []
        total = 0
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._lru)
            for key in cur.iternext(values=False):
                _, obj_id, chunk = _LKEY.unpack(key)
                if self._pins is not None and txn.get(obj_id, db=self._pins) is not None:
                    continue
                raw = txn.get(_CKEY.pack(obj_id, chunk), db=self._chunks)
                if raw is None:  # pragma: no cover - index invariant
                    continue
                length = _CREC.unpack(raw)[0]
                out.append(Victim(obj_id, chunk, length))
                total += length
                if total >= limit_bytes:
                    break
        return out

    def remove(self, victims: Iterable[Victim]) -> list[bytes]:
        """Forget chunks; returns the object ids left with no chunk at all."""
        touched: set[bytes] = set()
        with self._writer, self.env.begin(write=True) as txn:
            for v in victims:
                ckey = _CKEY.pack(v.obj_id, v.chunk)
                raw = txn.get(ckey, db=self._chunks)
                if raw is None:
                    continue
                rec = ChunkRecord(*_CREC.unpack(raw))
                txn.delete(ckey, db=self._chunks)
                txn.delete(_LKEY.pack(rec.tick, v.obj_id, v.chunk), db=self._lru)
                self._add_used(txn, -rec.length)
                touched.add(v.obj_id)
            empty = []
            cur = txn.cursor(db=self._chunks)
            for obj_id in touched:
                if not cur.set_range(obj_id) or cur.key()[:16] != obj_id:
                    txn.delete(obj_id, db=self._objects)
                    txn.delete(obj_id, db=self._atime)
                    empty.append(obj_id)
        return empty

    # -- inspection (``modelfs cache``) -------------------------------------
    def objects(self) -> list[ObjectEntry]:
        """Every cached object with its cached bytes and last access."""
        out = []
        with self.env.begin() as txn:
            for obj_id, raw in txn.cursor(db=self._objects):
                total, n = self._sum_chunks(txn, bytes(obj_id))
                at = txn.get(obj_id, db=self._atime) if self._atime is not None else None
                pinned = self._pins is not None and txn.get(obj_id, db=self._pins) is not None
                out.append(
                    ObjectEntry(
                        bytes(obj_id),
                        json.loads(raw),
                        total,
                        n,
                        _U64.unpack(at)[0] if at else None,
                        pinned,
                    )
                )
        return out

    def all_chunks(self) -> list[tuple[Victim, int]]:
        """(chunk, checksum) for every chunk, in object order (for verify)."""
        out = []
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self._chunks):
                obj_id, n = _CKEY.unpack(k)
                length, digest, _ = _CREC.unpack(v)
                out.append((Victim(obj_id, n, length), digest))
        return out


def open_index(root: Path, alone: Callable[[], bool]) -> CacheIndex:
    """The index, or a fresh one when it is damaged: the damaged one is
    set aside (renamed, one warning) with the payload files it described,
    which nothing indexes any more."""
    try:
        return CacheIndex(root / "index")
    except IndexDamaged as exc:
        aside = root / f"index.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.replace(root / "index", aside)
        if alone():
            shutil.rmtree(root / "data", ignore_errors=True)
        log.warning(
            "%s; set it aside as %s and started an empty cache (chunks are fetched again)",
            exc,
            aside.name,
        )
        return CacheIndex(root / "index")
