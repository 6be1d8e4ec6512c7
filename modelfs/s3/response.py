"""What a ranged GET's response must be before a byte of it is used, and
how its body is received: straight into the caller's buffers.

`check_response` accepts a response only if it is exactly the range asked
for of the pinned version (status, Content-Range, length, no transfer
compression, ETag or Last-Modified, VersionId). `Sink` is where the body
goes across retries; `receive` fills it with one recv per call and holds
--retry-timeout over the whole body.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Sequence
from typing import Any

from ..errors import BadResponse, ObjectChanged, RetriesExhausted
from ..store import Deliver, ObjectVersion, epoch_ns

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def check_response(
    what: str, version: ObjectVersion, start: int, end: int, resp: dict[str, Any]
) -> None:
    """Accept a ranged GET's response only if it is exactly bytes [start, end)
    of the pinned version: status 206 with that Content-Range (or 200 for a
    whole-object range), that length, the pinned total size and, without an
    ETag, the pinned Last-Modified second. A changed object raises
    ObjectChanged (ESTALE); anything else malformed raises BadResponse."""
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    crange = resp.get("ContentRange")
    if status == 206 and crange:
        m = _CONTENT_RANGE.match(str(crange).strip())
        if m is None:
            raise BadResponse(f"{what}: unparsable Content-Range {crange!r}")
        total = m.group(3)
        if total != "*" and int(total) != version.size:
            raise ObjectChanged(
                f"{what}: object changed since it was opened (size {total}, was {version.size})"
            )
        if (int(m.group(1)), int(m.group(2)) + 1) != (start, end):
            raise BadResponse(f"{what}: the endpoint sent {crange!r} instead")
    elif status == 200 and start == 0 and end == version.size:
        pass  # the whole object, which is what was asked for
    elif status == 200:
        raise BadResponse(
            f"{what}: the endpoint ignored the Range header (HTTP 200 with the whole "
            "object); a proxy in between may be stripping it"
        )
    else:
        raise BadResponse(f"{what}: unexpected HTTP {status} without a Content-Range")
    _check_length(what, version, status, end - start, resp)
    got_etag = resp.get("ETag")
    if version.etag and got_etag and got_etag != version.etag:
        # A server that ignores If-Match hands us another version.
        raise ObjectChanged(f"{what}: object changed since it was opened")
    got_vid = resp.get("VersionId")
    if version.version_id and got_vid and got_vid != version.version_id:
        raise BadResponse(f"{what}: the endpoint sent version {got_vid} instead")
    if not got_etag:
        _check_modified(what, version, resp.get("LastModified"))


def _check_length(
    what: str, version: ObjectVersion, status: Any, want: int, resp: dict[str, Any]
) -> None:
    """The body's announced length is the range's: never a chunked body
    (every S3 GET names its length; a proxy or server compressing on the
    fly does not) or a compressed one."""
    length = resp.get("ContentLength")
    encoding = resp.get("ContentEncoding")
    compressed = bool(encoding) and str(encoding).lower() != "identity"
    if length is None:
        raise BadResponse(
            f"{what}: no Content-Length"
            + (f" (Content-Encoding {encoding}: the endpoint compressed it)" if compressed else "")
        )
    if int(length) == want:
        return  # a stored Content-Encoding (object metadata) with the stored bytes is fine
    if compressed:
        raise BadResponse(
            f"{what}: {length} bytes with Content-Encoding {encoding} for a "
            f"{want}-byte range: the endpoint compressed the body"
        )
    if status == 200:
        raise ObjectChanged(
            f"{what}: object changed since it was opened (size {length}, was {version.size})"
        )
    raise BadResponse(f"{what}: {length} bytes announced for a {want}-byte range")


def _check_modified(what: str, version: ObjectVersion, modified: Any) -> None:
    """A response without an ETag is tied to the pinned version by its
    Last-Modified (and, checked before, the total size in Content-Range): a
    server that ignores If-Match and sends no ETag on GETs must not mix two
    versions in one handle. Without either it cannot be tied: refused."""
    if modified is None:
        raise BadResponse(
            f"{what}: the endpoint sent neither an ETag nor a Last-Modified; "
            "cannot tell which version of the object this is"
        )
    # HTTP dates carry whole seconds; listings may carry milliseconds.
    if epoch_ns(modified) // 10**9 != version.mtime_ns // 10**9:
        raise ObjectChanged(f"{what}: object changed since it was opened (Last-Modified)")


class Sink:
    """Where a GET's body goes: the range from `start` across the buffers,
    filled in order across attempts; each full one is handed to `deliver`
    (if any) at once."""

    def __init__(self, start: int, bufs: Sequence[memoryview], deliver: Deliver | None) -> None:
        self.bufs, self.deliver = bufs, deliver
        self.start, self.end = start, start + sum(len(b) for b in bufs)
        self.received = 0
        # --retry-timeout holds for the whole body, not per recv: a body
        # that trickles in a byte at a time never trips the read timeout.
        self.deadline = math.inf
        self.what = "GET"
        self._i = 0  # the buffer being filled
        self._off = 0  # bytes of it filled

    def space(self) -> memoryview:
        """The unfilled part of the current buffer (empty when all is in)."""
        while self._i < len(self.bufs) and self._off == len(self.bufs[self._i]):
            self._i, self._off = self._i + 1, 0  # an empty buffer
        if self._i == len(self.bufs):
            return memoryview(b"")
        return self.bufs[self._i][self._off :]

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise RetriesExhausted(
                f"{self.what}: the body was still arriving when --retry-timeout ran out "
                f"({self.received} of {self.end - self.start} bytes received)"
            )

    def filled(self, n: int) -> None:
        self.received += n
        self._off += n
        if self._off == len(self.bufs[self._i]):
            if self.deliver is not None:
                self.deliver(self._i)
            self._i, self._off = self._i + 1, 0


# Bytes a receive waits for (SO_RCVLOWAT) before the thread wakes: a GET
# body arrived in 6,000-8,600 recvs per GiB on loopback (130 KiB each),
# each a poll, a recv, a wake-up and two trips through the GIL. The kernel
# caps it at half of tcp_rmem's maximum (3 MiB by default).
RECV_LOWAT = 4 << 20
# The mark is at most what the body's rate so far brings in an eighth of
# the read timeout: poll times out when fewer bytes than the mark arrive,
# however many did, so a slow link must not be asked for a large mark.
_TIMEOUT_SHARE = 8


class _LowWater:
    """The socket's receive low-water mark while a body is received.

    At most the bytes still to come, since neither poll nor recv returns
    before that many are there, and at most what the body's rate so far
    brings in an eighth of the socket's timeout (--read-timeout), so that
    a slow body is not taken for a stalled one; it grows from the first
    bytes, doubling at most. A body whose rate falls eightfold at once
    can time out (and its GET is retried, keeping what arrived). Back to 1
    (the default) after the body, so that the next response's headers are
    read at once."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock if isinstance(sock, socket.socket) else None
        self.mark = 1
        self.timeout = (self.sock.gettimeout() if self.sock is not None else None) or 0.0
        self.started = time.monotonic()

    def expect(self, received: int, remaining: int) -> None:
        elapsed = time.monotonic() - self.started
        if received <= 0 or elapsed <= 0 or not self.timeout:
            return
        paced = int(received / elapsed * self.timeout / _TIMEOUT_SHARE)
        # Also at most what came so far: the first bytes, already queued
        # when the headers were read, tell nothing of the rate.
        self._set(max(1, min(RECV_LOWAT, remaining, paced, received)))

    def reset(self) -> None:
        self._set(1)

    def _set(self, mark: int) -> None:
        if self.sock is None or mark == self.mark:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
            self.mark = mark
        except OSError:
            self.sock = None  # closed, or not TCP: receive as it comes


