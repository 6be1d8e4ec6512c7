"""Crash safety: the daemon killed with SIGKILL at random moments while
chunks are in flight and being written; the next mount (made straight over
the dead one) must never serve a wrong byte, and keeps what was committed."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import threading
import time

import pytest

from ..conftest import Bucket, Mounter, run_modelfs
from ..data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20


def test_sigkill_mid_download_never_yields_a_wrong_byte(
    bucket: Bucket, proxy, mounter: Mounter
) -> None:
    data = pattern(60, 0, 48 * MiB + 17)
    bucket.put("model.safetensors", data)
    rng = random.Random(int(os.environ.get("MODELFS_CRASH_SEED", "7")))
    proxy.rate = 40 * MiB  # slow enough that kills land mid-transfer
    m = mounter(bucket, endpoint_url=proxy.endpoint_url, args=("--chunk-size", "1M"))
    pid = m.pid
    for _round in range(4):
        # Read in the background and kill the daemon at a random moment.
        def reader(path=m.path / "model.safetensors") -> None:  # type: ignore[no-untyped-def]
            try:
                with open(path, "rb") as f:
                    while f.read(4 * MiB):
                        pass
            except OSError:
                pass  # ENOTCONN once the daemon is gone

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(rng.uniform(0.05, 0.8))
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive()
        # Mount again over the dead mount: no umount needed.
        proc = run_modelfs(
            "mount",
            f"s3://{bucket.name}",
            str(m.path),
            "--endpoint-url",
            proxy.endpoint_url,
            "--cache-dir",
            str(m.cache_dir),
            "--log-file",
            str(m.log_file),
            "--chunk-size",
            "1M",
            env=bucket.env,
        )
        assert proc.returncode == 0, proc.stderr
        pid = int(os.getxattr(m.path, "user.modelfs.pid"))
        m.pid = pid  # the fixture tears down the live one
    proxy.rate = None
    cached_before = int(os.getxattr(m.path / "model.safetensors", "user.modelfs.cached"))
    proxy.reset()
    with open(m.path / "model.safetensors", "rb") as f:
        assert f.read() == data  # every byte right, cached or not
    # What earlier rounds committed was not fetched again.
    assert proxy.object_bytes() <= len(data) - cached_before + 2 * MiB
    assert cached_before > 0


@pytest.mark.allow_log("failed its checksum")
def test_corrupt_or_truncated_payload_is_detected_and_fetched_again(
    bucket: Bucket, proxy, mounter: Mounter
) -> None:
    data = pattern(61, 0, 6 * MiB)
    bucket.put("w.safetensors", data)
    args = ("--chunk-size", "1M", "--prefetch-on-open", "none", "--prefetch-window", "0")
    m = mounter(bucket, endpoint_url=proxy.endpoint_url, args=args)
    assert (m.path / "w.safetensors").read_bytes() == data
    m.umount()
    (payload,) = [p for p in (m.cache_dir / "data").glob("*/*")]
    with open(payload, "r+b") as f:
        f.seek(2 * MiB + 100)
        f.write(b"\xff")  # a flipped byte in chunk 2
        f.truncate(5 * MiB + 10)  # and chunk 5 cut short
    m2 = mounter(
        bucket, endpoint_url=proxy.endpoint_url, args=args, allow_log=["failed its checksum"]
    )
    proxy.reset()
    assert (m2.path / "w.safetensors").read_bytes() == data
    assert sorted(r.range for r in proxy.object_gets()) == [
        f"bytes={2 * MiB}-{3 * MiB - 1}",
        f"bytes={5 * MiB}-{6 * MiB - 1}",
    ]
    warnings = [ln for ln in m2.log_file.read_text().splitlines() if "failed its checksum" in ln]
    assert len(warnings) == 2 and all("w.safetensors" in w for w in warnings)
    assert m2.stats()["cache"]["corrupt_chunks"] == 2


def test_sigkill_between_payload_write_and_commit_claims_nothing(
    bucket: Bucket, proxy, mounter: Mounter, tmp_path
) -> None:
    """The crash state write-behind adds: a reader already has the chunk,
    its bytes are in the payload file, the index commit has not happened.
    After SIGKILL the index claims nothing it did not commit, and the next
    mount fetches that chunk again and serves every byte right."""
    data = pattern(62, 0, 3 * MiB)
    bucket.put("w.safetensors", data)
    marker = tmp_path / "stalled-before-commit"
    stalling = dataclasses.replace(
        bucket, env={**bucket.env, "MODELFS_TEST_STALL_BEFORE_COMMIT": str(marker)}
    )
    args = ("--chunk-size", "1M", "--prefetch-on-open", "none", "--prefetch-window", "0")
    m = mounter(stalling, endpoint_url=proxy.endpoint_url, args=args)
    with open(m.path / "w.safetensors", "rb") as f:
        assert f.read(MiB) == data[:MiB]  # served before its store finished
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the store never reached its index commit"
    m.kill()
    (payload,) = list((m.cache_dir / "data").glob("*/*"))
    with open(payload, "rb") as f:
        assert f.read(MiB) == data[:MiB]  # the payload write happened...
    du = run_modelfs("cache", "du", "--cache-dir", str(m.cache_dir))
    assert du.returncode == 0, du.stderr
    assert re.search(r"^chunks\s+0 B in 0 chunks", du.stdout, re.M), du.stdout  # ...unclaimed
    m2 = mounter(bucket, endpoint_url=proxy.endpoint_url, cache_dir=m.cache_dir, args=args)
    proxy.reset()
    assert (m2.path / "w.safetensors").read_bytes() == data
    assert sorted(r.range for r in proxy.object_gets()) == [
        f"bytes={n * MiB}-{(n + 1) * MiB - 1}" for n in range(3)
    ]
    m2.umount()
    verify = run_modelfs("cache", "verify", "--cache-dir", str(m.cache_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
