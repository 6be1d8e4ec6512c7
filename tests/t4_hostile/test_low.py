"""Hostile tier, small things: forged log lines, secrets in URLs, repeated
warnings, long names."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from modelfs.testing.s3server import free_port

from ..conftest import Bucket, Mounter, mount_fails, run_modelfs
from ..data import pattern

MiB = 1 << 20


@pytest.mark.mount
def test_key_cannot_forge_log_lines(bucket: Bucket, mounter: Mounter) -> None:
    key = "evil\n2026-01-01 00:00:00,000 1 ERROR modelfs: forged line"
    bucket.put(key, pattern(61, 0, 2 * MiB))
    m = mounter(
        bucket,
        args=("--chunk-size", "1M", "--prefetch-on-open", "none", "--prefetch-window", "0"),
        allow_log=["changed since it was opened"],
    )
    name = os.listdir(m.path)[0]
    with open(m.path / name, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        f.read(4096)
        bucket.put(key, pattern(62, 0, 2 * MiB))
        for _ in range(5):
            f.seek(MiB)
            with pytest.raises(OSError) as info:
                f.read(4096)
            assert info.value.errno == errno.ESTALE
    lines = m.log_file.read_text().splitlines()
    assert not any(line.startswith("2026-01-01") for line in lines), "a key forged a log line"
    warned = [line for line in lines if "WARNING" in line and "changed since" in line]
    # One warning for the stale handle, however many reads fail on it.
    assert len(warned) == 1, warned
    assert "evil\\n2026-01-01" in warned[0]


@pytest.mark.mount
def test_endpoint_credentials_never_echoed(tmp_path: Path, bucket: Bucket) -> None:
    port = free_port()  # nothing listens there
    msg = mount_fails(tmp_path, bucket, endpoint=f"http://admin:hunter2@127.0.0.1:{port}")
    assert "hunter2" not in msg and "***@127.0.0.1" in msg, msg
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    assert "hunter2" not in log


@pytest.mark.mount
def test_pull_copies_names_of_up_to_255_bytes(bucket: Bucket, tmp_path: Path) -> None:
    names = {n: pattern(70 + n, 0, 1000 + n) for n in (235, 236, 246, 255)}
    for n, data in names.items():
        bucket.put("d/" + "x" * (n - 4) + ".bin", data)
    out = tmp_path / "out"
    args = ("--endpoint-url", bucket.endpoint_url, "--cache-dir", str(tmp_path / "c"))
    proc = run_modelfs("pull", f"s3://{bucket.name}/d", str(out), *args, env=bucket.env)
    assert proc.returncode == 0, proc.stderr
    for n, data in names.items():
        assert (out / ("x" * (n - 4) + ".bin")).read_bytes() == data
    assert not list(out.rglob("*.modelfs-part"))
    proc = run_modelfs("pull", f"s3://{bucket.name}/d", str(out), *args, env=bucket.env)
    assert proc.returncode == 0, proc.stderr
