"""What operators expect of a storage tool's command line: --version,
permission bits of their choice, and a log file that survives logrotate."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from modelfs.config import MountConfig, S3Location
from modelfs.errors import AccessDenied
from modelfs.s3 import client as s3client
from modelfs.s3.origin import S3Store
from modelfs.testing.proxy import CountingProxy

from ..conftest import Bucket, Mounter, mount_fails, run_modelfs
from ..data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    proc = run_modelfs("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"modelfs {version('modelfs')}"


def test_file_and_dir_modes_are_what_was_asked(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("d/w.bin", b"abc")
    m = mounter(bucket, args=("--file-mode", "440", "--dir-mode", "0o550"))
    assert stat.S_IMODE(os.stat(m.path / "d" / "w.bin").st_mode) == 0o440
    assert stat.S_IMODE(os.stat(m.path / "d").st_mode) == 0o550
    assert (m.path / "d" / "w.bin").read_bytes() == b"abc"


def test_a_write_bit_is_refused_in_one_line_and_nothing_is_mounted(
    bucket: Bucket, tmp_path: Path
) -> None:
    # _mount_fails: non-zero, one line, nothing mounted, no daemon left.
    assert "read-only" in mount_fails(tmp_path, bucket, "--file-mode", "644")


def test_the_log_file_survives_logrotate(bucket: Bucket, mounter: Mounter) -> None:
    """logrotate's default moves the file away and expects the daemon to
    write a new one at the same path (no copytruncate, no signal)."""
    bucket.put("a.bin", pattern(1, 0, MiB))
    bucket.put("b.bin", pattern(2, 0, MiB))
    m = mounter(bucket, args=("--debug", "--prefetch-on-open", "none"))
    assert (m.path / "a.bin").read_bytes() == pattern(1, 0, MiB)
    rotated = m.log_file.with_name(m.log_file.name + ".1")
    os.rename(m.log_file, rotated)
    assert (m.path / "b.bin").read_bytes() == pattern(2, 0, MiB)
    deadline = time.monotonic() + 10
    while not m.log_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "b.bin" in m.log_file.read_text()  # the GET of b.bin, in the new file
    assert "b.bin" not in rotated.read_text() and "a.bin" in rotated.read_text()
    assert stat.S_IMODE(m.log_file.stat().st_mode) == 0o600


def _cfg(**kwargs: object) -> MountConfig:
    return MountConfig(source=S3Location("b", ""), mountpoint=Path("/mnt"), **kwargs)  # type: ignore[arg-type]


def _store(endpoint: str = "http://127.0.0.1:9") -> S3Store:
    return S3Store(_cfg(endpoint_url=endpoint).origin_settings(), "b")


def _client_config(**kwargs: object) -> Any:
    settings = _cfg(**kwargs).origin_settings()
    return s3client.client(s3client.session(settings), settings, retries={}).meta.config


def test_a_failed_listing_is_counted_as_a_failure_not_ok(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway refuses a wrong secret key: the listing fails with
    AccessDenied and is counted as 'denied', not 'ok'."""
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = _store(bucket.endpoint_url)
    with pytest.raises(AccessDenied):
        store.list_dir("")
    assert store.counters.snapshot().list_results == {"denied": 1}


