"""Unit tier: `modelfs.s3.errors`, every botocore failure as a domain error."""

from __future__ import annotations

import errno

import botocore.exceptions as bex
import pytest

from modelfs.errors import (
    AccessDenied,
    BadResponse,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchObject,
    ObjectChanged,
    OutOfFileDescriptors,
    StoreError,
)
from modelfs.s3.errors import classify, label, translate


def _client_error(status: int, code: str, ctype: str = "application/xml") -> bex.ClientError:
    return bex.ClientError(
        {
            "Error": {"Code": code, "Message": code},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {"content-type": ctype}},
        },
        "GetObject",
    )


@pytest.mark.parametrize(
    ("status", "code", "kind", "retryable"),
    [
        (412, "PreconditionFailed", ObjectChanged, False),
        (404, "NoSuchKey", NoSuchObject, False),
        (404, "NoSuchBucket", NoSuchBucket, False),
        (404, "NoSuchVersion", ObjectChanged, False),
        (403, "AccessDenied", AccessDenied, False),
        (416, "InvalidRange", ObjectChanged, False),
        (503, "SlowDown", StoreError, True),
        (500, "InternalError", StoreError, True),
        (429, "TooManyRequests", StoreError, True),
    ],
)
def test_error_responses(status: int, code: str, kind: type, retryable: bool) -> None:
    got = classify(_client_error(status, code), "s3://b/k", "b", "http://e")
    assert isinstance(got.error, kind) and got.retryable is retryable


def test_an_html_answer_is_not_s3() -> None:
    got = translate(_client_error(403, "403", "text/html"), "s3://b/k", "b", "http://e")
    assert isinstance(got, BadResponse) and "did not answer like S3" in str(got)


def test_connection_failures_are_retried_and_unreachable_when_final() -> None:
    exc = bex.EndpointConnectionError(endpoint_url="http://e")
    assert classify(exc, "w", "b", "http://e").retryable
    assert isinstance(translate(exc, "w", "b", "http://e"), EndpointUnreachable)


def test_running_out_of_descriptors_is_named_and_never_retried() -> None:
    exc = OSError(errno.EMFILE, "Too many open files")
    got = classify(exc, "w", "b", "http://e")
    assert isinstance(got.error, OutOfFileDescriptors) and not got.retryable


def test_labels() -> None:
    assert label(None) == "ok"
    assert label(ObjectChanged("x")) == "stale"
    assert label(StoreError("x")) == "error"


def test_an_answer_that_does_not_parse_is_not_s3() -> None:
    from botocore.parsers import ResponseParserError

    got = translate(ResponseParserError("Unknown tag: html"), "w", "b", "http://e")
    assert isinstance(got, BadResponse)


def test_any_other_botocore_error_is_a_store_error() -> None:
    exc = bex.UnknownServiceError(service_name="sts", known_service_names="s3")
    got = translate(exc, "listing s3://b/", "b", "http://e")
    assert type(got) is StoreError and "listing s3://b/" in str(got)
