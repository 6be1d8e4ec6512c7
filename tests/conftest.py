"""Shared fixtures: real S3 servers on loopback, a counting proxy, real mounts.

Every mount made through `mounter` is torn down even when its test fails:
``fusermount3 -u``, then ``-uz``, then the daemon is killed; a test that
leaves a daemon alive or a mount behind fails. Any warning or error logged
in-process, or in a daemon's log, fails the test unless the test allows it
(``@pytest.mark.allow_log("regex")`` or ``mounter(..., allow_log=[...])``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from modelfs.mounts import find_mount, process_alive
from modelfs.testing.proxy import CountingProxy
from modelfs.testing.s3server import JuiceFSGateway, MotoServer

_bucket_ids = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_log(pattern): a logged warning this test expects")


@pytest.fixture(autouse=True)
def _fail_on_unexpected_log(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    allowed = [m.args[0] for m in request.node.iter_markers("allow_log")]
    bad = [
        r
        for r in caplog.get_records("call")
        if r.levelno >= logging.WARNING
        and not r.name.startswith(("botocore", "urllib3", "hypothesis"))
        and not any(re.search(p, r.getMessage()) for p in allowed)
    ]
    if bad:
        pytest.fail("unexpected log records: " + "; ".join(r.getMessage() for r in bad))


@pytest.fixture(autouse=True)
def _no_mount_left_under_tmp(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that expected a mount to be refused, and failed because it was
    made, must not leave it behind: any modelfs mount under the test's
    tmp_path is unmounted (and its daemon then exits)."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    root = str(request.getfixturevalue("tmp_path"))
    yield
    with open("/proc/self/mountinfo") as f:
        left = [
            line.split()[4]
            for line in f
            if " - fuse.modelfs " in line and line.split()[4].startswith(root + "/")
        ]
    for mnt in left:
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)


# -- servers ---------------------------------------------------------------
@pytest.fixture(scope="session")
def juicefs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JuiceFSGateway]:
    with JuiceFSGateway(tmp_path_factory.mktemp("juicefs")) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server  # type: ignore[misc]


@dataclass
class Bucket:
    name: str
    client: Any
    endpoint_url: str
    env: dict[str, str]

    def put(self, key: str, data: bytes) -> str:
        return str(self.client.put_object(Bucket=self.name, Key=key, Body=data)["ETag"])


def make_bucket(server: Any) -> Bucket:
    client = server.client()
    name = f"t{os.getpid()}-{next(_bucket_ids)}"
    client.create_bucket(Bucket=name)
    return Bucket(name, client, server.endpoint_url, server.env())


@pytest.fixture
def bucket(juicefs: JuiceFSGateway) -> Bucket:
    return make_bucket(juicefs)


@pytest.fixture
def moto_bucket(moto: MotoServer) -> Bucket:
    return make_bucket(moto)


@pytest.fixture
def proxy(juicefs: JuiceFSGateway) -> Iterator[CountingProxy]:
    p = CountingProxy(juicefs.endpoint_url).start()
    yield p
    p.stop()


# -- helpers ---------------------------------------------------------------
def in_threads(*jobs: Callable[[], None]) -> None:
    """Run the jobs in threads at once; fail with what any of them raised."""
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors


# -- mounts ----------------------------------------------------------------
def run_modelfs(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfs", *args],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Mount:
    path: Path
    cache_dir: Path
    log_file: Path
    pid: int
    allow_log: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(os.getxattr(self.path, "user.modelfs.stats")))

    def fetched_bytes(self) -> int:
        return int(self.stats()["store"]["get_bytes"])

    def settle(self, timeout: float = 15) -> dict[str, Any]:
        """The stats once every chunk a reader got is written to the cache
        (chunks are served first and written just after)."""
        deadline = time.monotonic() + timeout
        while (stats := self.stats())["cache"]["pending_writes"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stats["cache"]["pending_writes"] == 0, "cache writes did not finish"
        return stats

    def umount(self) -> None:
        proc = run_modelfs("umount", str(self.path))
        assert proc.returncode == 0, proc.stderr
        assert find_mount(self.path) is None
        assert not process_alive(self.pid), "daemon still running after umount"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)
        deadline = time.monotonic() + 30
        while process_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def teardown(self) -> list[str]:
        """Unmount whatever is left; returns problems found."""
        problems = []
        if find_mount(self.path) is not None:
            for flag in ("-u", "-uz"):
                subprocess.run(["fusermount3", flag, str(self.path)], capture_output=True)
                if find_mount(self.path) is None:
                    break
        deadline = time.monotonic() + 10
        while process_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(self.pid):
            problems.append(f"daemon {self.pid} still running")
            os.kill(self.pid, signal.SIGKILL)
        if self.log_file.exists():
            for line in self.log_file.read_text().splitlines():
                if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line) and not any(
                    re.search(p, line) for p in self.allow_log
                ):
                    problems.append(f"daemon log: {line}")
        return problems


class Mounter:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mounts: list[Mount] = []
        self._n = itertools.count()

    def __call__(
        self,
        bucket: Bucket,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        cache_dir: Path | None = None,
        args: tuple[str, ...] = (),
        allow_log: list[str] | None = None,
    ) -> Mount:
        n = next(self._n)
        mnt = self.tmp_path / f"mnt{n}"
        mnt.mkdir(exist_ok=True)
        cache_dir = cache_dir or self.tmp_path / "cache"
        log_file = self.tmp_path / f"modelfs-{n}.log"
        source = f"s3://{bucket.name}/{prefix}".rstrip("/")
        proc = run_modelfs(
            "mount",
            source,
            str(mnt),
            "--endpoint-url",
            endpoint_url or bucket.endpoint_url,
            "--cache-dir",
            str(cache_dir),
            "--log-file",
            str(log_file),
            *args,
            env=bucket.env,
        )
        assert proc.returncode == 0, f"mount failed: {proc.stderr}"
        pid = int(os.getxattr(mnt, "user.modelfs.pid"))
        m = Mount(mnt, cache_dir, log_file, pid, allow_log or [])
        self.mounts.append(m)
        return m


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    m = Mounter(tmp_path)
    yield m
    problems = []
    for mount in m.mounts:
        problems += mount.teardown()
    if problems:
        pytest.fail("mount teardown: " + "; ".join(problems))


def modelfs_daemons() -> set[int]:
    """Pids of every `modelfs mount` process on the machine (so never run
    two mounted test runs at once)."""
    out = subprocess.run(["pgrep", "-f", "modelfs mount"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def mount_fails(
    tmp_path: Path,
    bucket: Bucket,
    *extra: str,
    source: str | None = None,
    env: dict[str, str] | None = None,
    mnt: Path | None = None,
    endpoint: str | None = None,
) -> str:
    mnt = mnt or tmp_path / "mnt"
    if mnt == tmp_path / "mnt":
        mnt.mkdir(exist_ok=True)
    before = modelfs_daemons()
    mounted_before = find_mount(mnt) if mnt.is_dir() else None
    proc = run_modelfs(
        "mount",
        source or f"s3://{bucket.name}",
        str(mnt),
        "--endpoint-url",
        endpoint or bucket.endpoint_url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-file",
        str(tmp_path / "log"),
        *extra,
        env=env if env is not None else bucket.env,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "internal error" not in proc.stderr, proc.stderr  # a user error, named as such
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    if mnt.is_dir():
        assert find_mount(mnt) == mounted_before
    assert modelfs_daemons() <= before
    return lines[-1]
