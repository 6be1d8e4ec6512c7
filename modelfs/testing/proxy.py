"""An HTTP/1.1 reverse proxy in front of a local S3 server that counts.

It records every request (method, path, Range header, status, body bytes
sent to the client), so tests can prove claims such as "a remount fetches
nothing" from what actually crossed the wire. It can also hold back each
response by a fixed first-byte delay and cap each connection's rate, which
models S3's cost structure on loopback. SigV4 signatures survive because
the Host header is passed through unchanged.

Faults are injected per request by `CountingProxy.fault`, a function of the
request that returns a `Fault` or None: an error status with an S3 error
body (503 SlowDown, 403, 404...), a connection reset after N body bytes, a
body truncated after N bytes (the connection closed early), or a stall
before the body. `drop_headers` removes request headers on the way (a
proxy that strips Range).
"""

from __future__ import annotations

import http.client
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote, urlsplit

_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}


@dataclass(frozen=True)
class Fault:
    status: int | None = None  # answer this status (with `code`) instead of forwarding
    code: str = "SlowDown"
    reset_after: int | None = None  # body bytes sent before a TCP reset
    truncate_after: int | None = None  # body bytes sent before closing cleanly
    stall: float = 0.0  # seconds to wait before the first body byte (or the error)


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # decoded, without the query string
    query: str
    range: str | None
    status: int
    body_bytes: int
    if_match: str | None = None
    signed: bool = True  # an Authorization header or a presigned query
    at: float = 0.0  # time.monotonic() when the request arrived


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ThreadingServer
    _conn: http.client.HTTPConnection | None = None
    _arrived = 0.0

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _upstream(self) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is None:
            proxy = self.server.proxy
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
            self._conn = conn
        return conn

    def _error(self, fault: Fault) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
            f"<Message>injected by the test proxy</Message></Error>"
        ).encode()
        try:
            self.send_response(fault.status or 503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up first (a stalled request)
            self.close_connection = True

    def _forward(self) -> None:
        self._arrived = time.monotonic()
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        split = urlsplit(self.path)
        fault = (
            proxy.fault(self.command, unquote(split.path), self.headers.get("Range"))
            if proxy.fault
            else None
        )
        if fault is not None and fault.status is not None:
            if fault.stall:  # a request that hangs, then fails (never forwarded)
                time.sleep(fault.stall)
            self._error(fault)
            self._record(fault.status, 0)
            return
        conn, resp = self._ask_upstream(body)
        if proxy.first_byte_delay:
            time.sleep(proxy.first_byte_delay)
        payload = self._send_head(resp)
        cut = None
        if fault is not None:
            cut = fault.reset_after if fault.reset_after is not None else fault.truncate_after
            if fault.stall:
                time.sleep(fault.stall)
        sent = self._relay_body(resp, payload, cut, fault) if self.command != "HEAD" else 0
        resp.close()
        if cut is not None:
            conn.close()  # the upstream response was not read to its end
            self._conn = None
        self._record(resp.status, sent)

    def _ask_upstream(
        self, body: bytes | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """The request sent on, on the kept connection (a new one if that
        one was closed meanwhile)."""
        proxy = self.server.proxy
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in _HOP and k.lower() not in proxy.drop_headers
        }
        conn = self._upstream()
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._conn = None
            conn = self._upstream()
            conn.request(self.command, self.path, body=body, headers=headers)
            return conn, conn.getresponse()

    def _send_head(self, resp: http.client.HTTPResponse) -> bytes | None:
        """Status and headers passed back; a body without a length is read
        whole first (and returned) to give it one."""
        resp_len = resp.getheader("Content-Length")
        payload: bytes | None = None
        if resp_len is None and self.command != "HEAD":
            payload = resp.read()
            resp_len = str(len(payload))
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        if resp_len is not None:
            self.send_header("Content-Length", resp_len)
        self.end_headers()
        return payload

    def _relay_body(
        self,
        resp: http.client.HTTPResponse,
        payload: bytes | None,
        cut: int | None,
        fault: Fault | None,
    ) -> int:
        """The body passed back (at `rate`, cut after `cut` bytes by the
        fault); the bytes sent."""
        rate = self.server.proxy.rate
        sent = 0
        started = time.monotonic()
        while True:
            if payload is not None:
                block, payload = payload[: 1 << 20], payload[1 << 20 :]
            else:
                block = resp.read(1 << 20)
            if not block:
                return sent
            if cut is not None and sent + len(block) >= cut:
                self.wfile.write(block[: cut - sent])
                self._cut(fault)
                return cut
            self.wfile.write(block)
            sent += len(block)
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    def _record(self, status: int, body_bytes: int) -> None:
        split = urlsplit(self.path)
        self.server.proxy._record(
            Request(
                self.command,
                unquote(split.path),
                split.query,
                self.headers.get("Range"),
                status,
                body_bytes,
                self.headers.get("If-Match"),
                "authorization" in {k.lower() for k in self.headers}
                or "X-Amz-Signature=" in split.query,
                self._arrived,
            )
        )

    def _cut(self, fault: Fault | None) -> None:
        self.wfile.flush()
        if fault is not None and fault.reset_after is not None:
            # SO_LINGER 0: close() sends a RST instead of a FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        if fault is not None and fault.reset_after is None:
            self.connection.shutdown(socket.SHUT_RDWR)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class _ThreadingServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A mount opens up to --fetch-concurrency connections at once; with the
    # default backlog of 5 the rest waited for their SYN to be sent again:
    # 32 connections at once, the slowest took 1015-1026 ms (backlog 128:
    # 2-5 ms). GETs in the next-shard test's debug logs stalled so, ~1 s.
    request_queue_size = 128
    proxy: CountingProxy


class CountingProxy:
    def __init__(
        self,
        upstream_url: str,
        *,
        first_byte_delay: float = 0.0,
        rate: float | None = None,
    ) -> None:
        u = urlsplit(upstream_url)
        self.upstream_host = u.hostname or "127.0.0.1"
        self.upstream_port = u.port or 80
        self.first_byte_delay = first_byte_delay
        self.rate = rate  # bytes per second per connection
        self.fault: Callable[[str, str, str | None], Fault | None] | None = None
        # Request headers (lower case) not forwarded: {"range"} makes a
        # server that ignores Range, as a misbehaving proxy would.
        self.drop_headers: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._server = _ThreadingServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def object_gets(self, key_suffix: str = "") -> list[Request]:
        """GETs of objects (not listings) whose path ends with `key_suffix`."""
        return [
            r
            for r in self.snapshot()
            if r.method == "GET"
            and "list-type" not in r.query
            and r.path.endswith(key_suffix)
            and r.path.count("/") >= 2
        ]

    def object_bytes(self, key_suffix: str = "") -> int:
        return sum(r.body_bytes for r in self.object_gets(key_suffix) if r.status in (200, 206))

    def get_log(self, key_suffix: str = "") -> list[tuple[str | None, int, int]]:
        """(Range, status, body bytes) of every GET of the object, in order of
        arrival: what a test that finds bytes sent twice reports."""
        return [(r.range, r.status, r.body_bytes) for r in self.object_gets(key_suffix)]


def main() -> None:
    """``python -m modelfs.testing.proxy UPSTREAM [--delay S] [--rate BYTES/S]``:
    run a shaping proxy in its own process (so it does not share a GIL with
    what it measures); prints its endpoint URL, serves until killed."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("upstream")
    ap.add_argument("--delay", type=float, default=0.0, help="first-byte delay, seconds")
    ap.add_argument("--rate", type=float, default=None, help="bytes/s per connection")
    args = ap.parse_args()
    proxy = CountingProxy(args.upstream, first_byte_delay=args.delay, rate=args.rate)
    print(proxy.endpoint_url, flush=True)
    proxy._server.serve_forever()


if __name__ == "__main__":
    main()
