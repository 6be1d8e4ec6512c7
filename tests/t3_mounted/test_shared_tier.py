"""Mounted tier: the shared cache tier between "nodes" (mounts with their own
cache directories) on real S3 servers: a second bucket on the same server
is the tier, and a counting proxy in front of the origin shows what the
origin sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.testing.proxy import CountingProxy, Fault
from modelfs.testing.s3server import ACCESS_KEY, SECRET_KEY, JuiceFSGateway, MotoServer, free_port

from ..conftest import Bucket, Mount, Mounter, in_threads, make_bucket, run_modelfs
from ..data import put_shards
from .test_observability import scrape_metrics

pytestmark = pytest.mark.mount

MiB = 1 << 20
CHUNK = ("--chunk-size", "1M")


def _model(bucket: Bucket, n: int = 3, size: int = 3 * MiB) -> dict[str, bytes]:
    return put_shards(bucket, 80, n, size, 333)


def _tier_args(tier: Bucket, endpoint: str | None = None, *extra: str) -> tuple[str, ...]:
    return (
        *CHUNK,
        "--shared-cache",
        f"s3://{tier.name}/chunks",
        "--shared-cache-endpoint-url",
        endpoint or tier.endpoint_url,
        *extra,
    )


def _read_all(m: Mount, files: dict[str, bytes]) -> None:
    for key, value in files.items():
        assert (m.path / key).read_bytes() == value, (m.path, key)


def _uploaded(m: Mount, chunks: int) -> None:
    """Wait until the node's tier uploads are done."""
    deadline = time.monotonic() + 60
    while True:
        shared = m.stats()["shared"]
        if shared["pending_uploads"] == 0 and shared["uploads"] >= chunks:
            return
        assert time.monotonic() < deadline, shared
        time.sleep(0.1)