def test_the_mounts_listing_is_a_first_sample_of_the_origins_distance(
    bucket: Bucket, proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's listing, on an idle link, times the origin before any
    GET (a mount's first GETs, several at once and cold, made the gateway
    on this host look far); a far origin looks far by it too."""
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    bucket.put("a.bin", b"x")

    def probed(endpoint: str) -> float | None:
        store = S3Store(_cfg(endpoint_url=endpoint).origin_settings(), bucket.name)
        assert store.counters.first_byte_floor() is None
        store.probe("")
        return store.counters.first_byte_floor()

    near = probed(bucket.endpoint_url)
    assert near is not None and near < 0.05
    proxy.first_byte_delay = 0.05  # an origin 50 ms away
    try:
        far = probed(proxy.endpoint_url)
    finally:
        proxy.first_byte_delay = 0.0
    assert far is not None and far >= 0.05


def test_custom_endpoints_send_checksums_only_when_required(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """boto3 >= 1.36 adds CRC headers by default, which some S3-compatible
    stores refuse; against a custom endpoint modelfs asks for them only when
    an operation requires them, unless the user said otherwise."""
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_RESPONSE_CHECKSUM_VALIDATION", raising=False)
    custom = _client_config(endpoint_url="http://127.0.0.1:9")
    assert custom.request_checksum_calculation == "when_required"
    assert custom.response_checksum_validation == "when_required"
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    again = _client_config(endpoint_url="http://127.0.0.1:9")
    assert again.request_checksum_calculation == "when_supported"
    # AWS itself keeps boto3's defaults.
    aws = _client_config(region="us-east-1")
    assert aws.request_checksum_calculation == "when_supported"


def test_a_prefix_with_nothing_under_it_is_an_error_unless_allowed(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    bucket.put("models/llama/w.bin", b"x")
    line = mount_fails(tmp_path, bucket, source=f"s3://{bucket.name}/models/lama")
    assert line == f"modelfs: error: no objects under s3://{bucket.name}/models/lama/"
    m = mounter(bucket, "models/lama", args=("--allow-empty",))
    assert os.listdir(m.path) == []
    proc = run_modelfs(
        "pull",
        f"s3://{bucket.name}/models/lama",
        str(tmp_path / "copy"),
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(tmp_path / "c"),
        env=bucket.env,
    )
    assert proc.returncode != 0 and "no objects under" in proc.stderr
    assert not (tmp_path / "copy").exists()


def test_stats_and_umount_take_any_path_inside_the_mount(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("d/w.bin", b"abc")
    m = mounter(bucket)
    proc = run_modelfs("stats", "--json", str(m.path / "d" / "w.bin"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mountpoint"] == str(m.path)
    proc = run_modelfs("umount", str(m.path / "d"))
    assert proc.returncode == 0, proc.stderr
    assert not os.path.ismount(m.path)


def test_absent_names_cost_one_lookup_then_the_kernel_answers(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Loaders probe for files that are not there (generation_config.json,
    *.index.json variants); each probe must not be a round trip."""
    bucket.put("config.json", b"{}")
    m = mounter(bucket)
    before = m.stats()["lookups"]
    for _ in range(20):
        assert not (m.path / "generation_config.json").exists()
    stats = m.stats()
    assert stats["lookups"] - before == 1
    assert stats["negative_lookups"] == 1


def test_no_sign_request_reads_a_public_bucket_without_credentials(
    moto_bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    b = moto_bucket
    b.put("pub/w.bin", pattern(3, 0, 2 * MiB))
    b.client.put_bucket_policy(
        Bucket=b.name,
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": ["s3:GetObject", "s3:ListBucket"],
                        "Resource": [f"arn:aws:s3:::{b.name}", f"arn:aws:s3:::{b.name}/*"],
                    }
                ],
            }
        ),
    )
    anonymous = {k: v for k, v in b.env.items() if "KEY" not in k and "TOKEN" not in k}
    anonymous.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none")
    )
    proxy = CountingProxy(b.endpoint_url).start()
    try:
        m = mounter(
            dataclasses.replace(b, env=anonymous),
            "pub",
            endpoint_url=proxy.endpoint_url,
            args=("--no-sign-request",),
        )
        assert (m.path / "w.bin").read_bytes() == pattern(3, 0, 2 * MiB)
        seen = proxy.snapshot()
        assert seen and not any(r.signed for r in seen)
        m.umount()
        proxy.reset()
        m2 = mounter(b, "pub", endpoint_url=proxy.endpoint_url, cache_dir=tmp_path / "c2")
        assert (m2.path / "w.bin").read_bytes() == pattern(3, 0, 2 * MiB)
        assert all(r.signed for r in proxy.snapshot())  # the default signs
    finally:
        proxy.stop()


