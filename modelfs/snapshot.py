"""Snapshots: one frozen set of object versions under a prefix, and its manifest.

Owns the manifest format (JSON; documented in docs/semantics.md, "Snapshot
mounts"), reading a manifest from a file or an ``s3://`` URL and vetting it,
taking a snapshot of a prefix from the store, answering a mount's directory
listings from a snapshot (`Snapshot.list_dir`), comparing a snapshot with the
bucket now (`differences`), and a mount's record of pinned objects found
stale (`Pins`).

A snapshot pins each object by (ETag, size) and, in a versioned bucket, by
VersionId. The cache is keyed by (ETag, size) already, so a snapshot changes
nothing in it: nodes given one manifest share cached chunks and the shared
tier exactly as before.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .config import MiB, S3Location, parse_s3_url
from .errors import ConfigError, EmptySource, StoreError
from .files import write_atomically
from .stats import SnapshotStats
from .store import MAX_OBJECT_SIZE, Listing, ObjectInfo, ObjectStore, ObjectVersion, epoch_ns

log = logging.getLogger(__name__)

FORMAT = "modelfs-manifest/1"
# A manifest lists keys, not data: 64 MiB is ~300,000 objects.
MAX_MANIFEST = 64 * MiB

# Reads a small object whole: (bucket, key) -> bytes.
Fetch = Callable[[str, str], bytes]


class ManifestError(ConfigError):
    """A manifest that cannot be read, is not one, or does not fit the mount."""


@dataclass(frozen=True)
class Snapshot:
    """The objects under s3://bucket/prefix as they were at `taken`."""

    bucket: str
    prefix: str  # "" or ends with "/"
    objects: tuple[ObjectInfo, ...]
    taken: str  # ISO 8601, UTC
    _dirs: dict[str, Listing] = field(default_factory=dict, compare=False, repr=False)

    @property
    def source(self) -> S3Location:
        return S3Location(self.bucket, self.prefix)

    @property
    def versioned(self) -> bool:
        return any(o.version.version_id for o in self.objects)

    def list_dir(self, prefix: str) -> Listing:
        """One level under `prefix`, as ListObjectsV2 with Delimiter='/'
        would have answered at `taken`: the mount's namespace reads its
        directories from here instead of the bucket."""
        if not self._dirs:
            self._dirs.update(_levels(self.prefix, self.objects))
        return self._dirs.get(prefix) or Listing()

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "taken": self.taken,
            "versioned": self.versioned,
            "objects": [
                {
                    "key": o.key,
                    "size": o.version.size,
                    "etag": o.version.etag,
                    "version_id": o.version.version_id,
                    "last_modified": _iso(o.version.mtime_ns),
                }
                for o in self.objects
            ],
        }
        return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def _levels(root: str, objects: tuple[ObjectInfo, ...]) -> dict[str, Listing]:
    dirs: dict[str, Listing] = {root: Listing()}
    subdirs: dict[str, set[str]] = {root: set()}
    for obj in objects:
        parent = root
        for part in obj.key[len(root) :].split("/")[:-1]:
            child = f"{parent}{part}/"
            subdirs[parent].add(child)
            if child not in dirs:
                dirs[child], subdirs[child] = Listing(), set()
            parent = child
        dirs[parent].objects.append(obj)
    for d, listing in dirs.items():
        listing.prefixes = sorted(subdirs[d])
    return dirs


