"""Security defaults: a private cache, a read-only mount, and other users
kept out unless --allow-other is asked for."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from modelfs.mounts import find_mount

from ..conftest import Bucket, Mount, Mounter, run_modelfs
from ..data import pattern

pytestmark = pytest.mark.mount

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_cache_directory_is_private(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("d/w.bin", pattern(50, 0, 3 << 20))
    m = mounter(bucket, args=("--chunk-size", "1M"))
    assert (m.path / "d/w.bin").read_bytes() == pattern(50, 0, 3 << 20)
    m.umount()
    seen = 0
    for dirpath, _dirnames, filenames in os.walk(m.cache_dir):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for name in filenames:
            mode = stat.S_IMODE(os.stat(Path(dirpath) / name).st_mode)
            assert mode & 0o077 == 0, (name, oct(mode))
            seen += 1
    assert seen >= 5  # format file, lock, index files, a payload file


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *cmd], capture_output=True, text=True, timeout=30)


def test_other_users_are_kept_out_by_default(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("f", b"secret weights")
    m = mounter(bucket)
    assert (m.path / "f").read_bytes() == b"secret weights"
    proc = _as_nobody("cat", str(m.path / "f"))
    assert proc.returncode != 0 and "Permission denied" in proc.stderr
    opts = Path("/proc/self/mountinfo").read_text()
    line = next(ln for ln in opts.splitlines() if f" {m.path} " in ln)
    assert "allow_other" not in line and "default_permissions" in line and " ro," in line


def test_allow_other_with_owner_and_permissions(
    tmp_path: Path, bucket: Bucket, mounter: Mounter
) -> None:
    bucket.put("f", b"shared weights")
    # pytest's own directories are 0700: mount where another user can reach.
    mnt = Path(tempfile.mkdtemp(prefix="modelfs-allow-other-"))
    mnt.chmod(0o755)
    proc = run_modelfs(
        "mount",
        f"s3://{bucket.name}",
        str(mnt),
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-file",
        str(tmp_path / "log"),
        "--allow-other",
        "--uid",
        "1234",
        "--gid",
        "5678",
        env=bucket.env,
    )
    assert proc.returncode == 0, proc.stderr
    m = Mount(mnt, tmp_path / "cache", tmp_path / "log", int(os.getxattr(mnt, "user.modelfs.pid")))
    mounter.mounts.append(m)  # torn down with the others
    st = os.stat(m.path / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o444)
    proc = _as_nobody("cat", str(m.path / "f"))
    assert proc.returncode == 0 and proc.stdout == "shared weights"
    # default_permissions: the kernel checks modes, so nobody cannot write
    # even where FUSE would be asked; the mount is read-only anyway.
    proc = _as_nobody("sh", "-c", f"echo x > {m.path}/new")
    assert proc.returncode != 0
    entry = find_mount(m.path)
    assert entry is not None
    line = next(
        ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if f" {m.path} " in ln
    )
    assert "allow_other" in line and "default_permissions" in line
    m.umount()
    mnt.rmdir()