def test_warm_check_is_a_readiness_probe_and_warm_speaks_json(
    bucket: Bucket, mounter: Mounter
) -> None:
    bucket.put("m/a.bin", pattern(4, 0, 3 * MiB))
    bucket.put("m/b.bin", pattern(5, 0, MiB))
    m = mounter(bucket, args=("--prefetch-on-open", "none", "--prefetch-window", "0"))
    d = m.path / "m"
    probe = run_modelfs("warm", "--check", "--json", str(d))
    assert probe.returncode == 1
    state = json.loads(probe.stdout)
    assert not state["ready"] and {x["path"] for x in state["missing"]} == {
        str(d / "a.bin"),
        str(d / "b.bin"),
    }
    assert (d / "b.bin").read_bytes() == pattern(5, 0, MiB)
    m.settle()
    assert run_modelfs("warm", "--check", str(d / "b.bin")).returncode == 0
    partial = run_modelfs("warm", "--check", str(d))
    assert partial.returncode == 1 and f"not cached: {d / 'a.bin'}" in partial.stdout
    warmed = run_modelfs("warm", "--json", str(d), env={"MODELFS_PROGRESS_INTERVAL": "0"})
    assert warmed.returncode == 0, warmed.stderr
    result = json.loads(warmed.stdout)
    assert (result["files"], result["already_cached"], result["bytes_read"]) == (2, 1, 3 * MiB)
    # stderr is not a terminal here: plain progress lines, not a bar.
    assert "warm 1 files: 3.0 MiB of 3.0 MiB (100%)" in warmed.stderr
    assert "\r" not in warmed.stderr
    assert run_modelfs("warm", "--check", str(d)).returncode == 0


def test_pull_speaks_json(bucket: Bucket, tmp_path: Path) -> None:
    bucket.put("p/x.bin", pattern(6, 0, MiB))
    args = (
        "pull",
        f"s3://{bucket.name}/p",
        str(tmp_path / "out"),
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(tmp_path / "c"),
        "--json",
    )
    first = run_modelfs(*args, env=bucket.env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {
        "written": ["x.bin"],
        "skipped": [],
        "failed": {},
        "bytes_written": MiB,
    }
    again = json.loads(run_modelfs(*args, env=bucket.env).stdout)
    assert again["skipped"] == ["x.bin"] and again["written"] == []


def test_a_pinned_file_survives_cache_gc_and_clear(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("p/keep.bin", pattern(7, 0, 2 * MiB))
    bucket.put("p/drop.bin", pattern(8, 0, 2 * MiB))
    m = mounter(bucket, args=("--chunk-size", "1M"))
    keep, drop = m.path / "p" / "keep.bin", m.path / "p" / "drop.bin"
    assert keep.read_bytes() == pattern(7, 0, 2 * MiB) and drop.read_bytes() == pattern(
        8, 0, 2 * MiB
    )
    m.settle()

    def cached(f: Path) -> int:
        return int(os.getxattr(f, "user.modelfs.cached"))

    pinned = run_modelfs("cache", "pin", str(keep))
    assert pinned.returncode == 0, pinned.stderr
    listed = json.loads(
        run_modelfs("cache", "ls", "--json", "--cache-dir", str(m.cache_dir)).stdout
    )
    assert {e["key"]: e["pinned"] for e in listed} == {"p/keep.bin": True, "p/drop.bin": False}
    for command in (("gc", "1M"), ("clear",)):
        proc = run_modelfs("cache", *command, "--cache-dir", str(m.cache_dir))
        assert proc.returncode == 0, proc.stderr
        assert (cached(keep), cached(drop)) == (2 * MiB, 0)
    assert run_modelfs("cache", "unpin", str(m.path / "p")).returncode == 0
    assert run_modelfs("cache", "clear", "--cache-dir", str(m.cache_dir)).returncode == 0
    assert cached(keep) == 0
    assert keep.read_bytes() == pattern(7, 0, 2 * MiB)  # fetched again, right
