"""Start-up failures: each exits non-zero with one line naming the cause,
never a traceback, and leaves no mount and no daemon behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelfs.mounts import find_mount
from modelfs.testing.s3server import free_port

from ..conftest import Bucket, mount_fails, run_modelfs

pytestmark = pytest.mark.mount


def test_wrong_credentials(tmp_path: Path, bucket: Bucket) -> None:
    env = dict(bucket.env, AWS_SECRET_ACCESS_KEY="wrong")
    msg = mount_fails(tmp_path, bucket, env=env)
    assert "access denied" in msg and "credentials" in msg


def test_missing_bucket(tmp_path: Path, bucket: Bucket) -> None:
    msg = mount_fails(tmp_path, bucket, source="s3://no-such-bucket-here")
    assert "no-such-bucket-here" in msg and "does not exist" in msg


def test_unreachable_endpoint(tmp_path: Path, bucket: Bucket) -> None:
    port = free_port()  # nothing listens there
    msg = mount_fails(tmp_path, bucket, endpoint=f"http://127.0.0.1:{port}")
    assert "cannot reach" in msg and str(port) in msg


def test_missing_mountpoint(tmp_path: Path, bucket: Bucket) -> None:
    msg = mount_fails(tmp_path, bucket, mnt=tmp_path / "nope")
    assert "does not exist" in msg


def test_mountpoint_is_a_file(tmp_path: Path, bucket: Bucket) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in mount_fails(tmp_path, bucket, mnt=f)


def test_busy_mountpoint(tmp_path: Path, bucket: Bucket, mounter) -> None:
    bucket.put("f", b"x")
    m = mounter(bucket)
    msg = mount_fails(tmp_path, bucket, mnt=m.path)
    assert "busy" in msg
    assert (m.path / "f").read_bytes() == b"x"  # the first mount is untouched
    m.umount()


def test_unknown_cache_format_is_refused(tmp_path: Path, bucket: Bucket) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "modelfs-cache.json").write_text(json.dumps({"format": 99}))
    bucket.put("f.bin", b"x")  # an empty bucket would fail first, for that
    msg = mount_fails(tmp_path, bucket)
    assert "format 99" in msg


def test_foreign_directory_is_not_taken_as_cache(tmp_path: Path, bucket: Bucket) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "precious.txt").write_text("keep me")
    assert "not a modelfs cache" in mount_fails(tmp_path, bucket)
    assert (cache / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--chunk-size", "12Q"), "invalid --chunk-size"),
        (("--chunk-size", "1K"), "--chunk-size must be between"),
        (("--cache-size", "lots"), "invalid --cache-size"),
        (("--metadata-ttl", "-1"), "--metadata-ttl must be >= 0"),
        (("--addressing-style", "sideways"), "invalid choice"),
        (("--shared-cache", "http://x/y"), "expected s3://BUCKET"),
        (("--min-free-space", "much"), "invalid --min-free-space"),
        (
            ("--shared-cache", "s3://tier/c", "--shared-cache-profile", "nosuch"),
            "cannot load AWS profile 'nosuch'",
        ),
    ],
)
def test_bad_options(tmp_path: Path, bucket: Bucket, args: tuple[str, ...], expected: str) -> None:
    bucket.put("f.bin", b"x")  # an empty bucket would fail first, for that
    assert expected in mount_fails(tmp_path, bucket, *args)


def test_bad_source_url(tmp_path: Path, bucket: Bucket) -> None:
    assert "expected s3://BUCKET" in mount_fails(tmp_path, bucket, source="http://x/y")


def test_umount_of_something_else(tmp_path: Path) -> None:
    proc = run_modelfs("umount", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"modelfs: error: {tmp_path} is not inside a modelfs mount"
    proc = run_modelfs("umount", "/proc")
    assert proc.returncode == 1 and "not a modelfs mount" in proc.stderr


def test_umount_after_daemon_was_killed(bucket: Bucket, mounter) -> None:
    bucket.put("f", b"x")
    m = mounter(bucket)
    m.kill()
    with pytest.raises(OSError):
        os.listdir(m.path)  # ENOTCONN: the mount is dead
    proc = run_modelfs("umount", str(m.path))
    assert proc.returncode == 0, proc.stderr
    assert find_mount(m.path) is None
