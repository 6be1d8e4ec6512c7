"""Unit tier: `modelfs.s3.response`, what a ranged GET's response must be."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from modelfs.errors import BadResponse, ObjectChanged
from modelfs.s3.response import Sink, check_response
from modelfs.store import ObjectVersion

WHEN = datetime.datetime(2026, 12, 1, 10, 0, 0, tzinfo=datetime.UTC)
V = ObjectVersion(etag='"e1"', size=1000, mtime_ns=int(WHEN.timestamp()) * 10**9)


def _resp(status: int = 206, **headers: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ResponseMetadata": {"HTTPStatusCode": status},
        "ContentRange": "bytes 100-199/1000",
        "ContentLength": 100,
        "ETag": '"e1"',
        "LastModified": WHEN,
    }
    base.update(headers)
    return {k: v for k, v in base.items() if v is not None}


def test_the_range_asked_for_is_accepted() -> None:
    check_response("w", V, 100, 200, _resp())
    check_response("w", V, 100, 200, _resp(ContentEncoding="gzip"))  # stored metadata


@pytest.mark.parametrize(
    ("resp", "error"),
    [
        (_resp(ContentRange="bytes 0-99/1000"), BadResponse),
        (_resp(ContentRange="bytes 100-199/2000"), ObjectChanged),
        (_resp(ContentLength=None), BadResponse),  # chunked
        (_resp(ContentLength=80, ContentEncoding="gzip"), BadResponse),
        (_resp(ContentLength=80), BadResponse),
        (_resp(ETag='"e2"'), ObjectChanged),  # If-Match ignored
        (_resp(ETag=None, LastModified=WHEN.replace(second=7)), ObjectChanged),
        (_resp(ETag=None, LastModified=None), BadResponse),
        (_resp(status=200, ContentRange=None, ContentLength=1000), BadResponse),  # Range ignored
        (_resp(status=302, ContentRange=None), BadResponse),
    ],
)
def test_anything_else_is_refused(resp: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        check_response("w", V, 100, 200, resp)


def test_a_whole_object_200_is_the_whole_range() -> None:
    check_response("w", V, 0, 1000, _resp(status=200, ContentRange=None, ContentLength=1000))


def test_the_sink_fills_buffers_in_order_and_delivers_each_once() -> None:
    a, b = bytearray(3), bytearray(2)
    delivered: list[int] = []
    sink = Sink(10, [memoryview(a), memoryview(b)], delivered.append)
    assert sink.end == 15
    for piece in (b"xy", b"zu", b"v"):
        space = sink.space()
        n = min(len(space), len(piece))
        space[:n] = piece[:n]
        sink.filled(n)
        if n < len(piece):
            space = sink.space()
            space[: len(piece) - n] = piece[n:]
            sink.filled(len(piece) - n)
    assert (bytes(a), bytes(b), delivered, len(sink.space())) == (b"xyz", b"uv", [0, 1], 0)
