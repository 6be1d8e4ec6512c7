"""A deliberately imperfect S3 endpoint on loopback, for the hostile-world tests.

Real servers (the JuiceFS gateway, moto) check SigV4 signatures, so a proxy
cannot make them misbehave in ways that change signed headers, such as
ignoring ``Range``. This server checks no signature and serves a dict of
objects with just enough of S3 for modelfs (ListObjectsV2 with a delimiter,
ranged GET with If-Match), and can be told to misbehave:

``ignore_range``  answer every GET with 200 and the whole object;
``etags``         False: send no ETag anywhere (If-Match is then ignored);
``html``          answer everything with an HTML page of this status, as a
                  web server or captive portal at the wrong URL would;
``stall``         seconds to wait before answering any request;
``gzip``          answer ranged GETs with the range gzip-compressed,
                  ``Content-Encoding: gzip`` and chunked transfer encoding
                  (no Content-Length), whatever Accept-Encoding said;
``trickle``       send a GET's headers at once, then its body one byte
                  every this many seconds;
``pace``          (bytes, seconds): send a GET's body that many bytes at a
                  time, one piece every that many seconds (a slow, steady
                  link);
``get_etags``     False: GETs carry no ETag and ignore If-Match, while
                  listings still carry ETags.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape


@dataclass
class FakeObject:
    data: bytes
    mtime: float

    @property
    def etag(self) -> str:
        return f'"{hashlib.md5(self.data).hexdigest()}"'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except OSError:  # the client gave up (a stalled request timed out)
                self.close_connection = True

    def _error(self, status: int, code: str) -> None:
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
        self._send(status, body, {"Content-Type": "application/xml"})

    def do_GET(self) -> None:  # noqa: N802
        fake = self.server.fake
        if fake.html is not None:
            page = b"<html><body><h1>Welcome</h1>Sign in to continue.</body></html>"
            self._send(fake.html, page, {"Content-Type": "text/html"})
            return
        split = urlsplit(self.path)
        bucket, _, key = unquote(split.path).lstrip("/").partition("/")
        if bucket != fake.bucket:
            self._error(404, "NoSuchBucket")
            return
        if fake.stall:
            time.sleep(fake.stall)
        if not key:
            self._list(parse_qs(split.query))
            return
        with fake.lock:
            obj = fake.objects.get(key)
        if obj is None:
            self._error(404, "NoSuchKey")
            return
        match = self.headers.get("If-Match")
        on_get = fake.etags and fake.get_etags
        if on_get and match and match != obj.etag:
            self._error(412, "PreconditionFailed")
            return
        headers = {"Last-Modified": email.utils.formatdate(obj.mtime, usegmt=True)}
        if on_get:
            headers["ETag"] = obj.etag
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if m is None or fake.ignore_range:
            self._send(200, obj.data, headers)
            return
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1 if m.group(2) else len(obj.data), len(obj.data))
        if start >= len(obj.data):
            self._error(416, "InvalidRange")
            return
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(obj.data)}"
        if fake.gzip:
            self._send_chunked(206, gzip.compress(obj.data[start:end]), headers)
        elif pace := fake.paced():
            self._send_trickle(206, obj.data[start:end], headers, *pace)
        else:
            self._send(206, obj.data[start:end], headers)

    def _send_chunked(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(0, len(body), 4096):
                piece = body[i : i + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def _send_trickle(
        self, status: int, body: bytes, headers: dict[str, str], piece: int, pause: float
    ) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.close_connection = True
        try:
            for i in range(0, len(body), piece):
                self.wfile.write(body[i : i + piece])
                self.wfile.flush()
                time.sleep(pause)
        except OSError:
            pass  # the client gave up, as it should

    do_HEAD = do_GET

    def _list(self, query: dict[str, list[str]]) -> None:
        fake = self.server.fake
        prefix = query.get("prefix", [""])[0]
        delim = query.get("delimiter", [""])[0]
        contents, prefixes = [], set()
        with fake.lock:
            items = sorted(fake.objects.items())
        for key, obj in items:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if delim and delim in rest:
                prefixes.add(prefix + rest.split(delim, 1)[0] + delim)
                continue
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(obj.mtime))
            when += f".{int(obj.mtime * 1000) % 1000:03d}Z"
            etag = f"<ETag>{escape(obj.etag)}</ETag>" if fake.etags else ""
            contents.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{when}</LastModified>"
                f"{etag}<Size>{fake.listed_sizes.get(key, len(obj.data))}</Size></Contents>"
            )
        common = "".join(
            f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
            for p in sorted(prefixes)
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{fake.bucket}</Name><Prefix>{escape(prefix)}</Prefix>"
            f"<KeyCount>{len(contents)}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<IsTruncated>false</IsTruncated>{''.join(contents)}{common}</ListBucketResult>"
        ).encode()
        self._send(200, body, {"Content-Type": "application/xml"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeS3

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up on a stalled answer are the point


class FakeS3:
    def __init__(self, bucket: str = "fake") -> None:
        self.bucket = bucket
        self.objects: dict[str, FakeObject] = {}
        self.lock = threading.Lock()
        self.ignore_range = False
        self.etags = True
        self.html: int | None = None
        self.stall = 0.0
        self.gzip = False
        self.trickle = 0.0
        self.pace: tuple[int, float] | None = None
        self.get_etags = True
        self.listed_sizes: dict[str, int] = {}  # key -> size a listing claims
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def paced(self) -> tuple[int, float] | None:
        """How a GET's body is sent piece by piece, if it is."""
        return (1, self.trickle) if self.trickle else self.pace

    def put(self, key: str, data: bytes, mtime: float | None = None) -> None:
        with self.lock:
            self.objects[key] = FakeObject(data, time.time() if mtime is None else mtime)

    def start(self) -> FakeS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
