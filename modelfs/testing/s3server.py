"""Local S3-compatible servers on loopback, for tests, the demo and benchmarks.

`JuiceFSGateway` is a MinIO-derived gateway over a local directory: fast, and
honours If-Match, but backed by a filesystem (it cannot hold both ``a`` and
``a/b``). `MotoServer` follows S3's key rules faithfully but is slow. Both
are context managers that never leave a process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ACCESS_KEY = "modelfs-test"
SECRET_KEY = "modelfs-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found; run 'make venv'")
    return found


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout} s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Server:
    endpoint_url: str
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """Environment for a boto3 client or a modelfs process talking to it."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, **kwargs: Any) -> Any:
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, max_pool_connections=32, **kwargs
            ),
        )

    def put_file(self, client: Any, path: Path, bucket: str, key: str) -> None:
        """Upload `path` as one PUT (objects up to 5 GiB). Benchmarks upload
        this way, not with `upload_file`: the JuiceFS gateway compacts a
        multipart object's slices on its first read, rewriting the whole
        object then (server CPU and dirty pages in the middle of whichever
        run reads first); a single PUT leaves nothing to compact."""
        with open(path, "rb") as f:
            client.put_object(Bucket=bucket, Key=key, Body=f)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> _Server:
        self.start()
        return self

    def __exit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class JuiceFSGateway(_Server):
    def __init__(self, workdir: Path, keep_etag: bool = True) -> None:
        self.workdir = workdir
        self.keep_etag = keep_etag
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        meta = f"sqlite3://{self.workdir}/meta.db"
        log = open(self.workdir / "gateway.log", "ab")  # noqa: SIM115 - owned by the process
        if not (self.workdir / "meta.db").exists():
            subprocess.run(
                [
                    _bin("juicefs"),
                    "format",
                    "--storage",
                    "file",
                    "--bucket",
                    f"{self.workdir}/blocks/",
                    meta,
                    "modelfs-test",
                ],
                check=True,
                stdout=log,
                stderr=log,
            )
        cmd = [
            _bin("juicefs"),
            "gateway",
            meta,
            f"127.0.0.1:{self.port}",
            "--multi-buckets",
            "--no-usage-report",
            "--quiet",
            # The data already lies on local disk; JuiceFS's own block cache
            # would only copy it again into /var/jfsCache (100 GiB by default),
            # where nothing ever removes it.
            "--cache-dir",
            f"{self.workdir}/jfscache",
            "--cache-size",
            "0",
        ]
        if self.keep_etag:
            cmd.append("--keep-etag")
        env = dict(os.environ, MINIO_ROOT_USER=ACCESS_KEY, MINIO_ROOT_PASSWORD=SECRET_KEY)
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        log.close()
        wait_for_port(self.port, self.proc)
        # The port opens before IAM is ready; wait until a request succeeds.
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)


class MotoServer(_Server):
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)
