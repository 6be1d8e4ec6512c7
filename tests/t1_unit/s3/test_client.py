"""modelfs.s3.client: the sessions and clients modelfs makes."""

from __future__ import annotations

import os
from pathlib import Path

import botocore
import pytest

from modelfs.s3 import client as s3client
from modelfs.s3.settings import S3Settings

SETTINGS = S3Settings(
    endpoint_url="http://127.0.0.1:9",
    region="us-east-1",
    profile=None,
    credentials_file=None,
    addressing_style="path",
    unsigned=False,
    connect_timeout=1.0,
    read_timeout=1.0,
    retry_timeout=1.0,
    pool=4,
)


def test_an_s3_client_is_made_without_listing_every_service_botocore_knows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore lists the directory of every service it has models for
    before loading one (some 460); modelfs asks only for S3, and a mount's
    start should not pay for the others (reading each from disk on a node
    that has just booted)."""
    data = str(Path(botocore.__file__).parent / "data")
    listed: list[str] = []
    real_listdir = os.listdir

    def counting_listdir(path: str | os.PathLike[str] = ".") -> list[str]:
        if str(path).startswith(data):
            listed.append(str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", counting_listdir)
    client = s3client.client(
        s3client.session(SETTINGS), SETTINGS, retries={"total_max_attempts": 1}
    )
    assert client.meta.service_model.service_name == "s3"
    assert client.meta.service_model.operation_model("GetObject").name == "GetObject"
    # The S3 model's own directory (its API versions), not all the others.
    assert 0 < len(listed) <= 4, listed[:10]


def test_the_session_still_loads_the_models_botocore_needs_for_itself() -> None:
    """Web identity credentials make botocore load STS's model from the same
    session: the shortcut for S3 must not hide the other services."""
    session = s3client.session(SETTINGS)
    sts = session.client("sts", endpoint_url="http://127.0.0.1:9", region_name="us-east-1")
    assert sts.meta.service_model.service_name == "sts"
    loader = session._session.get_component("data_loader")
    assert "s3" in loader.list_available_services("service-2")
    assert "sts" in list(loader.list_available_services("service-2"))
    assert "no-such-service" not in loader.list_available_services("service-2")


def test_the_models_are_parsed_into_plain_dicts_with_the_same_content() -> None:
    """botocore's own loader builds every JSON object as an OrderedDict
    through a Python hook (twice the parse time of S3's model, endpoint
    rules and endpoints table at every mount); modelfs's loader parses into
    plain dicts, and what it loads is what botocore would have loaded."""
    import botocore.loaders

    loader = s3client.session(SETTINGS)._session.get_component("data_loader")
    own = botocore.loaders.create_loader()
    for args in (("s3", "service-2"), ("s3", "endpoint-rule-set-1")):
        mine = loader.load_service_model(*args)
        assert type(mine) is dict and mine == own.load_service_model(*args)
    assert loader.load_data("endpoints") == own.load_data("endpoints")
