"""Unit tier: mount(8)-style invocations turned into ``modelfs mount`` arguments."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from modelfs.cli import build_parser, config_from_args, normalize_argv
from modelfs.errors import ConfigError
from modelfs.mountopts import helper_argv
from modelfs.sdnotify import notify


def _args(*argv: str) -> list[str]:
    return normalize_argv(list(argv))


def test_fstab_line_of_the_docs() -> None:
    # What mount.fuse3 runs for the fstab example (mount(8) adds dev,suid).
    argv = _args(
        "s3://models/llama",
        "/mnt/models",
        "-o",
        "ro,allow_other,endpoint_url=http://10.0.0.5:9000,cache_dir=/var/cache/modelfs,dev,suid",
    )
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.source.bucket, cfg.source.prefix) == ("models", "llama/")
    assert cfg.mountpoint == Path("/mnt/models")
    assert cfg.allow_other is True
    assert cfg.endpoint_url == "http://10.0.0.5:9000"
    assert cfg.cache_dir == Path("/var/cache/modelfs")


def test_every_long_option_can_be_written_with_o(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.write_text("[p]\n")
    argv = _args(
        "s3://bk",
        "/m",
        "-o",
        "cache_size=10G,chunk-size=4M,metadata_ttl=5,fetch_concurrency=3,prefetch_window=0,"
        f"memory_cache=64M,uid=7,gid=8,region=eu-west-1,profile=p,credentials_file={creds},"
        "addressing_style=path,debug,log_file=/tmp/x.log",
        "-oforeground",
    )
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.cache_size, cfg.chunk_size, cfg.metadata_ttl) == (10 << 30, 4 << 20, 5.0)
    assert (cfg.fetch_concurrency, cfg.prefetch_window, cfg.memory_cache) == (3, 0, 64 << 20)
    assert (cfg.uid, cfg.gid, cfg.region, cfg.profile) == (7, 8, "eu-west-1", "p")
    assert cfg.credentials_file == creds
    assert cfg.addressing_style == "path" and cfg.debug and cfg.foreground
    assert cfg.log_file == Path("/tmp/x.log")


def test_snapshot_options_can_be_written_with_o() -> None:
    argv = _args("s3://bk/m", "/m", "-o", "snapshot,manifest=s3://bk/rollouts/v1.json")
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.snapshot and cfg.manifest == "s3://bk/rollouts/v1.json"


def test_options_of_fstab_mount_and_systemd_are_ignored() -> None:
    ignored = (
        "defaults,auto,noauto,_netdev,nofail,user,users,x-systemd.automount,"
        "x-systemd.idle-timeout=60,x-systemd.requires=network-online.target,comment=abc,"
        "ro,rw,nodev,nosuid,noatime,default_permissions"
    )
    assert _args("s3://bk", "/m", "-o", ignored) == ["mount", "s3://bk", "/m"]


def test_subcommand_form_takes_o_too() -> None:
    assert _args("mount", "s3://bk", "/m", "-o", "debug") == ["mount", "s3://bk", "/m", "--debug"]
    assert _args("umount", "/m") == ["umount", "/m"]


@pytest.mark.parametrize(
    "opts, message",
    [
        ("bogus=1", "unknown mount option 'bogus'"),
        ("allow_other=yes", "mount option 'allow_other' takes no value"),
        ("cache_dir", "mount option 'cache_dir' needs a value"),
        ("cache_dir=", "mount option 'cache_dir' needs a value"),
    ],
)
def test_bad_options_are_named(opts: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _args("s3://bk", "/m", "-o", opts)


def test_an_unknown_option_never_echoes_its_value() -> None:
    with pytest.raises(ConfigError) as err:
        _args("s3://bk", "/m", "-o", "aws_secret_access_key=TOPSECRET")
    assert "TOPSECRET" not in str(err.value)
    assert "aws_secret_access_key" in str(err.value)


def test_a_missing_credentials_file_is_a_config_error(tmp_path: Path) -> None:
    argv = _args("s3://bk", "/m", "-o", f"credentials_file={tmp_path}/nope")
    with pytest.raises(ConfigError, match="credentials file .* missing or not readable"):
        config_from_args(build_parser().parse_args(argv))


def test_mount_helper_arguments() -> None:
    # mount(8): /sbin/mount.modelfs SPEC DIR [-sfnv] [-o OPTS] [-t TYPE]
    args, fake = helper_argv(["s3://bk", "/m", "-sn", "-v", "-o", "ro,debug", "-t", "modelfs"])
    assert (args, fake) == (["s3://bk", "/m", "-o", "ro,debug"], False)
    assert helper_argv(["s3://bk", "/m", "-f", "-o", "ro"])[1] is True
    with pytest.raises(ConfigError, match="-N"):
        helper_argv(["s3://bk", "/m", "-N", "/proc/1/ns/mnt"])


def test_sd_notify_sends_to_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False  # outside systemd: nothing to do
    for address, env in ((str(tmp_path / "s"), str(tmp_path / "s")), ("\0mfs-t", "@mfs-t")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(address)
            monkeypatch.setenv("NOTIFY_SOCKET", env)
            assert notify("READY=1") is True
            assert sock.recv(100) == b"READY=1"