def _nchunks(files: dict[str, bytes]) -> int:
    return sum(-(-len(v) // MiB) for v in files.values())


def _node(
    mounter: Mounter,
    bucket: Bucket,
    origin: CountingProxy,
    cache: Path,
    args: tuple[str, ...],
    allow_log: list[str] | None = None,
) -> Mount:
    """One "node": a mount with its own cache, reading the origin through `origin`."""
    return mounter(
        bucket, endpoint_url=origin.endpoint_url, cache_dir=cache, args=args, allow_log=allow_log
    )


def _populated(
    bucket: Bucket, tier: Bucket, origin: CountingProxy, mounter: Mounter, cache: Path
) -> tuple[dict[str, bytes], Mount]:
    """A model read by one node, whose uploads to the tier are done."""
    files = _model(bucket)
    a = _node(mounter, bucket, origin, cache, _tier_args(tier))
    _read_all(a, files)
    _uploaded(a, _nchunks(files))
    return files, a


def test_a_second_node_reads_the_model_from_the_tier(
    bucket: Bucket,
    juicefs: JuiceFSGateway,
    proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
) -> None:
    tier = make_bucket(juicefs)
    files, a = _populated(bucket, tier, proxy, mounter, tmp_path / "a")
    proxy.reset()
    port = free_port()
    metrics = ("--metrics-addr", f"127.0.0.1:{port}")
    b = _node(mounter, bucket, proxy, tmp_path / "b", (*_tier_args(tier), *metrics))
    _read_all(b, files)
    met = scrape_metrics(port)
    assert met["modelfs_shared_hit_bytes_total"] == sum(len(v) for v in files.values())
    assert met["modelfs_origin_received_bytes_total"] == 0
    stats = run_modelfs("stats", str(b.path))
    assert stats.returncode == 0 and "shared     9.0 MiB from the tier in 11 chunks" in stats.stdout
    # No ranged GET of any origin object: every chunk came from the tier.
    assert proxy.object_gets() == []
    assert proxy.object_bytes() == 0
    shared = b.stats()["shared"]
    assert shared["hits"] == _nchunks(files)
    assert shared["hit_bytes"] == sum(len(v) for v in files.values())
    # The JuiceFS gateway ignores If-None-Match: found by node A's probe.
    assert a.stats()["shared"]["herd_control"] is False
    a.umount()
    b.umount()


def test_pull_reads_from_the_tier_too(
    bucket: Bucket,
    juicefs: JuiceFSGateway,
    proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
) -> None:
    tier = make_bucket(juicefs)
    files, a = _populated(bucket, tier, proxy, mounter, tmp_path / "a")
    proxy.reset()
    dest = tmp_path / "pulled"
    pulled = run_modelfs(
        "pull",
        f"s3://{bucket.name}/m",
        str(dest),
        "--endpoint-url",
        proxy.endpoint_url,
        "--cache-dir",
        str(tmp_path / "pull-cache"),
        *_tier_args(tier),
        env=bucket.env,
        timeout=120,
    )
    assert pulled.returncode == 0, pulled.stderr
    for key, value in files.items():
        assert (dest / key.removeprefix("m/")).read_bytes() == value
    assert proxy.object_gets() == []
    a.umount()


def test_a_node_failing_its_tier_writes_leaves_the_others_correct(
    bucket: Bucket,
    juicefs: JuiceFSGateway,
    proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
) -> None:
    files = _model(bucket)
    tier = make_bucket(juicefs)
    tier_proxy = CountingProxy(juicefs.endpoint_url).start()
    try:
        # Every chunk PUT of node A fails as a connection dropped mid-body would.
        tier_proxy.fault = lambda method, path, rng: (
            Fault(status=500, code="InternalError") if method == "PUT" else None
        )
        a = mounter(
            bucket,
            endpoint_url=proxy.endpoint_url,
            cache_dir=tmp_path / "a",
            args=_tier_args(tier, tier_proxy.endpoint_url),
            allow_log=["shared cache: .* failed"],
        )
        _read_all(a, files)
        deadline = time.monotonic() + 60
        while a.stats()["shared"]["pending_uploads"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert a.stats()["shared"]["uploads"] == 0
        proxy.reset()
        b = _node(mounter, bucket, proxy, tmp_path / "b", _tier_args(tier))
        _read_all(b, files)
        assert proxy.object_bytes() == sum(len(v) for v in files.values())
        a.umount()
        b.umount()
    finally:
        tier_proxy.stop()


def test_a_corrupt_tier_object_costs_one_chunk_from_the_origin(
    bucket: Bucket,
    juicefs: JuiceFSGateway,
    proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
) -> None:
    tier = make_bucket(juicefs)
    files, a = _populated(bucket, tier, proxy, mounter, tmp_path / "a")
    keys = sorted(
        o["Key"]
        for o in tier.client.list_objects_v2(Bucket=tier.name, Prefix="chunks/")["Contents"]
    )
    victim = keys[len(keys) // 2]
    body = bytearray(tier.client.get_object(Bucket=tier.name, Key=victim)["Body"].read())
    body[100] ^= 0x01
    tier.client.put_object(Bucket=tier.name, Key=victim, Body=bytes(body))
    proxy.reset()
    b = _node(mounter, bucket, proxy, tmp_path / "b", _tier_args(tier), allow_log=["is corrupt"])
    _read_all(b, files)
    assert len(proxy.object_gets()) == 1
    assert proxy.object_bytes() == MiB
    assert b.stats()["shared"]["corrupt"] == 1
    a.umount()
    b.umount()


def test_an_unreachable_tier_is_not_fatal(
    bucket: Bucket, proxy: CountingProxy, mounter: Mounter, tmp_path: Path
) -> None:
    files = _model(bucket)
    dead = f"http://127.0.0.1:{free_port()}"
    m = mounter(
        bucket,
        endpoint_url=proxy.endpoint_url,
        args=(*CHUNK, "--shared-cache", "s3://nowhere/c", "--shared-cache-endpoint-url", dead),
        allow_log=["shared cache: .* failed"],
    )
    _read_all(m, files)
    assert proxy.object_bytes() == sum(len(v) for v in files.values())
    shared = m.stats()["shared"]
    assert shared["errors"].get("unreachable", 0) >= 1 and shared["hits"] == 0
    warnings = [ln for ln in m.log_file.read_text().splitlines() if "shared cache:" in ln]
    assert len(warnings) == 1, warnings
    m.umount()


# -- herd control: moto honours If-None-Match --------------------------------
@pytest.fixture
def moto_proxy(moto: MotoServer) -> Iterator[CountingProxy]:
    p = CountingProxy(moto.endpoint_url).start()
    yield p
    p.stop()


def test_nodes_starting_together_fetch_each_chunk_from_the_origin_once(
    moto_bucket: Bucket,
    moto: MotoServer,
    moto_proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
) -> None:
    files = _model(moto_bucket, n=2, size=3 * MiB)
    tier = make_bucket(moto)
    args = _tier_args(tier)
    nodes = [
        mounter(
            moto_bucket,
            endpoint_url=moto_proxy.endpoint_url,
            cache_dir=tmp_path / f"n{i}",
            args=args,
        )
        for i in range(3)
    ]
    in_threads(*[lambda m=m: _read_all(m, files) for m in nodes])
    assert moto_proxy.object_bytes("") == sum(len(v) for v in files.values())
    stats = [m.stats()["shared"] for m in nodes]
    assert all(s["herd_control"] is True for s in stats)
    assert sum(s["leases_won"] for s in stats) >= _nchunks(files)
    assert sum(s["lease_waits"] for s in stats) > 0
    for m in nodes:
        m.umount()


def test_a_lease_left_by_a_killed_node_expires(
    moto_bucket: Bucket,
    moto: MotoServer,
    moto_proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
) -> None:
    files = _model(moto_bucket, n=1, size=3 * MiB)
    tier = make_bucket(moto)
    tier_proxy = CountingProxy(moto.endpoint_url).start()
    try:
        # Node A's uploads hang (and would then fail): it is killed meanwhile,
        # holding its leases and having written no chunk.
        tier_proxy.fault = lambda method, path, rng: (
            Fault(status=500, code="InternalError", stall=30)
            if method == "PUT" and not path.endswith(".lease") and "/.modelfs-probe/" not in path
            else None
        )
        lease = ("--shared-cache-lease", "3")
        a = mounter(
            moto_bucket,
            endpoint_url=moto_proxy.endpoint_url,
            cache_dir=tmp_path / "a",
            args=_tier_args(tier, tier_proxy.endpoint_url, *lease),
        )
        _read_all(a, files)
        a.kill()
        leases = [
            o["Key"]
            for o in tier.client.list_objects_v2(Bucket=tier.name).get("Contents", [])
            if o["Key"].endswith(".lease")
        ]
        assert len(leases) == _nchunks(files)
        moto_proxy.reset()
        b = mounter(
            moto_bucket,
            endpoint_url=moto_proxy.endpoint_url,
            cache_dir=tmp_path / "b",
            args=_tier_args(tier, None, *lease),
        )
        t0 = time.monotonic()
        _read_all(b, files)
        assert time.monotonic() - t0 < 60
        assert moto_proxy.object_bytes("") == sum(len(v) for v in files.values())
        assert b.stats()["shared"]["lease_waits"] > 0
        b.umount()
    finally:
        tier_proxy.stop()


def test_the_tier_can_have_its_own_credentials(
    bucket: Bucket, juicefs: JuiceFSGateway, proxy: CountingProxy, mounter: Mounter, tmp_path: Path
) -> None:
    """--shared-cache-profile: the tier's keys from another profile of the
    same credentials file; wrong ones cost the tier, never a read."""
    files = _model(bucket)
    tier = make_bucket(juicefs)
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[models]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        f"[tier]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        f"[wrong]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = not-it\n"
    )
    base = (*_tier_args(tier), "--credentials-file", str(creds), "--profile", "models")
    bad = _node(
        mounter,
        bucket,
        proxy,
        tmp_path / "bad",
        (*base, "--shared-cache-profile", "wrong"),
        allow_log=["shared cache: .* failed"],
    )
    _read_all(bad, files)
    assert bad.stats()["shared"]["errors"].get("denied", 0) >= 1
    good_args = (*base, "--shared-cache-profile", "tier")
    good = _node(mounter, bucket, proxy, tmp_path / "good", good_args)
    _read_all(good, files)
    _uploaded(good, _nchunks(files))
    bad.umount()
    good.umount()
