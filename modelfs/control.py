"""The daemon's control socket: cache changes asked for by ``modelfs cache``.

Owns ``<cache-dir>/control.sock`` (mode 0600) and its protocol: one JSON
request line, one JSON reply line. A cache directory belongs to one daemon
(it holds the flock), and only that daemon knows which chunks are being read
or fetched, so evictions and repairs of a cache in use are done by it:
``modelfs cache gc|clear|verify --repair`` send them here. Read-only
inspection (``ls``, ``du``, the checking part of ``verify``) needs no
daemon; LMDB lets other processes read the index while the daemon writes.

Requests:
  {"op": "shrink", "target": BYTES}                 -> {"chunks": N, "bytes": N}
  {"op": "drop", "chunks": [[ID_HEX, N, LEN], ...]} -> {"dropped": N}
  {"op": "ping"}                                    -> {"pid": PID}
Errors come back as {"error": "text"}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from .cache_index import Victim
from .chunk_cache import ChunkCache
from .errors import CacheError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 << 20  # a drop list for a very large cache still fits


@contextlib.contextmanager
def _socket_path(cache_dir: Path) -> Iterator[str]:
    """A path to the socket that fits sun_path (108 bytes) however deep the
    cache directory is: through the /proc/self/fd link of the directory."""
    fd = os.open(cache_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


async def serve(cache: ChunkCache, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    path = cache.root / SOCKET_NAME
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        # The flock proves no other daemon owns this directory, so a socket
        # file left here is a dead daemon's.
        path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            with _socket_path(cache.root) as short:
                await listener.bind(short)
        finally:
            os.umask(old)
        listener.listen(8)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(_handle, cache, conn)
        finally:
            path.unlink(missing_ok=True)


async def _handle(cache: ChunkCache, conn: trio.socket.SocketType) -> None:
    with conn:
        buf = b""
        while not buf.endswith(b"\n") and len(buf) < MAX_REQUEST:
            data = await conn.recv(1 << 20)
            if not data:
                break
            buf += data
        try:
            reply = await _dispatch(cache, json.loads(buf))
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"error": f"bad request: {exc}"}
        except CacheError as exc:
            reply = {"error": str(exc)}
        out = (json.dumps(reply) + "\n").encode()
        while out:
            n = await conn.send(out)
            out = out[n:]


async def _dispatch(cache: ChunkCache, req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    if op == "ping":
        return {"pid": os.getpid()}
    if op == "shrink":
        chunks, nbytes = await cache.shrink_to(int(req["target"]))
        log.info("cache gc asked for: evicted %d chunks, %d bytes", chunks, nbytes)
        return {"chunks": chunks, "bytes": nbytes}
    if op == "drop":
        victims = [Victim(bytes.fromhex(h), int(n), int(ln)) for h, n, ln in req["chunks"]]
        await cache.drop(victims)
        log.info("cache verify --repair: dropped %d corrupt chunks", len(victims))
        return {"dropped": len(victims)}
    raise ValueError(f"unknown op {op!r}")


def request(cache_dir: Path, req: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Send one request to the daemon owning `cache_dir` (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _socket_path(cache_dir) as short:
                sock.connect(short)
        except OSError as exc:
            raise CacheError(
                f"cache {cache_dir} is in use, but its daemon does not answer on "
                f"{SOCKET_NAME}: {exc.strerror}"
            ) from None
        sock.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            data = sock.recv(1 << 16)
            if not data:
                break
            buf += data
    reply: dict[str, Any] = json.loads(buf or b"{}")
    if "error" in reply:
        raise CacheError(f"the daemon refused: {reply['error']}")
    return reply
