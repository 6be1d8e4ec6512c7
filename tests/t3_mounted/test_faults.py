"""Reads through a flaky origin: resets, truncated bodies, stalls and
bursts of 503 SlowDown, injected by the proxy between the mount and the
server. Every read stays byte-exact and the mount stays responsive; when the
retry bound runs out the read fails with EIO and one log line."""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading
import time
from pathlib import Path

import pytest

from modelfs.testing.proxy import Fault

from ..conftest import Bucket, Mounter
from ..data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20
FILES = {
    "model-00001.safetensors": pattern(21, 0, 9 * MiB + 3),
    "model-00002.safetensors": pattern(22, 0, 7 * MiB),
    "tokenizer.json": pattern(23, 0, 300_000),
}


def _object_get(method: str, path: str, rng: str | None) -> bool:
    return method == "GET" and rng is not None


def test_whole_model_byte_exact_through_injected_faults(
    bucket: Bucket, proxy, mounter: Mounter
) -> None:
    for key, data in FILES.items():
        bucket.put(key, data)
    kinds = itertools.cycle(
        [
            Fault(status=503, code="SlowDown"),
            Fault(reset_after=200_000),
            None,
            Fault(truncate_after=300_000),
            Fault(stall=2.5),  # longer than --read-timeout
            Fault(status=500, code="InternalError"),
            None,
        ]
    )
    lock = threading.Lock()

    def plan(method: str, path: str, rng: str | None) -> Fault | None:
        if not _object_get(method, path, rng):
            return None
        with lock:
            return next(kinds)

    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=("--chunk-size", "1M", "--read-timeout", "1", "--retry-timeout", "60"),
    )
    proxy.fault = plan
    # The mount answers while reads are retrying.
    stop = threading.Event()
    stat_times: list[float] = []

    def poke() -> None:
        while not stop.is_set():
            t = time.monotonic()
            os.stat(m.path)
            os.listdir(m.path)
            stat_times.append(time.monotonic() - t)
            time.sleep(0.1)

    poker = threading.Thread(target=poke)
    poker.start()
    try:
        for key, data in FILES.items():
            assert (m.path / key).read_bytes() == data, key
    finally:
        stop.set()
        poker.join()
    proxy.fault = None
    reqs = proxy.snapshot()
    assert any(r.status == 503 for r in reqs) and any(r.status == 500 for r in reqs)
    # Resumed, not restarted: some retries ask for a range that starts where
    # a cut-off body stopped, inside a chunk.
    starts = [int(r.range.split("=")[1].split("-")[0]) for r in reqs if r.range]
    assert any(s % MiB in (200_000, 300_000) for s in starts), starts
    stats = m.stats()["store"]
    assert stats["retries"] > 0
    assert stats["get_results"].get("gave_up", 0) == 0
    assert stat_times and max(stat_times) < 5  # never stuck behind the retries


@pytest.mark.allow_log("gave up after")
def test_retry_bound_gives_eio_and_one_log_line(bucket: Bucket, proxy, mounter: Mounter) -> None:
    bucket.put("w.bin", pattern(24, 0, 3 * MiB))
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=(
            "--chunk-size",
            "1M",
            "--retry-timeout",
            "2",
            "--prefetch-on-open",
            "none",
            "--prefetch-window",
            "0",  # no read-ahead: every fetch here is one a reader waits for
        ),
        allow_log=["gave up after"],
    )
    proxy.fault = lambda method, path, rng: (
        Fault(status=503) if _object_get(method, path, rng) else None
    )
    t = time.monotonic()
    with open(m.path / "w.bin", "rb", buffering=0) as f, pytest.raises(OSError) as info:
        os.pread(f.fileno(), 4096, 0)
    assert info.value.errno == errno.EIO
    assert time.monotonic() - t < 30
    os.listdir(m.path)  # still alive
    lines = [ln for ln in m.log_file.read_text().splitlines() if "gave up after" in ln]
    # One line per fetch that gave up, whatever the number of reads waiting
    # on it (the kernel may ask twice for a page whose first read failed).
    assert 1 <= len(lines) == m.stats()["store"]["get_results"]["gave_up"], lines
    assert re.search(r"s3://\S+/w\.bin bytes 0-1048575: gave up after \d+ attempts", lines[0])
    assert "SlowDown" in lines[0]
    proxy.fault = None
    with open(m.path / "w.bin", "rb") as f:  # the origin is back: reads work again
        assert f.read() == pattern(24, 0, 3 * MiB)


@pytest.mark.parametrize(
    "status, code, expected",
    [(403, "AccessDenied", errno.EACCES), (404, "NoSuchKey", errno.ENOENT)],
)
def test_errors_that_no_retry_cures(
    bucket: Bucket, proxy, mounter: Mounter, status: int, code: str, expected: int
) -> None:
    bucket.put("w.bin", pattern(25, 0, MiB))
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=("--prefetch-on-open", "none"),
        allow_log=[f"read failed: .*{code.replace('NoSuchKey', 'no such key')}|access denied"],
    )
    proxy.fault = lambda method, path, rng: (
        Fault(status=status, code=code) if _object_get(method, path, rng) else None
    )
    with open(m.path / "w.bin", "rb", buffering=0) as f, pytest.raises(OSError) as info:
        os.pread(f.fileno(), 10, 0)
    assert info.value.errno == expected
    store = m.stats()["store"]
    assert store["retries"] == 0  # answered at once, never retried
    assert len([r for r in proxy.snapshot() if r.range]) == sum(store["get_results"].values())


def test_bad_timeouts_are_refused(tmp_path: Path, bucket: Bucket) -> None:
    from ..conftest import run_modelfs

    (tmp_path / "mnt").mkdir()
    proc = run_modelfs(
        "mount", f"s3://{bucket.name}", str(tmp_path / "mnt"), "--retry-timeout", "0"
    )
    assert proc.returncode != 0 and "--retry-timeout must be a positive" in proc.stderr
