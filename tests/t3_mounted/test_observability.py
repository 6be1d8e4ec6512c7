"""Observability and cache management, on real mounts.

The origin byte counters are checked against what the server sent, counted
by the proxy; cache commands run while a mount uses the cache and after it
is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelfs.stats import RecentRates
from modelfs.testing.s3server import free_port

from ..conftest import Bucket, Mount, Mounter, run_modelfs
from ..data import pattern

pytestmark = pytest.mark.mount

MiB = 1 << 20
FILES = {"big.safetensors": pattern(1, 0, 20 * MiB + 77), "small/b.bin": pattern(2, 0, 5 * MiB)}
TOTAL = sum(len(v) for v in FILES.values())


def scrape_metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _read_all(m: Mount) -> None:
    for key, data in FILES.items():
        assert (m.path / key).read_bytes() == data


def _fill(bucket: Bucket) -> None:
    for key, data in FILES.items():
        bucket.put(key, data)


def test_metrics_match_the_bytes_on_the_wire(
    tmp_path: Path, bucket: Bucket, proxy, mounter: Mounter
) -> None:
    _fill(bucket)
    port = free_port()
    args = ("--chunk-size", "1M", "--metrics-addr", f"127.0.0.1:{port}")
    m = mounter(bucket, endpoint_url=proxy.endpoint_url, args=args)
    proxy.reset()
    _read_all(m)
    m.settle()  # chunks are served as they arrive and written just after
    with open(m.path / "big.safetensors", "rb") as held:
        met = scrape_metrics(port)
        assert met["modelfs_open_files"] == 1
        held.read(1)
    wire_bytes, wire_gets = proxy.object_bytes(), len(proxy.object_gets())
    assert wire_bytes == TOTAL  # each byte once
    # What the daemon says it received is what the server sent.
    assert abs(met["modelfs_origin_received_bytes_total"] - wire_bytes) <= 0.02 * wire_bytes
    assert met["modelfs_origin_requests_total{op=get,result=ok}"] == wire_gets
    assert met["modelfs_origin_get_seconds_count"] == wire_gets
    assert met["modelfs_origin_get_seconds_bucket{le=+Inf}"] == wire_gets
    assert met["modelfs_origin_get_seconds_sum"] > 0
    # Every byte was served once; a chunk read-ahead fetched before the reader
    # asked counts as a hit, so the split between the two varies.
    assert met["modelfs_cache_miss_bytes_total"] + met["modelfs_cache_hit_bytes_total"] == TOTAL
    assert met["modelfs_cache_miss_bytes_total"] >= MiB  # the first chunk at least
    # A sequential read is read ahead, and what was read ahead got used.
    assert (
        0 < met["modelfs_prefetch_used_bytes_total"] <= met["modelfs_prefetch_origin_bytes_total"]
    )
    assert met["modelfs_prefetch_wasted_bytes_total"] == 0
    assert met["modelfs_cache_size_bytes"] == TOTAL
    assert met["modelfs_cache_capacity_bytes"] >= TOTAL
    assert met["modelfs_origin_requests_in_flight"] == 0
    assert met["modelfs_errors_total{kind=corrupt_chunk}"] == 0
    # The process's own figures and what is serving the mount.
    assert met["process_resident_memory_bytes"] > 64 * MiB
    assert met["process_open_fds"] > 0 and met["process_cpu_seconds_total"] > 0
    (build,) = [k for k in met if k.startswith("modelfs_build_info{")]
    assert met[build] == 1 and "version=" in build
    assert met["modelfs_origin_requests_total{op=list,result=ok}"] >= 1

    # A new mount over the same cache: everything is a hit, nothing on the wire.
    m.umount()
    port2 = free_port()
    m2 = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=("--chunk-size", "1M", "--metrics-addr", f"127.0.0.1:{port2}"),
    )
    proxy.reset()
    _read_all(m2)
    met = scrape_metrics(port2)
    assert proxy.object_bytes() == 0
    assert met["modelfs_origin_received_bytes_total"] == 0
    assert met["modelfs_cache_hit_bytes_total"] == TOTAL
    assert met["modelfs_cache_miss_bytes_total"] == 0
    # The kernel sends FUSE's release after close() has returned: wait for it.
    deadline = time.monotonic() + 10
    while met["modelfs_open_files"] and time.monotonic() < deadline:
        time.sleep(0.05)
        met = scrape_metrics(port2)
    assert met["modelfs_open_files"] == 0


def test_evicted_read_ahead_counts_as_wasted(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("w.bin", pattern(3, 0, 64 * MiB))
    bucket.put("x.dat", pattern(4, 0, 8 * MiB))
    port = free_port()
    m = mounter(
        bucket,
        # Read-ahead alone (prefetch on open paces itself by the reader and
        # holds what it fetched, so nothing of it is ever wasted).
        args=(
            "--chunk-size",
            "1M",
            "--memory-cache",
            "4M",
            "--prefetch-on-open",
            "none",
            "--metrics-addr",
            f"127.0.0.1:{port}",
        ),
    )
    with open(m.path / "w.bin", "rb") as f:
        f.read(4 * MiB)  # starts a stream: chunks beyond are fetched ahead
        deadline = time.monotonic() + 30
        while scrape_metrics(port)["modelfs_prefetch_pending_bytes"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Read-ahead stays within memory, so another file's read pushes what
        # was fetched ahead out of it; after the clear it exists nowhere and
        # must be fetched again.
        assert (m.path / "x.dat").read_bytes() == pattern(4, 0, 8 * MiB)
        proc = run_modelfs("cache", "clear", "--cache-dir", str(m.cache_dir))
        assert proc.returncode == 0, proc.stderr
        assert f.read() == pattern(3, 4 * MiB, 64 * MiB)
    met = scrape_metrics(port)
    assert met["modelfs_prefetch_wasted_bytes_total"] > 0
    # Every byte fetched ahead is used, evicted unused (wasted), or pending:
    # a fetch still queued during the clear lands afterwards, as pending.
    assert met["modelfs_prefetch_origin_bytes_total"] == (
        met["modelfs_prefetch_used_bytes_total"]
        + met["modelfs_prefetch_wasted_bytes_total"]
        + met["modelfs_prefetch_pending_bytes"]
    )


@pytest.mark.parametrize(
    "addr, message",
    [("localhost", "invalid --metrics-addr"), ("127.0.0.1:0", "invalid --metrics-addr")],
)
def test_bad_metrics_addr(tmp_path: Path, bucket: Bucket, addr: str, message: str) -> None:
    (tmp_path / "mnt").mkdir()
    proc = run_modelfs(
        "mount", f"s3://{bucket.name}", str(tmp_path / "mnt"), "--metrics-addr", addr
    )
    assert proc.returncode != 0 and message in proc.stderr


def test_metrics_port_in_use_fails_the_mount(tmp_path: Path, bucket: Bucket) -> None:
    import socket

    bucket.put("f.bin", b"x")  # an empty bucket would fail first, for that
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        (tmp_path / "mnt").mkdir()
        proc = run_modelfs(
            "mount",
            f"s3://{bucket.name}",
            str(tmp_path / "mnt"),
            "--endpoint-url",
            bucket.endpoint_url,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--metrics-addr",
            f"127.0.0.1:{port}",
            env=bucket.env,
        )
    assert proc.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_stats_command(bucket: Bucket, mounter: Mounter) -> None:
    _fill(bucket)
    m = mounter(bucket, args=("--chunk-size", "1M"))
    _read_all(m)
    time.sleep(1.5)  # at least two one-second samples for the rates
    proc = run_modelfs("stats", str(m.path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"s3://{bucket.name}/ on {m.path}" in out
    assert "served     25.0 MiB to readers" in out
    raw = json.loads(run_modelfs("stats", str(m.path), "--json").stdout)
    # 20 MiB + 77 B and 5 MiB: 21 + 5 chunks of 1 MiB, fetched by fewer GETs
    # where read-ahead coalesced consecutive chunks.
    gets = raw["store"]["get_requests"]
    assert 2 <= gets <= 26 and f"in {gets} GETs" in out
    assert "last minute" in out and f"in {m.cache_dir}" in out
    assert raw["store"]["get_bytes"] == TOTAL
    assert raw["last_minute"]["served_bytes_per_s"] > 0
    # The origin's distance, as its GETs showed it (a gateway on this host).
    floor = raw["store"]["first_byte_floor"]
    assert 0 < floor < 1 and f"first byte in {floor * 1000:.1f} ms" in out
    # Both files match the default patterns (*.safetensors, *.bin) and were
    # fetched whole once opened; neither is the next shard of a model.
    assert raw["prefetched_on_open"] == 2 and raw["fetched_ahead_of_open"] == 0
    assert "2 files fetched whole on open, 0 of them before their opening" in out
    proc = run_modelfs("stats", str(m.cache_dir))
    assert proc.returncode == 1 and "is not inside a modelfs mount" in proc.stderr


def _payload_file(cache: Path) -> Path:
    files = [p for p in (cache / "data").glob("*/*") if p.stat().st_size > 20 * MiB]
    assert len(files) == 1
    return files[0]


def _cache(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return run_modelfs("cache", *args, "--cache-dir", str(cache))


@pytest.mark.allow_log("failed its checksum")
def test_cache_commands_while_mounted(bucket: Bucket, proxy, mounter: Mounter) -> None:
    _fill(bucket)
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        # One chunk of memory cache: reads after the first go to the disk cache.
        args=("--chunk-size", "1M", "--prefetch-window", "0", "--memory-cache", "1M"),
    )
    _read_all(m)
    time.sleep(2.5)  # recency (and the access time) is written every 2 s

    ls = _cache("ls", cache=m.cache_dir)
    assert ls.returncode == 0, ls.stderr
    url = f"s3://{bucket.name}/"
    rows = {line.split()[-1].removeprefix(url): line for line in ls.stdout.splitlines()[1:]}
    assert set(rows) == set(FILES)
    assert "20.0 MiB   20.0 MiB 100%" in rows["big.safetensors"]
    assert (
        bucket.client.head_object(Bucket=bucket.name, Key="small/b.bin")["ETag"]
        in rows["small/b.bin"]
    )
    assert time.strftime("%Y-%m-%d") in rows["small/b.bin"]

    du = _cache("du", cache=m.cache_dir)
    assert "25.0 MiB in 26 chunks of 2 objects" in du.stdout
    listed = json.loads(_cache("ls", "--json", cache=m.cache_dir).stdout)
    assert {e["url"] for e in listed} == {url + k for k in FILES}
    assert all(e["cached_bytes"] == e["size"] == len(FILES[e["key"]]) for e in listed)
    usage = json.loads(_cache("du", "--json", cache=m.cache_dir).stdout)
    assert (usage["used_bytes"], usage["chunks"], usage["objects"]) == (TOTAL, 26, 2)

    # Flip one byte of chunk 3 of the big file on disk.
    path = _payload_file(m.cache_dir)
    with open(path, "r+b") as f:
        f.seek(3 * MiB + 5)
        b = f.read(1)
        f.seek(3 * MiB + 5)
        f.write(bytes([b[0] ^ 0x40]))
    bad = _cache("verify", cache=m.cache_dir)
    assert bad.returncode == 1
    assert "checked 26 chunks: 1 corrupt" in bad.stdout
    assert f"corrupt: {url}big.safetensors bytes {3 * MiB}-{4 * MiB - 1} (chunk 3" in bad.stdout
    report = _cache("verify", "--json", cache=m.cache_dir)
    assert report.returncode == 1
    (one,) = json.loads(report.stdout)["corrupt"]
    assert (one["url"], one["start"], one["end"]) == (url + "big.safetensors", 3 * MiB, 4 * MiB)
    fixed = _cache("verify", "--repair", cache=m.cache_dir)
    assert fixed.returncode == 0 and "dropped 1 corrupt chunks" in fixed.stdout
    assert "checked 25 chunks: 0 corrupt" in _cache("verify", cache=m.cache_dir).stdout
    # The index no longer has the chunk: the daemon's next read of it fetches
    # it again, right.
    proxy.reset()
    with open(m.path / "big.safetensors", "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(f.fileno(), MiB, 3 * MiB) == FILES["big.safetensors"][3 * MiB : 4 * MiB]
    assert [r.range for r in proxy.object_gets()] == [f"bytes={3 * MiB}-{4 * MiB - 1}"]

    gc = _cache("gc", "10M", cache=m.cache_dir)
    assert gc.returncode == 0, gc.stderr
    assert 9 * MiB <= m.stats()["cache"]["used_bytes"] <= 10 * MiB
    cleared = _cache("clear", cache=m.cache_dir)
    assert cleared.returncode == 0 and "0 B left" in cleared.stdout
    assert m.stats()["cache"]["used_bytes"] == 0
    _read_all(m)  # still byte-exact: refetched


def test_cache_commands_without_a_mount(tmp_path: Path, bucket: Bucket, mounter: Mounter) -> None:
    _fill(bucket)
    m = mounter(bucket, args=("--chunk-size", "1M"))
    _read_all(m)
    m.umount()
    # A payload file no index record names, as a crash mid-eviction leaves.
    orphan = m.cache_dir / "data" / "ff" / ("ff" * 16)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"x" * 4096)
    path = _payload_file(m.cache_dir)
    with open(path, "r+b") as f:
        f.truncate(2 * MiB)  # a truncated payload: chunks 2.. are gone
    bad = _cache("verify", cache=m.cache_dir)
    assert bad.returncode == 1 and "checked 26 chunks: 19 corrupt" in bad.stdout
    assert _cache("verify", "--repair", cache=m.cache_dir).returncode == 0
    assert "checked 7 chunks: 0 corrupt" in _cache("verify", cache=m.cache_dir).stdout
    gc = _cache("gc", "3M", cache=m.cache_dir)
    assert gc.returncode == 0, gc.stderr
    assert "3.0 MiB left" in gc.stdout or "2.0 MiB left" in gc.stdout
    assert not orphan.exists()
    assert "0 B left" in _cache("clear", cache=m.cache_dir).stdout
    # The cache is still a good cache: mount it and read everything.
    m2 = mounter(bucket, args=("--chunk-size", "1M"))
    _read_all(m2)


def test_cache_commands_refuse_what_is_not_a_cache(tmp_path: Path) -> None:
    proc = _cache("ls", cache=tmp_path / "nope")
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    proc = _cache("clear", cache=tmp_path)
    assert proc.returncode == 1 and "is not a modelfs cache directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_logs_go_to_the_journal_under_systemd(tmp_path: Path, bucket: Bucket) -> None:
    bucket.put("f", b"x")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    journal = tmp_path / "journal"
    with open(journal, "w") as stream:
        st = os.fstat(stream.fileno())
        proc = subprocess.run(
            [sys.executable, "-m", "modelfs", "mount", f"s3://{bucket.name}", str(mnt)]
            + ["--endpoint-url", bucket.endpoint_url, "--cache-dir", str(cache), "--debug"],
            env=dict(os.environ, **bucket.env, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"),
            stderr=stream,
            timeout=60,
        )
    try:
        assert proc.returncode == 0
        assert (mnt / "f").read_bytes() == b"x"
    finally:
        assert run_modelfs("umount", str(mnt)).returncode == 0
    text = journal.read_text()
    assert "INFO modelfs.daemon: serving on" in text
    assert "DEBUG modelfs.s3.ranged: GET f bytes=0-0 etag=" in text  # per-request, with --debug
    assert not text.startswith("20")  # no timestamp: journald adds its own
    assert not (cache / "modelfs.log").exists()


def test_recent_rates() -> None:
    r = RecentRates(window=60)
    assert r.rates() == {}
    for t in range(0, 120):
        r.sample({"b": t * 100}, now=float(t))
    assert r.rates() == {"b": 100.0}
    r.sample({"b": 119 * 100}, now=130.0)  # idle for 11 s: the rate drops
    assert 0 < r.rates()["b"] < 100


def test_typed_stats_round_trip_and_reach_the_metrics() -> None:
    """What the stats xattr serves reads back into the same typed snapshot
    (keys of another version skipped), and the Prometheus collector reads
    its attributes."""
    from prometheus_client import generate_latest

    from modelfs.metrics import make_registry
    from modelfs.stats import CacheStats, MountStats, SnapshotStats, StoreStats, TierStats

    stats = MountStats(
        source="s3://b/m/",
        store=StoreStats(get_bytes=1234, get_results={"ok": 3, "stale": 1}, first_byte_floor=0.004),
        cache=CacheStats(hit_bytes=77, corrupt_chunks=2),
        shared=TierStats(hits=5, errors={"denied": 1}),
        snapshot=SnapshotStats(objects=4, stale=1),
        open_files=2,
        prefetched_on_open=3,
        fetched_ahead_of_open=1,
    )
    doc = json.loads(json.dumps(stats.to_json()))
    assert MountStats.from_json(doc) == stats
    assert MountStats.from_json({**doc, "from_a_newer_daemon": 1}) == stats
    text = generate_latest(make_registry(lambda: stats)).decode()
    for line in (
        "modelfs_origin_received_bytes_total 1234.0",
        'modelfs_errors_total{kind="stale"} 1.0',
        'modelfs_errors_total{kind="corrupt_chunk"} 2.0',
        "modelfs_cache_hit_bytes_total 77.0",
        "modelfs_shared_hits_total 5.0",
        'modelfs_shared_errors_total{kind="denied"} 1.0',
        "modelfs_snapshot_stale_objects 1.0",
        "modelfs_open_files 2.0",
        "modelfs_origin_first_byte_floor_seconds 0.004",
        "modelfs_prefetch_on_open_files_total 3.0",
        "modelfs_prefetch_ahead_of_open_files_total 1.0",
    ):
        assert line in text, line