def receive(body: Any, sink: Sink) -> None:
    """Receive a response body into the sink.

    botocore's body wraps a urllib3 response whose `readinto` is `read()`
    plus a copy; the http.client response under it has a real `recv_into`.
    Reading that one fills the buffers with no object per piece, and once
    the body is read to its Content-Length the connection is handed back to
    the pool. Anything unexpected (another HTTP stack) falls back to
    `read()` pieces, copied in."""
    import http.client
    import io

    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (
        raw is not None
        and isinstance(fp, http.client.HTTPResponse)
        and not fp.chunked
        and fp.length is not None
        and isinstance(fp.fp, io.BufferedReader)
    ):
        lowat = _LowWater(getattr(fp.fp.raw, "_sock", None))
        received = 0
        try:
            while (space := sink.space()) and fp.length:
                lowat.expect(received, min(len(space), fp.length))
                # One recv at most per call (readinto1): a readinto of the
                # whole buffer loops inside C until it is full, so a body
                # that trickles in would never reach the deadline check.
                got = fp.fp.readinto1(space[: fp.length])
                if not got:
                    break
                fp.length -= got
                received += got
                sink.filled(got)
                sink.check_deadline()
            if not fp.length:
                fp.read()  # the body is read to its length: hand the connection back
        except BaseException:
            raw.close()  # a half-read connection must not be reused
            raise
        finally:
            lowat.reset()
        if not sink.space() and fp.isclosed():
            raw.release_conn()
        else:
            raw.close()
        return
    while space := sink.space():
        piece = body.read(min(1 << 20, len(space)))
        if not piece:
            break
        space[: len(piece)] = piece
        sink.filled(len(piece))
        sink.check_deadline()
