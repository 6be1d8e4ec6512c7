"""The object-store client: the only module that talks to S3.

It owns three operations, all blocking (callers run them in worker threads):
listing one directory level, ranged reads pinned to one object version, and a
start-up access probe. Every botocore/boto3 failure is translated here into a
`modelfs.errors` exception, so no layer above ever sees a ClientError.

`MemoryStore` implements the same interface in memory for unit tests of the
layers above; it enforces If-Match the same way a real server does.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import (
    AccessDenied,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchObject,
    ObjectChanged,
    StoreError,
)

if TYPE_CHECKING:
    from .config import MountConfig


@dataclass(frozen=True)
class ObjectVersion:
    """What pins one version of an object: ETag and size (mtime as fallback).

    Some servers send no ETag (the JuiceFS gateway without --keep-etag). Then
    the identity falls back to (size, LastModified) and ranged GETs carry
    If-Unmodified-Since instead of If-Match; an overwrite with the same size
    within the same second cannot be detected in that mode.
    """

    etag: str | None
    size: int
    mtime_ns: int

    def identity(self) -> bytes:
        """16 bytes naming this content version in the chunk cache."""
        tag = f"etag:{self.etag}" if self.etag else f"mtime:{self.mtime_ns}"
        return hashlib.sha256(f"{tag}\0size:{self.size}".encode()).digest()[:16]


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    version: ObjectVersion


@dataclass
class Listing:
    """One level of a ListObjectsV2 listing with Delimiter='/'."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)


@dataclass
class StoreCounters:
    """Requests and payload bytes received; read by the stats xattr."""

    list_requests: int = 0
    get_requests: int = 0
    get_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_get(self, nbytes: int) -> None:
        with self.lock:
            self.get_requests += 1
            self.get_bytes += nbytes

    def add_list(self) -> None:
        with self.lock:
            self.list_requests += 1


class ObjectStore(Protocol):
    counters: StoreCounters

    def list_dir(self, prefix: str) -> Listing: ...

    def get_range(self, key: str, version: ObjectVersion, start: int, end: int) -> bytes:
        """Bytes [start, end) of `key`, failing with ObjectChanged if the
        object is no longer `version`."""
        ...

    def probe(self, prefix: str) -> None:
        """Fail fast with a precise error if the bucket cannot be listed."""
        ...


def _strip_etag(etag: str | None) -> str | None:
    return etag if etag else None


