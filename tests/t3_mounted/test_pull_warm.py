"""`modelfs pull` and `modelfs warm` against a real server, counted on the wire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfs.pull import metadata_path, walk
from modelfs.testing.memory import MemoryStore

from ..conftest import Bucket, Mounter, run_modelfs
from ..data import pattern

MiB = 1 << 20
MODEL = {
    "config.json": b'{"model_type": "llama"}',
    "model-00001-of-00002.safetensors": pattern(11, 0, 9 * MiB + 5),
    "model-00002-of-00002.safetensors": pattern(12, 0, 6 * MiB),
    "tokenizer/tokenizer.json": b"{}" * 1000,
}
TOTAL = sum(len(v) for v in MODEL.values())


def _fill(bucket: Bucket, prefix: str = "llama/") -> None:
    for key, data in MODEL.items():
        bucket.put(prefix + key, data)


def _pull(bucket: Bucket, endpoint: str, dest: Path, cache: Path, *extra: str):  # type: ignore[no-untyped-def]
    return run_modelfs(
        "pull",
        f"s3://{bucket.name}/llama",
        str(dest),
        "--endpoint-url",
        endpoint,
        "--cache-dir",
        str(cache),
        "--chunk-size",
        "1M",
        *extra,
        env=bucket.env,
        timeout=120,
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".cache" not in p.parts
    }


pytestmark = pytest.mark.mount


def _ctrl_c_after(
    proxy, nbytes: int, args: list[str], env: dict[str, str] | None = None
) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """Run `modelfs ARGS`, press Ctrl-C once `nbytes` crossed the proxy;
    it must exit 130. Returns its (stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfs", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A job started in the background by a non-interactive shell (as CI
        # may run us) inherits SIGINT ignored; a user's Ctrl-C is not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while proxy.object_bytes() < nbytes:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, out, err[-2000:])
    return out, err


def test_pull_copies_once_and_writes_aibrix_metadata(tmp_path: Path, bucket: Bucket, proxy) -> None:
    _fill(bucket)
    dest, cache = tmp_path / "model", tmp_path / "cache"
    proxy.reset()
    proc = _pull(bucket, proxy.endpoint_url, dest, cache)
    assert proc.returncode == 0, proc.stderr
    assert "4 files written" in proc.stdout
    assert _tree(dest) == MODEL
    assert proxy.object_bytes() == TOTAL  # every byte once
    for key in MODEL:
        etag = bucket.client.head_object(Bucket=bucket.name, Key="llama/" + key)["ETag"]
        # The AIBrix downloader's own check: local size, and the raw ETag in the metadata file.
        assert metadata_path(dest, key).read_text() == etag
        assert (dest / key).stat().st_size == len(MODEL[key])
    assert not list(dest.rglob("*.modelfs-part"))

    # Again: everything is up to date, so only listings go out.
    proxy.reset()
    proc = _pull(bucket, proxy.endpoint_url, dest, cache)
    assert proc.returncode == 0 and "0 files written" in proc.stdout
    assert "4 up to date" in proc.stdout
    assert proxy.object_gets() == []

    # --force copies again, from the chunk cache, not from the bucket.
    proc = _pull(bucket, proxy.endpoint_url, dest, cache, "--force")
    assert proc.returncode == 0 and "4 files written" in proc.stdout
    assert proxy.object_gets() == []
    assert _tree(dest) == MODEL

    # A changed object is copied again; the others are not.
    new = pattern(13, 0, 2 * MiB)
    bucket.put("llama/config.json", new)
    proxy.reset()
    proc = _pull(bucket, proxy.endpoint_url, dest, cache)
    assert proc.returncode == 0 and "1 files written" in proc.stdout
    assert (dest / "config.json").read_bytes() == new
    assert proxy.object_bytes() == len(new)


def test_pull_skips_a_directory_the_aibrix_downloader_filled(
    tmp_path: Path, bucket: Bucket, proxy
) -> None:
    _fill(bucket)
    dest = tmp_path / "model"
    # What `python -m aibrix.downloader` leaves: the files, and per file a
    # metadata file holding the raw ETag from HEAD.
    for key, data in MODEL.items():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        (dest / key).write_bytes(data)
        etag = bucket.client.head_object(Bucket=bucket.name, Key="llama/" + key)["ETag"]
        meta = dest / ".cache/s3/download" / f"{key}.metadata"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(etag)
    # One file the downloader did not finish: no metadata file.
    os.unlink(dest / ".cache/s3/download/model-00002-of-00002.safetensors.metadata")
    proxy.reset()
    proc = _pull(bucket, proxy.endpoint_url, dest, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "1 files written" in proc.stdout and "3 up to date" in proc.stdout
    assert {r.path.rsplit("/", 1)[-1] for r in proxy.object_gets()} == {
        "model-00002-of-00002.safetensors"
    }


def test_pull_after_a_mount_reads_the_cache(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter
) -> None:
    _fill(bucket)
    m = mounter(bucket, "llama", args=("--chunk-size", "1M"))
    for key, data in MODEL.items():
        assert (m.path / key).read_bytes() == data
    m.umount()
    proxy.reset()
    proc = _pull(bucket, proxy.endpoint_url, tmp_path / "model", m.cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert _tree(tmp_path / "model") == MODEL
    assert proxy.object_gets() == []


def test_interrupted_pull_resumes_without_fetching_twice(
    tmp_path: Path, bucket: Bucket, proxy
) -> None:
    big = pattern(14, 0, 40 * MiB)
    bucket.put("llama/big.bin", big)
    dest, cache = tmp_path / "model", tmp_path / "cache"
    proxy.rate = 10 * MiB  # per connection: slow enough to interrupt midway
    proxy.reset()
    out, err = _ctrl_c_after(
        proxy,
        8 * MiB,
        ["pull", f"s3://{bucket.name}/llama", str(dest), "--endpoint-url", proxy.endpoint_url]
        + ["--cache-dir", str(cache), "--chunk-size", "1M", "--fetch-concurrency", "2"],
        env=dict(os.environ, **bucket.env),
    )
    assert err.decode().strip().splitlines()[-1] == (
        "modelfs: interrupted; what was fetched stays in the cache"
    )
    assert b"Traceback" not in err
    first = proxy.object_bytes()
    assert first < len(big)
    assert not (dest / "big.bin").exists()  # never a partial file under the real name
    assert not list(dest.rglob("*.modelfs-part"))
    proxy.rate = None
    proxy.reset()
    done = _pull(bucket, proxy.endpoint_url, dest, cache)
    assert done.returncode == 0, done.stderr
    assert (dest / "big.bin").read_bytes() == big
    # Chunks completed before the interrupt are not fetched again; at most
    # the two in flight at that moment are.
    assert proxy.object_bytes() <= len(big) - first + 2 * MiB


def test_pull_errors_are_one_line(tmp_path: Path, bucket: Bucket) -> None:
    proc = run_modelfs(
        "pull",
        "s3://no-such-bucket-x",
        str(tmp_path / "d"),
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(tmp_path / "c"),
        env=bucket.env,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"modelfs: error: bucket 'no-such-bucket-x' does not exist at {bucket.endpoint_url}"
    ]


def test_walk_applies_the_mount_key_rules() -> None:
    store = MemoryStore()
    for key in ("p/a", "p/../escape", "p/d/", "p/d/b", "p/x", "p/x/y", "p//z", "p/ok/./c"):
        store.put(key, b"1")
    assert [rel for rel, _ in walk(store.list_dir, "p/")] == ["a", "d/b", "x/y"]


# -- warm --------------------------------------------------------------------
def test_warm_fetches_everything_once_then_is_free(bucket: Bucket, proxy, mounter: Mounter) -> None:
    _fill(bucket)
    m = mounter(bucket, endpoint_url=proxy.endpoint_url, args=("--chunk-size", "1M"))
    proxy.reset()
    proc = run_modelfs("warm", str(m.path / "llama"))
    assert proc.returncode == 0, proc.stderr
    assert "4 files: 0 were cached already" in proc.stdout
    assert proxy.object_bytes() == TOTAL
    for key, data in MODEL.items():
        assert int(os.getxattr(m.path / "llama" / key, "user.modelfs.cached")) == len(data)
    proxy.reset()
    again = run_modelfs("warm", str(m.path / "llama"), str(m.path / "llama/config.json"))
    assert again.returncode == 0
    assert "5 files: 5 were cached already, 0 B read" in again.stdout
    assert proxy.snapshot() == [] or proxy.object_gets() == []
    # A loader after warm: no GET at all.
    for key, data in MODEL.items():
        assert (m.path / "llama" / key).read_bytes() == data
    assert proxy.object_gets() == []


def test_warm_reports_what_does_not_fit(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("big.bin", pattern(15, 0, 12 * MiB))
    m = mounter(bucket, args=("--chunk-size", "1M", "--cache-size", "4M"))
    proc = run_modelfs("warm", str(m.path))
    assert proc.returncode == 1
    assert "big.bin: only" in proc.stderr and "stayed cached" in proc.stderr


def test_warm_outside_a_mount_is_refused(tmp_path: Path) -> None:
    proc = run_modelfs("warm", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"modelfs: error: {tmp_path} is not inside a modelfs mount"


def test_interrupted_warm_keeps_what_it_fetched(bucket: Bucket, proxy, mounter: Mounter) -> None:
    big = pattern(16, 0, 40 * MiB)
    bucket.put("big.bin", big)
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=("--chunk-size", "1M", "--prefetch-on-open", "none", "--fetch-concurrency", "2"),
    )
    proxy.rate = 10 * MiB
    proxy.reset()
    out, err = _ctrl_c_after(proxy, 8 * MiB, ["warm", str(m.path)])
    assert b"Traceback" not in err
    proxy.rate = None
    kept = int(os.getxattr(m.path / "big.bin", "user.modelfs.cached"))
    assert kept >= 8 * MiB
    first = proxy.object_bytes()
    proxy.reset()
    again = run_modelfs("warm", str(m.path))
    assert again.returncode == 0, again.stderr
    # The second run fetches what the first did not, and no more (chunks
    # the first left in flight at most, 2 x 1 MiB, are fetched again).
    assert proxy.object_bytes() <= len(big) - kept + 2 * MiB
    assert first + proxy.object_bytes() <= len(big) + 2 * MiB
    assert (m.path / "big.bin").read_bytes() == big
