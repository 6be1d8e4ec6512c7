"""Every botocore/boto3 failure becomes a modelfs domain error here, and
nowhere else.

`classify` sorts an exception of any S3 call into a domain error
(`modelfs.errors`) and whether another attempt may cure it; `label` names a
finished request's result for the metrics. The origin store and the
tier's bucket client both use them, so the two never disagree about what a
404, a 412 or a reset connection means.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from ..errors import (
    AccessDenied,
    BadResponse,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchObject,
    ObjectChanged,
    OutOfFileDescriptors,
    RetriesExhausted,
    StoreError,
)

# Error codes S3-compatible servers use for "try again later".
RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
    }
)
# Answers to a conditional write that mean "someone else was first".
CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


@dataclass(frozen=True)
class Classified:
    """What an exception of an S3 call means."""

    error: StoreError
    retryable: bool  # another attempt may succeed (5xx, throttling, a cut connection)

    @property
    def label(self) -> str:
        return label(self.error)


def status_and_code(exc: BaseException) -> tuple[int, str]:
    """HTTP status and S3 error code of a ClientError ((0, "") otherwise)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0, ""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return int(status), str(response.get("Error", {}).get("Code", ""))


def classify(exc: Exception, what: str, bucket: str, endpoint: str) -> Classified:
    """The domain error for `exc` raised by an S3 call about `what`."""
    import http.client

    import botocore.exceptions as bex
    import urllib3.exceptions

    if _emfile(exc):
        return Classified(out_of_fds(what), retryable=False)
    if isinstance(exc, bex.ClientError):
        status, code = status_and_code(exc)
        if status == 416 or code == "InvalidRange":
            # A range inside the pinned size: the object shrank.
            return Classified(
                ObjectChanged(f"{what}: object changed since it was opened (shrank)"), False
            )
        if status >= 500 or status == 429 or code in RETRYABLE_CODES:
            return Classified(StoreError(f"{code or status}"), retryable=True)
        return Classified(translate(exc, what, bucket, endpoint), retryable=False)
    if isinstance(
        exc,
        bex.EndpointConnectionError
        | bex.ConnectTimeoutError
        | bex.ReadTimeoutError
        | bex.ConnectionClosedError
        | bex.ResponseStreamingError
        | bex.IncompleteReadError
        | urllib3.exceptions.HTTPError
        | http.client.HTTPException
        | ConnectionError
        | TimeoutError,
    ):
        return Classified(StoreError(f"{type(exc).__name__}: {exc}"), retryable=True)
    return Classified(translate(exc, what, bucket, endpoint), retryable=False)


def label(exc: BaseException | None) -> str:
    """The `result` label of a finished request (None: it succeeded)."""
    if exc is None:
        return "ok"
    for kind, label in (
        (RetriesExhausted, "gave_up"),
        (BadResponse, "bad_response"),
        (OutOfFileDescriptors, "out_of_fds"),
        (ObjectChanged, "stale"),
        (NoSuchObject, "not_found"),
        (AccessDenied, "denied"),
        (EndpointUnreachable, "unreachable"),
    ):
        if isinstance(exc, kind):
            return label
    return "error"


def out_of_fds(what: str) -> OutOfFileDescriptors:
    return OutOfFileDescriptors(
        f"{what}: this process has too many open files (EMFILE); "
        "raise its limit (ulimit -n, LimitNOFILE=)"
    )


def _emfile(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is this process running out of fds."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
            return True
        if "Too many open files" in str(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None)]
    return False


def not_s3(endpoint: str, detail: str) -> BadResponse:
    return BadResponse(
        f"the endpoint {endpoint} did not answer like S3 ({detail}); check --endpoint-url"
    )


# S3 error codes that mean the credentials are missing, wrong or too weak.
DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "403",
    }
)


def translate(exc: Exception, what: str, bucket: str, endpoint: str) -> StoreError:
    """A botocore/boto3 failure as a modelfs StoreError."""
    import botocore.exceptions as bex
    from botocore.parsers import ResponseParserError  # not in botocore.exceptions

    if isinstance(exc, bex.ClientError):
        return _from_response(exc.response, what, bucket, endpoint)
    if isinstance(exc, bex.NoCredentialsError):
        return AccessDenied(
            "no AWS credentials found (environment, shared config/profile or web identity)"
        )
    if isinstance(exc, bex.PartialCredentialsError | bex.ProfileNotFound):
        return AccessDenied(f"bad AWS credentials configuration: {exc}")
    if isinstance(
        exc, bex.EndpointConnectionError | bex.ConnectTimeoutError | bex.ConnectionClosedError
    ):
        return EndpointUnreachable(f"cannot reach {endpoint}: {exc}")
    if isinstance(exc, bex.ReadTimeoutError):
        return EndpointUnreachable(f"{endpoint} did not answer in time: {exc}")
    if isinstance(exc, ResponseParserError):
        return not_s3(endpoint, "its answer is not S3's XML")
    if isinstance(exc, bex.BotoCoreError):
        return StoreError(f"{what}: {exc}")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}")


def _from_response(response: dict[str, Any], what: str, bucket: str, endpoint: str) -> StoreError:
    """The domain error for an S3 error response (a ClientError's)."""
    err = response.get("Error", {})
    code = str(err.get("Code", ""))
    meta = response.get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode")
    msg = err.get("Message") or code
    ctype = str(meta.get("HTTPHeaders", {}).get("content-type", ""))
    if "html" in ctype.lower():
        return not_s3(endpoint, f"HTTP {status}, {ctype}")
    if code in ("PreconditionFailed", "412") or status == 412:
        return ObjectChanged(f"{what}: object changed since it was opened")
    if code == "NoSuchVersion":
        return ObjectChanged(f"{what}: the pinned version no longer exists")
    if code in ("NoSuchKey", "404", "NotFound"):
        return NoSuchObject(f"{what}: no such key")
    if code == "NoSuchBucket":
        return NoSuchBucket(f"bucket {bucket!r} does not exist at {endpoint}")
    if code in DENIED_CODES or status == 403:
        return AccessDenied(
            f"access denied to bucket {bucket!r} ({code}: {msg}); check the credentials"
        )
    if code in ("", str(status)) and not err.get("Message"):
        # No S3 error document: something else answered.
        return not_s3(endpoint, f"HTTP {status} without an S3 error")
    return StoreError(f"{what}: {code or status}: {msg}")
