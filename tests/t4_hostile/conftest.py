"""Fixtures of the hostile-world tier: a misbehaving fake endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modelfs.testing.fakes3 import FakeS3
from modelfs.testing.s3server import JuiceFSGateway

from ..conftest import Bucket, make_bucket

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "fake",
    "AWS_SECRET_ACCESS_KEY": "fake-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def fake() -> Iterator[FakeS3]:
    with FakeS3() as server:
        yield server


@pytest.fixture
def fake_bucket(fake: FakeS3) -> Bucket:
    """The fake endpoint as a `Bucket` the mounter takes (no boto3 client:
    tests put objects with `fake.put`)."""
    return Bucket(fake.bucket, None, fake.endpoint_url, dict(FAKE_ENV))


@pytest.fixture(scope="session")
def no_etag_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JuiceFSGateway]:
    """The JuiceFS gateway without --keep-etag: a real server that sends no ETag."""
    with JuiceFSGateway(tmp_path_factory.mktemp("noetag"), keep_etag=False) as srv:
        yield srv  # type: ignore[misc]


@pytest.fixture
def no_etag_gateway(no_etag_server: JuiceFSGateway) -> Bucket:
    return make_bucket(no_etag_server)
