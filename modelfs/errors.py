"""Domain exceptions shared by every layer below the FUSE operations.

Lower layers (object store, chunk cache, namespace) raise these; only
`modelfs.fs.Operations` turns them into errno values, and only the CLI turns
them into one-line messages. Each message is written for a user: it names the
thing that failed and, where possible, what to do about it.
"""

from __future__ import annotations


class ModelfsError(Exception):
    """Base class; ``str(exc)`` is a one-line message fit for a user."""


class ConfigError(ModelfsError):
    """Bad command-line or configuration input."""


class StoreError(ModelfsError):
    """The object store failed in a way not covered by a subclass."""


class NoSuchObject(StoreError):
    """The key (or path) does not exist."""


class NoSuchName(NoSuchObject):
    """A directory's current listing has no entry of that name."""


class ObjectChanged(StoreError):
    """The object no longer matches the version pinned at open (HTTP 412)."""


class VersionReplaced(ObjectChanged):
    """An inode whose object has a newer version under the same name: an
    ordinary answer (ESTALE makes the kernel look the name up again)."""


class AccessDenied(StoreError):
    """Credentials are missing, wrong, or lack permission."""


class NoSuchBucket(StoreError):
    """The bucket does not exist on this endpoint."""


class EndpointUnreachable(StoreError):
    """The endpoint could not be reached (DNS, refused, timeout)."""


class BadResponse(StoreError):
    """The endpoint answered, but not with exactly the bytes asked for (a
    range it ignored, a wrong Content-Range or length, or not S3 at all).
    Such a response is never cached or served."""


class OutOfFileDescriptors(StoreError):
    """This process hit its open-file limit (EMFILE); not the endpoint's fault."""


class EmptySource(StoreError):
    """Nothing under the prefix: most often a typo in it."""


class SourceIsObject(StoreError):
    """The mount source names an object, not a prefix."""


class RetriesExhausted(StoreError):
    """Retries of a GET ran out of time (--retry-timeout); the read gets EIO."""


class CacheError(ModelfsError):
    """The on-disk chunk cache cannot be used."""


class CacheFormatError(CacheError):
    """The cache directory holds a format this version does not understand."""


class IndexDamaged(CacheError):
    """The cache's LMDB index is truncated or garbled; a cache is a cache:
    the writer sets it aside and starts a fresh one."""


class MountError(ModelfsError):
    """The mountpoint cannot be used or the kernel refused the mount."""


def single_domain_error(
    group: BaseExceptionGroup, kinds: tuple[type[Exception], ...] = (ModelfsError,)
) -> Exception | None:
    """The first error of a group holding only errors of `kinds` (domain
    errors by default), so work over several chunks fails as one chunk
    does (ObjectChanged stays ESTALE); None when the group holds anything
    else."""
    errors, rest = group.split(kinds)
    if errors is None or rest is not None:
        return None
    leaf: BaseException = errors
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, Exception) else None