def _iso(ns: int) -> str:
    when = datetime.datetime.fromtimestamp(ns // 1000 / 1e6, tz=datetime.UTC)
    # Microseconds from the integer, not the float: the round trip is exact.
    when = when.replace(microsecond=(ns // 1000) % 1_000_000)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def take(store: ObjectStore, source: S3Location) -> Snapshot:
    """Snapshot the prefix now: one listing of every object under it."""
    tree = store.list_tree(source.prefix)
    objects = tuple(sorted(tree.objects, key=lambda o: o.key))
    return Snapshot(source.bucket, source.prefix, objects, now_iso())


# -- reading and vetting a manifest ------------------------------------------
def load(ref: str, fetch: Fetch | None = None) -> Snapshot:
    """The manifest at `ref`: a local path, or an s3:// URL read with `fetch`."""
    if ref.startswith("s3://"):
        where = parse_s3_url(ref)
        key = where.prefix.rstrip("/")
        if not key or fetch is None:
            raise ManifestError(f"manifest {ref}: expected s3://BUCKET/KEY of a manifest file")
        try:
            raw = fetch(where.bucket, key)
        except StoreError as exc:
            raise ManifestError(f"cannot read the manifest {ref}: {exc}") from None
    else:
        try:
            with open(ref, "rb") as f:
                raw = f.read(MAX_MANIFEST + 1)
        except OSError as exc:
            raise ManifestError(f"cannot read the manifest {ref}: {exc.strerror}") from None
        if len(raw) > MAX_MANIFEST:
            raise ManifestError(f"manifest {ref} is larger than {MAX_MANIFEST >> 20} MiB")
    return parse(raw, ref)


def parse(raw: bytes, where: str) -> Snapshot:
    """A Snapshot from manifest bytes, or a ManifestError naming what is wrong."""
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        raise ManifestError(f"{where} is not a modelfs manifest (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{where} is not a modelfs manifest (not JSON: {exc.msg} at line {exc.lineno})"
        ) from None
    except RecursionError:
        raise ManifestError(f"{where} is not a modelfs manifest (JSON nested too deep)") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise ManifestError(f"{where} is not a modelfs manifest ({exc})") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("modelfs-manifest/"):
        raise ManifestError(f'{where} is not a modelfs manifest (no "format": "{FORMAT}")')
    if fmt != FORMAT:
        raise ManifestError(
            f"{where} has format {fmt!r}; this modelfs reads {FORMAT!r} (a newer modelfs wrote it?)"
        )
    bad = _Complaint(where)
    bucket = bad.check(doc.get("bucket"), str, "bucket")
    prefix = bad.check(doc.get("prefix"), str, "prefix")
    try:
        source = parse_s3_url(f"s3://{bucket}/{prefix}")
    except ConfigError as exc:
        raise bad(f"bucket and prefix: {exc}") from None
    if source.prefix != prefix:
        raise bad(f'prefix must be "" or end with "/", not {prefix!r}')
    taken = bad.check(doc.get("taken"), str, "taken")
    entries = bad.check(doc.get("objects"), list, "objects")
    objects: list[ObjectInfo] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        objects.append(_object(bad, f"objects[{i}]", entry, source))
        if objects[-1].key in seen:
            raise bad(f"objects[{i}]: key {objects[-1].key!r} is listed twice")
        seen.add(objects[-1].key)
    objects.sort(key=lambda o: o.key)
    return Snapshot(source.bucket, source.prefix, tuple(objects), taken)


class _Complaint:
    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, what: str) -> ManifestError:
        return ManifestError(f"{self.where}: bad manifest: {what}")

    def check(self, value: Any, kind: type, name: str) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self(f"{name} must be {'a string' if kind is str else 'a ' + kind.__name__}")
        return value


def _object(bad: _Complaint, name: str, entry: Any, source: S3Location) -> ObjectInfo:
    if not isinstance(entry, dict):
        raise bad(f"{name} must be an object")
    key = bad.check(entry.get("key"), str, f"{name}.key")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{name}.key {key!r} is not valid UTF-8 (a lone surrogate)") from None
    if not key.startswith(source.prefix) or key == source.prefix:
        raise bad(f"{name}.key {key!r} is not under {source}")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_OBJECT_SIZE:
        raise bad(f"{name}.size of {key!r} must be an integer from 0 to {MAX_OBJECT_SIZE} (1 PiB)")
    etag, vid = entry.get("etag"), entry.get("version_id")
    for field_name, value in (("etag", etag), ("version_id", vid)):
        if value is not None and (not isinstance(value, str) or not value):
            raise bad(f"{name}.{field_name} must be a non-empty string or null")
    stamp = bad.check(entry.get("last_modified"), str, f"{name}.last_modified")
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ValueError
    except ValueError:
        raise bad(f"{name}.last_modified {stamp!r} is not an ISO 8601 time with a zone") from None
    version = ObjectVersion(
        etag=etag,
        size=size,
        mtime_ns=epoch_ns(when),
        origin=f"{source.bucket}/{key}",
        version_id=vid,
    )
    return ObjectInfo(key, version)


def fit(snapshot: Snapshot, source: S3Location | None, where: str, allow_empty: bool) -> None:
    """Refuse a manifest of another bucket or prefix than the one named
    (`source`, None when the manifest names it), or an empty one."""
    if source is not None and source != snapshot.source:
        raise ManifestError(f"{where} is a manifest of {snapshot.source}, not of {source}")
    if not snapshot.objects and not allow_empty:
        raise EmptySource(f"the manifest {where} lists no objects (--allow-empty mounts it)")


def write(snapshot: Snapshot, dest: Path | None) -> None:
    """The manifest to `dest` (atomically: a reader never sees half of it),
    or to stdout."""
    text = snapshot.to_json()
    if dest is None:
        print(text, end="")
        return
    write_atomically(dest, text.encode(), prefix=f".{dest.name}.", mode=0o644)


# -- comparing with the bucket -----------------------------------------------
@dataclass(frozen=True)
class Difference:
    key: str
    change: str  # "changed", "deleted" or "added"
    pinned: ObjectVersion | None
    now: ObjectVersion | None
    # A changed or deleted key pinned by VersionId: whether that version
    # can still be read (so mounts of the manifest still serve it); None
    # when not known (no VersionId, or not asked).
    pinned_readable: bool | None = None

    def describe(self, bucket: str) -> str:
        url = f"s3://{bucket}/{self.key}"
        if self.change == "added":
            assert self.now is not None
            return f"added    {url} (ETag {self.now.etag or '-'}, {self.now.size} bytes)"
        assert self.pinned is not None
        was = f"ETag {self.pinned.etag or '-'}, {self.pinned.size} bytes"
        if self.change == "deleted":
            return f"deleted  {url} (was {was})" + self._readability()
        assert self.now is not None
        return (
            f"changed  {url} (manifest: {was}; now: ETag {self.now.etag or '-'}, "
            f"{self.now.size} bytes)" + self._readability()
        )

    def _readability(self) -> str:
        if self.pinned_readable is None:
            return ""
        if self.pinned_readable:
            return "; the pinned version is still readable: mounts of the manifest serve it"
        return "; the pinned version is GONE: mounts of the manifest fail on this file"


def _same(pinned: ObjectVersion, now: ObjectVersion) -> bool:
    if pinned.version_id and now.version_id:
        return pinned.version_id == now.version_id
    if pinned.etag and now.etag:
        return (pinned.etag, pinned.size) == (now.etag, now.size)
    return (pinned.size, pinned.mtime_ns // 10**9) == (now.size, now.mtime_ns // 10**9)


def differences(manifest: Snapshot, now: Snapshot) -> list[Difference]:
    """Every key whose current version is not the manifest's, in key order."""
    current = {o.key: o.version for o in now.objects}
    pinned = {o.key: o.version for o in manifest.objects}
    out = []
    for key in sorted(pinned.keys() | current.keys()):
        p, n = pinned.get(key), current.get(key)
        if p is None:
            out.append(Difference(key, "added", None, n))
        elif n is None:
            out.append(Difference(key, "deleted", p, None))
        elif not _same(p, n):
            out.append(Difference(key, "changed", p, n))
    return out


def with_readability(
    diffs: list[Difference], has_version: Callable[[str, str], bool]
) -> list[Difference]:
    """The differences, each changed or deleted key pinned by VersionId
    told whether its pinned version can still be read."""
    return [
        dataclasses.replace(d, pinned_readable=has_version(d.key, d.pinned.version_id))
        if d.pinned is not None and d.pinned.version_id and d.change != "added"
        else d
        for d in diffs
    ]


# -- a snapshot mount's pins -------------------------------------------------
@dataclass
class Pins:
    """What a snapshot mount pinned, and which of its objects were found
    changed at the origin (an unversioned bucket overwrote them, or a
    versioned one lost the pinned version). Those fail with ESTALE for the
    bytes not in the cache; each is logged once, with its current ETag."""

    snapshot: Snapshot
    store: ObjectStore
    manifest: str | None = None  # where it came from; None: taken at mount
    stale: set[str] = field(default_factory=set)

    async def found_stale(self, key: str, pinned: ObjectVersion) -> None:
        if key in self.stale:
            return
        self.stale.add(key)
        try:
            now = await trio.to_thread.run_sync(self.store.current, key, abandon_on_cancel=True)
            current = "deleted" if now is None else f"ETag {now.etag or '-'}"
        except StoreError as exc:
            current = f"unknown ({exc})"
        what = (
            f"pinned version {pinned.version_id} is gone"
            if pinned.version_id
            else f"pinned ETag {pinned.etag or '-'}, now {current}"
        )
        log.warning(
            "s3://%s/%s changed since the snapshot (%s): its bytes not in the cache "
            "fail with ESTALE until a remount with a new snapshot",
            self.snapshot.bucket,
            key,
            what,
        )

    def stats(self) -> SnapshotStats:
        return SnapshotStats(
            objects=len(self.snapshot.objects),
            version_ids=sum(1 for o in self.snapshot.objects if o.version.version_id),
            stale=len(self.stale),
            manifest=self.manifest,
            taken=self.snapshot.taken,
        )
