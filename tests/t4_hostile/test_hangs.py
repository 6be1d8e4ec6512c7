"""Hostile tier: a stalled endpoint, too few file descriptors, endpoints that
are not S3. Each must end quickly in one clear line, never a hang."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfs.mounts import find_mount, process_alive
from modelfs.testing.fakes3 import FakeS3

from ..conftest import Bucket, Mounter, run_modelfs

pytestmark = pytest.mark.mount


# -- 7: SIGTERM during a stalled GET --------------------------------------------
def test_sigterm_during_a_stalled_get_unmounts_promptly(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter
) -> None:
    fake.put("w.bin", b"x" * (1 << 20))
    m = mounter(fake_bucket, args=("--prefetch-on-open", "none"), allow_log=["failed"])
    fake.stall = 300  # every GET from now on hangs (read timeout 30 s, retries 120 s)
    reader = subprocess.Popen(
        [sys.executable, "-c", f"open({str(m.path / 'w.bin')!r}, 'rb').read()"],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # the GET is in flight
        assert reader.poll() is None
        t0 = time.monotonic()
        os.kill(m.pid, signal.SIGTERM)
        while process_alive(m.pid) and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        took = time.monotonic() - t0
        assert not process_alive(m.pid)
        assert find_mount(m.path) is None
        # The documented bound is 10 s; 122 s before the fix.
        assert took < 20, f"shutdown took {took:.1f} s"
        assert reader.wait(timeout=30) != 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


# -- 8: file descriptors run out --------------------------------------------------
def test_fd_limit_is_raised_and_emfile_is_reported(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    bucket.put("f.bin", b"abc")
    (tmp_path / "mnt").mkdir()
    # The mount starts with a soft limit of 64; its daemon raises it to the hard one.
    start_low = (
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (64, {hard}))\n"
        "sys.argv = ['modelfs', *sys.argv[1:]]\n"
        "runpy.run_module('modelfs', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            start_low,
            "mount",
            f"s3://{bucket.name}",
            str(tmp_path / "mnt"),
            "--endpoint-url",
            bucket.endpoint_url,
            "--cache-dir",
            str(tmp_path / "c"),
            "--log-file",
            str(tmp_path / "l.log"),
        ],
        env=dict(os.environ, **bucket.env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pid = int(os.getxattr(tmp_path / "mnt", "user.modelfs.pid"))
    try:
        with open(f"/proc/{pid}/limits") as f:
            line = next(x for x in f if x.startswith("Max open files"))
        assert int(line.split()[3]) == int(line.split()[4]) == hard
        assert (tmp_path / "mnt" / "f.bin").read_bytes() == b"abc"
    finally:
        subprocess.run(["fusermount3", "-u", str(tmp_path / "mnt")], check=False)
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_emfile_is_not_retried_as_a_network_error() -> None:
    # The store's classification: EMFILE under a connection error is this
    # process's problem, reported at once, never retried for 120 s.
    from botocore.exceptions import EndpointConnectionError

    from modelfs.errors import OutOfFileDescriptors
    from modelfs.s3.errors import classify

    inner = OSError(errno.EMFILE, "Too many open files")
    outer = EndpointConnectionError(endpoint_url="http://x")
    outer.__context__ = inner
    got = classify(outer, "GET k", "b", "http://x")
    assert isinstance(got.error, OutOfFileDescriptors) and not got.retryable
    assert got.label == "out_of_fds"
    plain = classify(EndpointConnectionError(endpoint_url="http://x"), "GET k", "b", "http://x")
    assert plain.retryable and not isinstance(plain.error, OutOfFileDescriptors)


# -- 11: endpoints that are not S3 --------------------------------------------------
@pytest.mark.parametrize("status", [200, 404])
def test_html_endpoint_is_refused_in_one_line(fake: FakeS3, tmp_path: Path, status: int) -> None:
    fake.html = status
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_modelfs(
        "mount",
        "s3://fake/models",
        str(mnt),
        "--endpoint-url",
        fake.endpoint_url,
        "--cache-dir",
        str(tmp_path / "c"),
        env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
    )
    assert proc.returncode == 1
    assert "did not answer like S3" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert find_mount(mnt) is None


# -- round 2, 5: a body that trickles in ---------------------------------------------
def test_trickling_body_is_bounded_by_the_retry_timeout(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter
) -> None:
    """Headers at once, then a byte every 0.5 s: every recv returns within
    the read timeout, so only a deadline over the whole body ends it."""
    fake.put("t.bin", b"t" * (1 << 20))
    m = mounter(
        fake_bucket,
        args=("--prefetch-on-open", "none", "--retry-timeout", "4", "--read-timeout", "2"),
        allow_log=["retry-timeout|gave up"],
    )
    fake.trickle = 0.5
    reader = subprocess.Popen(
        [sys.executable, "-c", f"open({str(m.path / 't.bin')!r}, 'rb').read()"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The documented bound: --retry-timeout (4 s), then EIO. Before the
        # fix the read was still blocked after 60 s.
        _, err = reader.communicate(timeout=40)
        assert reader.returncode != 0
        assert "Input/output error" in err, err
        assert "still arriving" in m.log_file.read_text()
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        fake.trickle = 0.0


# -- round 2, 6: a hostile safetensors header ------------------------------------------
def test_hostile_safetensors_header_never_freezes_the_mount(
    bucket: Bucket, mounter: Mounter
) -> None:
    """A 151-byte file whose header names 10^18 bytes of tensor data, opened
    with the default prefetch on open: before the fix the trio thread looped
    over ~10^11 chunk numbers, and nothing else was answered."""
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e18]}}).encode()
    evil = struct.pack("<Q", len(header)) + header
    evil += b"\0" * (151 - len(evil))
    bucket.put("evil.safetensors", evil)
    bucket.put("good.bin", b"g" * 4096)
    m = mounter(bucket)

    def run(code: str) -> subprocess.CompletedProcess[str]:
        # A frozen mount blocks these forever; 30 s is the bound the issue saw broken.
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )

    assert (m.path / "evil.safetensors").read_bytes() == evil
    assert run(f"print(sorted(__import__('os').listdir({str(m.path)!r})))").stdout.strip() == (
        "['evil.safetensors', 'good.bin']"
    )
    got = run(f"print(len(open({str(m.path / 'good.bin')!r}, 'rb').read()))")
    assert got.stdout.strip() == "4096", got.stderr
    assert run_modelfs("stats", str(m.path), timeout=30).returncode == 0
    m.umount()


# -- round 2, minor: stray signals ----------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM])
def test_stray_signals_leave_the_mount_serving(
    bucket: Bucket, mounter: Mounter, sig: signal.Signals
) -> None:
    bucket.put("f.bin", b"still here")
    m = mounter(bucket)
    os.kill(m.pid, sig)
    time.sleep(0.5)
    assert process_alive(m.pid), f"{sig.name} killed the daemon"
    assert (m.path / "f.bin").read_bytes() == b"still here"
    m.umount()


def test_a_slow_steady_body_is_not_taken_for_a_stalled_one(
    fake: FakeS3, fake_bucket: Bucket, mounter: Mounter
) -> None:
    """640 KB/s, a piece every 0.1 s, under a 1 s read timeout: bodies are
    received with a low-water mark (fewer wake-ups per GiB), and a mark the
    link cannot fill within the read timeout made every GET time out (the
    2 MiB range in 3.2 s). Byte-exact, and not one retry logged."""
    data = bytes(range(256)) * (8 << 10)  # 2 MiB
    fake.put("s.bin", data)
    fake.pace = (64 << 10, 0.1)
    try:
        m = mounter(
            fake_bucket,
            args=("--prefetch-on-open", "none", "--read-timeout", "1", "--prefetch-window", "0"),
        )
        assert (m.path / "s.bin").read_bytes() == data
        assert m.stats()["store"]["retries"] == 0
    finally:
        fake.pace = None
