"""Hostile tier: refused mounts leave the machine as it was; damage to the
cache is survived; paths through symlinks name what they point to."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from modelfs.mounts import find_mount

from ..conftest import Bucket, Mounter, run_modelfs
from ..data import pattern

pytestmark = pytest.mark.mount


def _snapshot(d: Path) -> tuple[int, list[str]]:
    return stat.S_IMODE(d.stat().st_mode), sorted(p.name for p in d.iterdir())


# -- 5: a refused --cache-dir is left untouched -------------------------------
@pytest.mark.parametrize("command", ["mount", "pull"])
def test_refused_cache_dir_is_left_untouched(bucket: Bucket, tmp_path: Path, command: str) -> None:
    bucket.put("f.bin", b"abc")
    # Like / or /tmp: someone else's non-empty directory, readable by all.
    victim = tmp_path / "shared"
    victim.mkdir()
    (victim / "bin").mkdir()
    (victim / "notes.txt").write_text("x")
    victim.chmod(0o1777)
    before = _snapshot(victim)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    target = str(mnt) if command == "mount" else str(tmp_path / "out")
    proc = run_modelfs(
        command,
        f"s3://{bucket.name}",
        target,
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(victim),
        env=bucket.env,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "not empty and is not a modelfs cache" in proc.stderr
    assert _snapshot(victim) == before
    assert find_mount(mnt) is None


def test_empty_existing_cache_dir_keeps_its_mode(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    bucket.put("f.bin", b"abc")
    shared = tmp_path / "empty"
    shared.mkdir()
    shared.chmod(0o750)
    m = mounter(bucket, cache_dir=shared)
    assert (m.path / "f.bin").read_bytes() == b"abc"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750  # not modelfs's to change


# -- 6: a cache directory inside the mountpoint ---------------------------------
@pytest.mark.parametrize("where", ["cache", "log"])
def test_cache_or_log_inside_mountpoint_is_refused(
    bucket: Bucket, tmp_path: Path, where: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    inside = ["--cache-dir", str(mnt / "c")] if where == "cache" else ["--log-file", str(mnt / "l")]
    if where == "log":
        inside += ["--cache-dir", str(tmp_path / "c")]
    proc = run_modelfs(
        "mount",
        f"s3://{bucket.name}",
        str(mnt),
        "--endpoint-url",
        bucket.endpoint_url,
        *inside,
        env=bucket.env,
    )
    assert proc.returncode == 1
    assert "inside the mountpoint" in proc.stderr and proc.stderr.count("\n") == 1
    assert find_mount(mnt) is None
    assert list(mnt.iterdir()) == []


# -- 10: symlinks to mountpoints ----------------------------------------------
def test_symlink_to_mountpoint_is_the_mountpoint(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    bucket.put("f.bin", b"abc")
    m = mounter(bucket)
    link = tmp_path / "link"
    link.symlink_to(m.path)
    proc = run_modelfs(
        "mount",
        f"s3://{bucket.name}",
        str(link),
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(tmp_path / "c2"),
        env=bucket.env,
    )
    assert proc.returncode == 1 and "busy" in proc.stderr
    with open("/proc/self/mountinfo") as f:
        assert sum(str(m.path) in line.split()[4] for line in f) == 1  # not stacked
    proc = run_modelfs("umount", str(link))
    assert proc.returncode == 0, proc.stderr
    assert find_mount(m.path) is None


# -- 9: a damaged index --------------------------------------------------------
def _truncate(index: Path) -> None:
    data = index / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(8192)  # the two meta pages survive; the tree does not


def _garble(index: Path) -> None:
    data = index / "data.mdb"
    with open(data, "r+b") as f:
        f.write(os.urandom(16384))


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
def test_damaged_index_is_set_aside(
    bucket: Bucket, mounter: Mounter, tmp_path: Path, damage
) -> None:  # type: ignore[no-untyped-def]
    data = pattern(51, 0, 3 << 20)
    bucket.put("w.bin", data)
    cache = tmp_path / "c"
    m = mounter(bucket, cache_dir=cache, args=("--chunk-size", "1M"))
    assert (m.path / "w.bin").read_bytes() == data
    m.umount()
    damage(cache / "index")

    # Read-only inspection names the problem in one line (no SIGBUS).
    proc = run_modelfs("cache", "verify", "--cache-dir", str(cache))
    assert proc.returncode == 1 and "damaged" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1

    # A mount sets it aside, with one warning, and works.
    m = mounter(bucket, cache_dir=cache, args=("--chunk-size", "1M"), allow_log=["is damaged"])
    assert (m.path / "w.bin").read_bytes() == data
    assert sum("is damaged" in line for line in m.log_file.read_text().splitlines()) == 1
    assert len(list(cache.glob("index.damaged-*"))) == 1
    m.umount()
    # And the fresh index is a working cache: verify and clear succeed.
    assert run_modelfs("cache", "verify", "--cache-dir", str(cache)).returncode == 0


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
def test_cache_clear_works_on_a_damaged_index(
    bucket: Bucket, mounter: Mounter, tmp_path: Path, damage
) -> None:  # type: ignore[no-untyped-def]
    bucket.put("w.bin", pattern(52, 0, 2 << 20))
    cache = tmp_path / "c"
    m = mounter(bucket, cache_dir=cache, args=("--chunk-size", "1M"))
    (m.path / "w.bin").read_bytes()
    m.umount()
    damage(cache / "index")
    proc = run_modelfs("cache", "clear", "--cache-dir", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert "damaged" in proc.stderr  # the one warning
    assert run_modelfs("cache", "du", "--cache-dir", str(cache)).returncode == 0


# -- round 2, 7: links inside the cache directory ---------------------------------
def _tree(d: Path) -> dict[str, bytes]:
    """Every file under `d` (links not followed) with its bytes."""
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _link_in(cache: Path, part: str, victim: Path) -> None:
    """Replace `part` of a real cache with a link to `victim` (a copy of the
    part's own contents, so a write or delete through it would show)."""
    first = next((cache / "data").iterdir())  # data/<xx>
    payload = next(first.iterdir())  # data/<xx>/<id>
    where = {
        "data": cache / "data",
        "data/xx": first,
        "data/xx/id": payload,
        "index": cache / "index",
        "modelfs.log": cache / "modelfs.log",
    }[part]
    if where.is_dir():
        shutil.copytree(where, victim)
        shutil.rmtree(where)
    else:
        victim.write_bytes(b"the operator's own file\n" * 1000)
        where.unlink()
    where.symlink_to(victim)


@pytest.mark.parametrize("part", ["data", "data/xx", "data/xx/id", "index", "modelfs.log"])
def test_links_in_the_cache_are_refused_and_never_followed(
    bucket: Bucket, tmp_path: Path, part: str
) -> None:
    data = pattern(61, 0, 3 << 20)
    bucket.put("w.bin", data)
    cache = tmp_path / "c"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ("--endpoint-url", bucket.endpoint_url, "--cache-dir", str(cache))
    # A real cache, its default log inside it.
    proc = run_modelfs("pull", f"s3://{bucket.name}", str(tmp_path / "out"), *args, env=bucket.env)
    assert proc.returncode == 0, proc.stderr
    (cache / "modelfs.log").write_text("")
    victim = tmp_path / "victim"
    _link_in(cache, part, victim)
    before = _tree(victim) if victim.is_dir() else {"": victim.read_bytes()}
    assert before

    for command in (("cache", "gc", "0"), ("cache", "clear"), ("cache", "verify", "--repair")):
        proc = run_modelfs(*command, "--cache-dir", str(cache))
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "symbolic link" in proc.stderr, proc.stderr
    proc = run_modelfs("mount", f"s3://{bucket.name}", str(mnt), *args, env=bucket.env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "symbolic link" in proc.stderr
    assert find_mount(mnt) is None
    proc = run_modelfs("pull", f"s3://{bucket.name}", str(tmp_path / "o2"), *args, env=bucket.env)
    assert proc.returncode == 1 and "symbolic link" in proc.stderr, proc.stderr

    after = _tree(victim) if victim.is_dir() else {"": victim.read_bytes()}
    assert after == before, "modelfs changed files outside its cache directory"


def test_payload_link_made_while_mounted_is_never_written(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    """A link planted after the mount started, where the payload file of
    an object not yet opened will go: the open refuses to follow it, and
    the object is served uncached (the storage warning), byte-exact."""
    from modelfs.store import ObjectVersion

    data = pattern(62, 0, 2 << 20)
    etag = bucket.put("w.bin", data)
    m = mounter(
        bucket, args=("--prefetch-on-open", "none"), allow_log=["cannot write to the cache"]
    )
    obj_id = ObjectVersion(etag=etag, size=len(data), mtime_ns=0).identity().hex()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me\n")
    (m.cache_dir / "data" / obj_id[:2]).mkdir(parents=True, exist_ok=True)
    (m.cache_dir / "data" / obj_id[:2] / obj_id).symlink_to(victim)
    assert (m.path / "w.bin").read_bytes() == data
    m.settle()
    assert victim.read_bytes() == b"keep me\n"
