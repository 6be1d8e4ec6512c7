"""The ranged GET of the origin: one version's bytes [start, end) into the
caller's buffers, retried with backoff and resumed from the last byte
received, all attempts (and each body) bounded by --retry-timeout.

botocore's own retries are off for these GETs: they would repeat the whole
request and count attempts rather than time. Near the deadline, attempts
use clients with shorter timeouts (`_client_for`), so no stall runs past it.
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import RetriesExhausted, StoreError
from ..store import Deliver, ObjectVersion, StoreCounters
from .errors import classify, label
from .response import Sink, check_response, receive

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.1  # seconds; doubles per attempt, full jitter
BACKOFF_CAP = 5.0
# A retry is not started with less than this left of --retry-timeout.
MIN_ATTEMPT = 0.5


class _Retry(Exception):
    """Internal: a GET failed in a way a later attempt may not."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


class RangedGet:
    """Ranged GETs of one bucket. One client per timeout pair, shared by all
    worker threads; `new_client(connect, read)` makes one (one attempt)."""

    def __init__(
        self,
        bucket: str,
        endpoint: str,
        new_client: Callable[[float, float], Any],
        timeouts: tuple[float, float],
        retry_timeout: float,
        counters: StoreCounters,
    ) -> None:
        self.bucket, self._endpoint = bucket, endpoint
        self._new_client = new_client
        self._timeouts = timeouts
        self._sent = threading.local()  # when this thread's GET was sent
        self._clients = {timeouts: self._made(*timeouts)}
        self._lock = threading.Lock()
        self.retry_timeout = retry_timeout
        self.counters = counters

    def _client_for(self, remaining: float) -> Any:
        """A GET client whose stalls (connect + read timeout) fit in the
        `remaining` seconds of --retry-timeout, so the bound is real: the
        configured timeouts while they fit, else halving steps (a few more
        clients, made once each, used only near the deadline)."""
        connect, read = self._timeouts
        if connect + read > remaining:
            step = 2.0 ** math.floor(math.log2(max(remaining / 2, MIN_ATTEMPT / 2)))
            connect, read = min(connect, step), min(read, step)
        with self._lock:
            got = self._clients.get((connect, read))
            if got is None:
                got = self._clients[(connect, read)] = self._made(connect, read)
            return got

    def _made(self, connect: float, read: float) -> Any:
        client = self._new_client(connect, read)
        # Time to first byte is counted from the send, not from the call:
        # signing and building the request wait for the GIL on a busy
        # daemon, which is not the origin's time. (None: a handler's value
        # would replace the response.)
        client.meta.events.register(
            "before-send.s3.GetObject", lambda **_: setattr(self._sent, "at", time.monotonic())
        )
        return client

    def get(
        self,
        key: str,
        version: ObjectVersion,
        start: int,
        bufs: Sequence[memoryview],
        deliver: Deliver | None = None,
    ) -> None:
        """One GET of the buffers' total length from `start`, retried with
        backoff and resumed from the last byte received until
        `retry_timeout` runs out (a retry resumes inside the same buffer).

        The body is received straight into the caller's buffers (`recv_into`,
        see `response.receive`): no per-piece objects, no joining copy."""
        self._get(key, version, Sink(start, bufs, deliver))

    def _get(self, key: str, version: ObjectVersion, sink: Sink) -> None:
        start, end = sink.start, sink.end
        what = f"s3://{self.bucket}/{key} bytes {start}-{end - 1}"
        t0 = time.monotonic()
        deadline = sink.deadline = t0 + self.retry_timeout
        sink.what = what
        self.counters.start_get()
        attempts = 0
        error: StoreError | None = None
        try:
            while True:
                attempts += 1
                try:
                    client = self._client_for(deadline - time.monotonic())
                    # Fills the sink to the end of the range, or raises.
                    self._get_once(client, key, version, sink)
                    return
                except _Retry as retry:
                    pause = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempts - 1)))
                    if time.monotonic() + pause + MIN_ATTEMPT > deadline:
                        raise RetriesExhausted(
                            f"{what}: gave up after {attempts} attempts in "
                            f"{time.monotonic() - t0:.1f} s; last error: {retry.error}"
                        ) from None
                    log.debug("GET %s: %s; retrying in %.2f s", what, retry.error, pause)
                    time.sleep(pause)
        except StoreError as exc:
            error = exc
            raise
        finally:
            elapsed = time.monotonic() - t0
            self.counters.end_get(label(error), elapsed, attempts - 1)
            log.debug(
                "GET %s bytes=%d-%d etag=%s: %s in %.1f ms%s",
                key,
                start,
                end - 1,
                version.etag or "-",
                label(error),
                elapsed * 1000,
                f" after {attempts - 1} retries" if attempts > 1 else "",
            )

    def _get_once(self, client: Any, key: str, version: ObjectVersion, sink: Sink) -> None:
        """One GET of the part of the sink's range not yet received, into
        the sink as bytes arrive, so a failure mid-body keeps what was
        received. Raises _Retry for what a retry may cure, a StoreError for
        what it cannot."""
        start, end = sink.start + sink.received, sink.end
        what = f"s3://{self.bucket}/{key} bytes {start}-{end - 1}"
        before = sink.received
        try:
            # Set again by the client's before-send: this is for a response
            # that comes without a send (a handler answering before-call).
            self._sent.at = time.monotonic()
            resp = client.get_object(**self._get_args(key, version, start, end))
            headers_in = time.monotonic() - self._sent.at
            body = resp["Body"]
            try:
                check_response(what, version, start, end, resp)
            except StoreError:
                # Never read a body that is not the range asked for: closing
                # drops the connection instead of draining a whole object.
                body.close()
                raise
            self.counters.first_byte(headers_in)
            receive(body, sink)
        except StoreError:
            raise
        except Exception as exc:
            got = classify(exc, what, self.bucket, self._endpoint)
            raise (_Retry(got.error) if got.retryable else got.error) from None
        finally:
            self.counters.add_get(sink.received - before)
        if sink.received < sink.end - sink.start:
            raise _Retry(
                StoreError(f"body ended after {sink.received - before} of {end - start} bytes")
            )

    def _get_args(self, key: str, version: ObjectVersion, start: int, end: int) -> dict[str, Any]:
        """GetObject's arguments for bytes [start, end) of exactly `version`."""
        args: dict[str, Any] = dict(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        if version.version_id:
            args["VersionId"] = version.version_id
        if version.etag:
            args["IfMatch"] = version.etag
        else:
            # HTTP dates have whole seconds; rounding up keeps a server that
            # compares sub-second mtimes from refusing an unchanged object.
            args["IfUnmodifiedSince"] = datetime.datetime.fromtimestamp(
                -(-version.mtime_ns // 10**9), tz=datetime.UTC
            )
        return args