class S3Store:
    """boto3-backed store. One client, shared by all worker threads."""

    def __init__(self, cfg: MountConfig, *, pool_size: int | None = None) -> None:
        import boto3
        import botocore.config
        import botocore.session

        self.bucket = cfg.source.bucket
        self.counters = StoreCounters()
        self._endpoint = cfg.endpoint_url or "the default AWS endpoint"
        try:
            # Credentials come from boto3's chain (environment, shared files,
            # web identity, instance metadata); --credentials-file only
            # replaces which shared-credentials file the chain reads.
            core = botocore.session.Session()
            if cfg.credentials_file is not None:
                core.set_config_variable("credentials_file", str(cfg.credentials_file))
            session = boto3.Session(
                botocore_session=core, profile_name=cfg.profile, region_name=cfg.region
            )
        except Exception as exc:  # ProfileNotFound and friends
            raise AccessDenied(f"cannot load AWS profile {cfg.profile!r}: {exc}") from exc
        pool = pool_size or cfg.fetch_concurrency + 4
        base: dict[str, Any] = dict(
            max_pool_connections=pool,
            s3={"addressing_style": cfg.addressing_style},
            tcp_keepalive=True,
        )
        self._client = session.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            config=botocore.config.Config(
                connect_timeout=10,
                read_timeout=60,
                retries={"mode": "standard", "max_attempts": 5},
                **base,
            ),
        )
        # The start-up probe must answer "unreachable" within seconds, so it
        # uses short timeouts and a single retry.
        self._probe_client = session.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            config=botocore.config.Config(
                connect_timeout=3,
                read_timeout=10,
                retries={"mode": "standard", "max_attempts": 2},
                **base,
            ),
        )

    # -- error translation ------------------------------------------------
    def _translate(self, exc: Exception, what: str) -> StoreError:
        import botocore.exceptions as bex

        if isinstance(exc, bex.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = err.get("Message") or code
            if code in ("PreconditionFailed", "412") or status == 412:
                return ObjectChanged(f"{what}: object changed since it was opened")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NoSuchObject(f"{what}: no such key")
            if code == "NoSuchBucket":
                return NoSuchBucket(f"bucket {self.bucket!r} does not exist at {self._endpoint}")
            if (
                code
                in (
                    "AccessDenied",
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "InvalidToken",
                    "ExpiredToken",
                    "403",
                )
                or status == 403
            ):
                return AccessDenied(
                    f"access denied to bucket {self.bucket!r} ({code}: {msg}); "
                    "check the credentials"
                )
            return StoreError(f"{what}: {code or status}: {msg}")
        if isinstance(exc, bex.NoCredentialsError):
            return AccessDenied(
                "no AWS credentials found (environment, shared config/profile or web identity)"
            )
        if isinstance(exc, bex.PartialCredentialsError | bex.ProfileNotFound):
            return AccessDenied(f"bad AWS credentials configuration: {exc}")
        if isinstance(
            exc, bex.EndpointConnectionError | bex.ConnectTimeoutError | bex.ConnectionClosedError
        ):
            return EndpointUnreachable(f"cannot reach {self._endpoint}: {exc}")
        if isinstance(exc, bex.BotoCoreError):
            return StoreError(f"{what}: {exc}")
        return StoreError(f"{what}: {type(exc).__name__}: {exc}")

    # -- operations -------------------------------------------------------
    def probe(self, prefix: str) -> None:
        try:
            self._probe_client.list_objects_v2(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/", MaxKeys=1
            )
        except Exception as exc:
            raise self._translate(exc, f"listing s3://{self.bucket}/{prefix}") from None

    def list_dir(self, prefix: str) -> Listing:
        out = Listing()
        kwargs: dict[str, Any] = dict(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        try:
            while True:
                resp = self._client.list_objects_v2(**kwargs)
                self.counters.add_list()
                for obj in resp.get("Contents", ()):
                    version = ObjectVersion(
                        etag=_strip_etag(obj.get("ETag")),
                        size=int(obj["Size"]),
                        mtime_ns=int(obj["LastModified"].timestamp() * 1e9),
                    )
                    out.objects.append(ObjectInfo(obj["Key"], version))
                out.prefixes.extend(p["Prefix"] for p in resp.get("CommonPrefixes", ()))
                token = resp.get("NextContinuationToken")
                if not resp.get("IsTruncated") or not token:
                    return out
                kwargs["ContinuationToken"] = token
        except Exception as exc:
            raise self._translate(exc, f"listing s3://{self.bucket}/{prefix}") from None

    def get_range(self, key: str, version: ObjectVersion, start: int, end: int) -> bytes:
        what = f"s3://{self.bucket}/{key} bytes {start}-{end - 1}"
        kwargs: dict[str, Any] = dict(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        if version.etag:
            kwargs["IfMatch"] = version.etag
        else:
            import datetime

            # HTTP dates have whole seconds; rounding up keeps a server that
            # compares sub-second mtimes from refusing an unchanged object.
            kwargs["IfUnmodifiedSince"] = datetime.datetime.fromtimestamp(
                -(-version.mtime_ns // 10**9), tz=datetime.UTC
            )
        try:
            resp = self._client.get_object(**kwargs)
            data: bytes = resp["Body"].read()
        except Exception as exc:
            raise self._translate(exc, what) from None
        self.counters.add_get(len(data))
        # Servers that ignore If-Match would hand us a different version;
        # the response's own ETag and length catch that.
        got_etag = resp.get("ETag")
        if version.etag and got_etag and got_etag != version.etag:
            raise ObjectChanged(f"{what}: object changed since it was opened")
        if len(data) != end - start:
            raise StoreError(f"{what}: short read ({len(data)} of {end - start} bytes)")
        return data


class MemoryStore:
    """In-memory store with S3's listing and If-Match semantics, for unit tests."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, ObjectVersion]] = {}
        self.counters = StoreCounters()
        self.get_log: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()
        self._mtime = 1_700_000_000 * 10**9

    def put(self, key: str, data: bytes) -> ObjectVersion:
        with self._lock:
            self._mtime += 10**9
            version = ObjectVersion(f'"{hashlib.md5(data).hexdigest()}"', len(data), self._mtime)
            self.objects[key] = (data, version)
            return version

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)

    def probe(self, prefix: str) -> None:
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

    def get_range(self, key: str, version: ObjectVersion, start: int, end: int) -> bytes:
        with self._lock:
            if key not in self.objects:
                raise NoSuchObject(f"{key}: no such key")
            data, current = self.objects[key]
            if current != version:
                raise ObjectChanged(f"{key}: object changed since it was opened")
            self.get_log.append((key, start, end))
        chunk = data[start:end]
        self.counters.add_get(len(chunk))
        return chunk
