"""A server that sends no ETag (the JuiceFS gateway without --keep-etag):
objects are pinned by (size, LastModified) and GETs carry If-Unmodified-Since."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.testing.proxy import CountingProxy
from modelfs.testing.s3server import JuiceFSGateway

from ..conftest import Mounter, make_bucket
from ..data import pattern

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def no_etag_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JuiceFSGateway]:
    with JuiceFSGateway(tmp_path_factory.mktemp("noetag"), keep_etag=False) as srv:
        yield srv  # type: ignore[misc]


def test_reads_are_exact_and_cached_without_etags(
    no_etag_server: JuiceFSGateway, mounter: Mounter, tmp_path: Path
) -> None:
    bucket = make_bucket(no_etag_server)
    data = pattern(5, 0, 3 << 20)
    bucket.put("w.bin", data)
    listed = bucket.client.list_objects_v2(Bucket=bucket.name)["Contents"][0]
    assert not listed.get("ETag")  # the case under test
    proxy = CountingProxy(no_etag_server.endpoint_url).start()
    try:
        cache = tmp_path / "c"
        m = mounter(
            bucket, endpoint_url=proxy.endpoint_url, cache_dir=cache, args=("--chunk-size", "1M")
        )
        assert (m.path / "w.bin").read_bytes() == data
        gets = proxy.object_gets()
        assert gets and all(r.status == 206 and r.if_match is None for r in gets)
        m.umount()
        proxy.reset()
        m = mounter(
            bucket, endpoint_url=proxy.endpoint_url, cache_dir=cache, args=("--chunk-size", "1M")
        )
        assert (m.path / "w.bin").read_bytes() == data
        assert proxy.object_gets() == []
        m.umount()
    finally:
        proxy.stop()
