"""Unit tier: parsing of user input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from modelfs.config import (
    MiB,
    MountConfig,
    S3Location,
    parse_mode,
    parse_s3_url,
    parse_size,
    parse_ttl,
)
from modelfs.errors import ConfigError


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("8M", 8 * MiB),
        ("8MiB", 8 * MiB),
        ("8mb", 8 * MiB),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        (" 64 K ", 64 << 10),
        ("0", 0),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1M", "8Q", "1.3", "eight"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        parse_size(text)


@pytest.mark.parametrize(
    "url, loc",
    [
        ("s3://bucket", S3Location("bucket", "")),
        ("s3://bucket/", S3Location("bucket", "")),
        ("s3://bucket/models/llama", S3Location("bucket", "models/llama/")),
        ("s3://bucket/models/llama/", S3Location("bucket", "models/llama/")),
    ],
)
def test_parse_s3_url(url: str, loc: S3Location) -> None:
    assert parse_s3_url(url) == loc


@pytest.mark.parametrize(
    "url", ["bucket/x", "s3://", "s3://b", "s3://bad bucket/x", "s3://b1/a//c", "s3://b1/a/../c"]
)
def test_parse_s3_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_s3_url(url)


def _cfg(**kw: object) -> MountConfig:
    return MountConfig(source=S3Location("b", ""), mountpoint=Path("/mnt"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"chunk_size": 1000}, "between"),
        ({"chunk_size": 64 * 1024 + 1}, "between|multiple"),
        ({"chunk_size": 66 * 1024}, "multiple of 4 KiB"),
        ({"cache_size": MiB}, "at least four chunks"),
        ({"memory_cache": MiB}, "--memory-cache must hold at least one chunk"),
        ({"metadata_ttl": -1}, ">= 0"),
        ({"uid": -5}, "--uid"),
        ({"endpoint_url": "localhost:9000"}, "endpoint-url"),
        ({"addressing_style": "odd"}, "addressing-style"),
        ({"shared_cache": S3Location("b", "")}, "must not overlap"),
        ({"shared_cache": S3Location("b", "x/")}, "must not overlap"),  # source is all of b
        ({"shared_cache": S3Location("t", ""), "shared_cache_lease": 0}, "lease must be > 0"),
        (
            {"shared_cache": S3Location("t", ""), "shared_cache_endpoint_url": "tier:9000"},
            "shared-cache-endpoint-url",
        ),
    ],
)
def test_validate(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        _cfg(**kw).validate()


def test_shared_cache_beside_the_mounted_prefix_is_fine() -> None:
    cfg = MountConfig(
        source=S3Location("b", "models/"),
        mountpoint=Path("/mnt"),
        shared_cache=S3Location("b", "cache/"),
    )
    cfg.validate()
    # Another server may have a bucket of the same name.
    _cfg(shared_cache=S3Location("b", ""), shared_cache_endpoint_url="http://tier:9000").validate()


def test_defaults_validate() -> None:
    _cfg().validate()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from modelfs.config import default_cache_dir

    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_cache_dir() == Path("/var/cache/modelfs")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "modelfs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "modelfs"


@pytest.mark.parametrize(
    ("text", "mode"), [("444", 0o444), ("0o440", 0o440), ("550", 0o550), ("0", 0), ("0555", 0o555)]
)
def test_parse_mode(text: str, mode: int) -> None:
    assert parse_mode(text) == mode


@pytest.mark.parametrize("text", ["644", "777", "4555", "abc", "9", "", "44444"])
def test_parse_mode_refuses_write_and_special_bits_and_garbage(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_mode(text)


@pytest.mark.parametrize(
    ("text", "ttl"), [("indefinite", math.inf), ("forever", math.inf), ("0", 0.0), ("2.5", 2.5)]
)
def test_parse_ttl(text: str, ttl: float) -> None:
    assert parse_ttl(text) == ttl


@pytest.mark.parametrize("text", ["nan", "soon", "", "-inf"])
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_ttl(text)


def test_an_indefinite_ttl_validates_and_a_huge_one_does_not() -> None:
    base = dict(source=S3Location("b", ""), mountpoint=Path("/mnt"))
    MountConfig(**base, metadata_ttl=parse_ttl("indefinite")).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="indefinite"):
        MountConfig(**base, metadata_ttl=1e300).validate()  # type: ignore[arg-type]
