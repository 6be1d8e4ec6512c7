"""Snapshot mounts and manifests (--snapshot, --manifest, `modelfs snapshot`),
mounted: moto for a versioned bucket (the JuiceFS gateway keeps no
versions), the JuiceFS gateway for an unversioned one (the format and the
layers alone: tests/t1_unit/test_manifest.py). What the
origin sent is counted by a proxy, and every byte read is compared with the
version the snapshot pinned.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import urllib.request
from pathlib import Path

import pytest

from modelfs.mounts import find_mount
from modelfs.testing.proxy import CountingProxy
from modelfs.testing.s3server import MotoServer, free_port

from ..conftest import Bucket, Mounter, modelfs_daemons, mount_fails, run_modelfs
from ..data import manifest_doc

MiB = 1 << 20
CHUNK = "1M"


def _data(seed: int, size: int) -> bytes:
    block = hashlib.sha256(f"{seed}".encode()).digest() * 128  # 4 KiB
    return (block * (size // len(block) + 1))[:size]


MODEL = {
    "m/config.json": _data(1, 700),
    "m/model-00001-of-00003.safetensors": _data(2, 3 * MiB + 123),
    "m/model-00002-of-00003.safetensors": _data(3, 2 * MiB),
    "m/model-00003-of-00003.safetensors": _data(4, 2 * MiB + 5),
    "m/tokenizer/vocab.txt": _data(5, 3000),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _publish(bucket: Bucket, seed: int = 0) -> dict[str, bytes]:
    """Upload the model (seed 0) or a new revision of every file (other seeds)."""
    files = {
        k: v if seed == 0 else _data(seed * 100 + i, len(v) + seed)
        for i, (k, v) in enumerate(MODEL.items())
    }
    for key, data in files.items():
        bucket.put(key, data)
    return files


def _versioned(bucket: Bucket) -> Bucket:
    bucket.client.put_bucket_versioning(
        Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    return bucket


def _snapshot(bucket: Bucket, out: Path, endpoint: str | None = None) -> dict:
    proc = run_modelfs(
        "snapshot",
        f"s3://{bucket.name}/m",
        "-o",
        str(out),
        "--endpoint-url",
        endpoint or bucket.endpoint_url,
        env=bucket.env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the manifest went to the file
    return dict(json.loads(out.read_text()))


def _check(bucket: Bucket, manifest: Path, *extra: str) -> tuple[int, str]:
    proc = run_modelfs(
        "snapshot",
        "--check",
        str(manifest),
        "--endpoint-url",
        bucket.endpoint_url,
        *extra,
        env=bucket.env,
    )
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stdout


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# -- mounts ---------------------------------------------------------------
@pytest.mark.mount
@pytest.mark.slow
def test_versioned_manifest_mount_reads_the_old_bytes_by_version_id(
    moto: MotoServer, moto_bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    bucket = _versioned(moto_bucket)
    old = _publish(bucket)
    manifest = tmp_path / "manifest.json"
    doc = _snapshot(bucket, manifest)
    assert doc["versioned"] is True
    assert all(o["version_id"] for o in doc["objects"])
    assert _check(bucket, manifest) == (0, "")

    # The publisher overwrites every file in place and deletes one.
    _publish(bucket, seed=1)
    bucket.client.delete_object(Bucket=bucket.name, Key="m/tokenizer/vocab.txt")
    rc, out = _check(bucket, manifest)
    assert rc == 1
    assert sorted(line.split()[0] for line in out.splitlines()) == ["changed"] * 4 + ["deleted"]
    assert all("the pinned version is still readable" in line for line in out.splitlines())
    rc, out = _check(bucket, manifest, "--json")
    assert rc == 1
    diffs = {d["key"]: d for d in json.loads(out)}
    assert diffs["m/tokenizer/vocab.txt"]["change"] == "deleted"
    assert diffs["m/config.json"]["manifest"]["version_id"] == doc["objects"][0]["version_id"]
    assert diffs["m/config.json"]["now"]["version_id"] != doc["objects"][0]["version_id"]

    proxy = CountingProxy(moto.endpoint_url).start()
    try:
        m = mounter(
            bucket,
            "m",
            endpoint_url=proxy.endpoint_url,
            args=("--manifest", str(manifest), "--chunk-size", CHUNK),
        )
        assert m.stats()["source"] == f"s3://{bucket.name}/m/"
        got = _tree(m.path)
        assert got == {k.removeprefix("m/"): v for k, v in old.items()}
        gets = proxy.object_gets()
        assert gets, "nothing was fetched"
        by_key = {o["key"]: o["version_id"] for o in doc["objects"]}
        for r in gets:
            key = r.path.split("/", 2)[2]
            assert f"versionId={by_key[key]}" in r.query, (r.path, r.query)
        assert proxy.object_bytes() == sum(len(v) for v in old.values())
        stats = m.stats()["snapshot"]
        assert stats["objects"] == len(MODEL) and stats["version_ids"] == len(MODEL)
        assert stats["stale"] == 0
    finally:
        proxy.stop()

    # pull --manifest copies the same versions, source taken from the manifest.
    dest = tmp_path / "copy"
    proc = run_modelfs(
        "pull",
        "--manifest",
        str(manifest),
        str(dest),
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(tmp_path / "pull-cache"),
        env=bucket.env,
    )
    assert proc.returncode == 0, proc.stderr
    copied = {k: v for k, v in _tree(dest).items() if not k.startswith(".cache")}
    assert copied == {k.removeprefix("m/"): v for k, v in old.items()}

    # A pinned version removed for good (a lifecycle rule, a user): the check
    # says so for that key, by name.
    config = doc["objects"][0]
    bucket.client.delete_object(
        Bucket=bucket.name, Key=config["key"], VersionId=config["version_id"]
    )
    rc, out = _check(bucket, manifest, "--json")
    readable = {d["key"]: d["pinned_readable"] for d in json.loads(out)}
    assert rc == 1 and readable.pop("m/config.json") is False
    assert set(readable.values()) == {True}


@pytest.mark.mount
@pytest.mark.slow
def test_two_nodes_given_one_manifest_serve_identical_bytes(
    moto_bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    """Node B starts after the prefix was rewritten, reads the manifest from
    the bucket itself, and has its own cache: it serves what node A does."""
    bucket = _versioned(moto_bucket)
    old = _publish(bucket)
    manifest = tmp_path / "manifest.json"
    _snapshot(bucket, manifest)
    bucket.client.upload_file(str(manifest), bucket.name, "rollouts/m-v1.json")
    a = mounter(
        bucket,
        "m",
        cache_dir=tmp_path / "cache-a",
        args=("--manifest", str(manifest), "--chunk-size", CHUNK),
    )
    sums_a = {k: _sha(v) for k, v in _tree(a.path).items()}

    new = _publish(bucket, seed=2)
    bucket.put("m/added.txt", b"published later")
    b = mounter(
        bucket,
        "m",
        cache_dir=tmp_path / "cache-b",
        args=("--manifest", f"s3://{bucket.name}/rollouts/m-v1.json", "--chunk-size", CHUNK),
    )
    sums_b = {k: _sha(v) for k, v in _tree(b.path).items()}
    assert sums_a == sums_b == {k.removeprefix("m/"): _sha(v) for k, v in old.items()}
    assert all(_sha(new[k]) != _sha(old[k]) for k in MODEL)
    assert b.stats()["store"]["get_bytes"] == sum(len(v) for v in old.values())


@pytest.mark.mount
@pytest.mark.slow
def test_unversioned_overwrite_is_estale_and_never_a_new_byte(
    bucket: Bucket, mounter: Mounter
) -> None:
    old = _publish(bucket)
    port = free_port()
    m = mounter(
        bucket,
        "m",
        args=(
            "--metrics-addr",
            f"127.0.0.1:{port}",
            "--snapshot",
            "--chunk-size",
            CHUNK,
            "--prefetch-on-open",
            "none",
            "--prefetch-window",
            "0",
        ),
        allow_log=[r"changed since the snapshot"],
    )
    assert m.stats()["snapshot"]["version_ids"] == 0
    vocab = m.path / "tokenizer" / "vocab.txt"
    assert vocab.read_bytes() == old["m/tokenizer/vocab.txt"]  # cached whole
    m.settle()

    new = _publish(bucket, seed=3)
    bucket.put("m/added-later.json", b"{}")
    bucket.client.delete_object(Bucket=bucket.name, Key="m/config.json")
    assert sorted(os.listdir(m.path)) == sorted(
        {k.removeprefix("m/").split("/")[0] for k in MODEL}
    )  # frozen: nothing added, nothing gone

    stale = 0
    for key, data in old.items():
        path = m.path / key.removeprefix("m/")
        fd = os.open(path, os.O_RDONLY)
        try:
            for off in range(0, len(data), 64 * 1024):
                try:
                    got = os.pread(fd, 64 * 1024, off)
                except OSError as exc:
                    assert exc.errno == errno.ESTALE, exc
                    stale += 1
                    continue
                assert got == data[off : off + 64 * 1024], (key, off)
                assert got != new[key][off : off + 64 * 1024] or not got
        finally:
            os.close(fd)
    assert stale > 0
    # What was cached before the overwrite still reads: those are the
    # pinned version's bytes. Everything else is ESTALE.
    assert stale >= len(MODEL) - 1
    assert m.stats()["snapshot"]["stale"] == len(MODEL) - 1
    text = run_modelfs("stats", str(m.path)).stdout
    assert f"snapshot   {len(MODEL)} objects pinned" in text
    assert f"(0 by VersionId), {len(MODEL) - 1} stale at the origin" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert f"modelfs_snapshot_stale_objects {len(MODEL) - 1}.0" in metrics
    m.umount()
    lines = [
        line for line in m.log_file.read_text().splitlines() if "changed since the snapshot" in line
    ]
    assert len(lines) == len(MODEL) - 1, lines  # one per object, however many reads failed
    assert not any("vocab.txt" in line for line in lines)
    config = next(line for line in lines if "m/config.json" in line)
    assert "now deleted" in config
    shard = next(line for line in lines if "model-00002" in line)
    key = "m/model-00002-of-00003.safetensors"
    md5_old, md5_new = (hashlib.md5(d[key]).hexdigest() for d in (old, new))
    assert f'pinned ETag "{md5_old}", now ETag "{md5_new}"' in shard, shard


@pytest.mark.mount
def test_bad_or_foreign_manifest_is_one_line_and_nothing_mounted(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put("m/a", b"a")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "llama"}')
    msg = mount_fails(tmp_path, bucket, "--manifest", str(bad), source=f"s3://{bucket.name}/m")
    assert "not a modelfs manifest" in msg and str(bad) in msg

    missing = tmp_path / "missing.json"
    msg = mount_fails(tmp_path, bucket, "--manifest", str(missing), source=f"s3://{bucket.name}/m")
    assert "cannot read the manifest" in msg and "No such file" in msg

    good = dict(manifest_doc(), bucket="another-bucket")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(good))
    msg = mount_fails(tmp_path, bucket, "--manifest", str(other), source=f"s3://{bucket.name}/m")
    assert "is a manifest of s3://another-bucket/m/, not of" in msg

    # No source: the manifest names it, and a bucket that is not there fails.
    mnt = tmp_path / "mnt2"
    mnt.mkdir()
    before = modelfs_daemons()
    proc = run_modelfs(
        "mount",
        str(mnt),
        "--manifest",
        str(other),
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(tmp_path / "cache"),
        env=bucket.env,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "another-bucket" in proc.stderr, proc.stderr
    assert find_mount(mnt) is None and modelfs_daemons() <= before
