"""Container tier: the image mounts a model as the DaemonSet runs it, and the
host and a sibling container read it.

The modelfs container gets the DaemonSet's own environment (the same
MODELFS_* values, but for the endpoint, which is the counting proxy on the
host's loopback), its three volumes (the models directory with shared
propagation, the cache directory, the credentials file read-only) and its
probe commands, run with `exec` as the kubelet does. docs/deploy.md
describes the same setup for docker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfs.mounts import find_mount
from modelfs.testing.proxy import CountingProxy
from tests.conftest import Bucket
from tests.data import pattern
from tests.t6_container.conftest import IMAGE, Engine, fuse_mounts_under

K8S = Path(__file__).resolve().parents[2] / "docs/deploy/k8s"
REPORT = os.environ.get("MODELFS_CONTAINER_REPORT")


def _modelfs_container(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((K8S / name).read_text())
    spec = doc["spec"]["template"]["spec"] if "template" in doc["spec"] else doc["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == "modelfs":
            return dict(c)
    raise AssertionError(f"no modelfs container in {name}")


DAEMONSET = _modelfs_container("daemonset.yaml")
# Every exec probe the manifests give the modelfs container: the DaemonSet's
# readiness, and the sidecar's startup and readiness (`modelfs warm --check`).
PROBES = {
    f"{manifest}:{kind}": c[kind]["exec"]["command"]
    for manifest, c in (
        ("daemonset", DAEMONSET),
        ("sidecar", _modelfs_container("sidecar.yaml")),
    )
    for kind in ("startupProbe", "readinessProbe")
    if kind in c
}
READY_ONCE_MOUNTED = ["daemonset:readinessProbe", "sidecar:startupProbe"]
READY_ONCE_CACHED = "sidecar:readinessProbe"


def _env(endpoint_url: str) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in DAEMONSET["env"]}
    opts = [o for o in env["MODELFS_OPTIONS"].split(",") if not o.startswith("endpoint_url=")]
    env["MODELFS_OPTIONS"] = ",".join([f"endpoint_url={endpoint_url}", *opts])
    return env


def _volume_path(name: str) -> str:
    return str(next(m["mountPath"] for m in DAEMONSET["volumeMounts"] if m["name"] == name))


def _model(bucket: Bucket) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
        "model-00001-of-00002.bin": pattern(61, 0, 24 << 20),
        "model-00002-of-00002.bin": pattern(62, 0, (17 << 20) + 4321),
    }
    for name, data in files.items():
        bucket.put(f"llama/{name}", data)
    return files


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Setup:
    """The host side of one DaemonSet pod: its hostPaths and credentials."""

    def __init__(self, tmp_path: Path, shared_dir: Path, bucket: Bucket, proxy: CountingProxy):
        self.env = _env(proxy.endpoint_url)
        self.env["MODELFS_SOURCE"] = f"s3://{bucket.name}/llama"
        self.models = shared_dir
        self.cache = tmp_path / "cache"
        self.cache.mkdir()
        secret = tmp_path / "secret"
        secret.mkdir()
        creds = secret / "credentials"
        profile = re.search(r"(?:^|,)profile=([^,]+)", self.env["MODELFS_OPTIONS"])
        creds.write_text(
            f"[{profile.group(1) if profile else 'default'}]\n"
            f"aws_access_key_id = {bucket.env['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {bucket.env['AWS_SECRET_ACCESS_KEY']}\n"
        )
        creds.chmod(0o400)
        self.secret = secret
        mountpoint = self.env["MODELFS_MOUNTPOINT"]
        models_path = _volume_path("models")
        assert mountpoint.startswith(models_path + "/")
        # Where the container's mount appears on the host.
        self.host_mountpoint = shared_dir / mountpoint[len(models_path) + 1 :]

    def run_args(self, *security: str) -> list[str]:
        args = [*security, "--network", "host"]
        for k, v in self.env.items():
            args += ["-e", f"{k}={v}"]
        args += [
            "-v",
            f"{self.models}:{_volume_path('models')}:rshared",
            "-v",
            f"{self.cache}:{_volume_path('cache')}",
            "-v",
            f"{self.secret}:{_volume_path('credentials')}:ro",
            IMAGE,
        ]
        return args


def _wait_mounted(engine: Engine, name: str, path: Path, timeout: float = 60) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        entry = find_mount(path)
        if entry is not None and entry.fstype == "fuse.modelfs":
            # Mounted is not yet answering: a stat goes through the daemon.
            os.stat(path)
            return
        if not engine.running(name):
            break
        time.sleep(0.02)
    pytest.fail(f"no mount at {path}; container log:\n{engine.logs(name)[-3000:]}")


def _stop(engine: Engine, name: str, host_mountpoint: Path) -> None:
    # The DaemonSet's grace period: SIGTERM, then this long before SIGKILL.
    engine.call("stop", "-t", "30", name)
    assert find_mount(host_mountpoint) is None, "the host still has the mount after stop"
    assert not fuse_mounts_under(host_mountpoint.parent)
    logs = engine.logs(name)
    assert "Traceback" not in logs, logs[-3000:]


def _report(key: str, value: object) -> None:
    if not REPORT:
        return
    path = Path(REPORT)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1))


def test_daemonset_pod_serves_the_host_and_a_sibling_and_restarts_without_fetching(
    engine: Engine, tmp_path: Path, shared_dir: Path, bucket: Bucket, proxy: CountingProxy
) -> None:
    files = _model(bucket)
    model_bytes = sum(len(v) for v in files.values())
    setup = Setup(tmp_path, shared_dir, bucket, proxy)

    # The reader (vLLM's place) starts first, so the mount must reach a
    # namespace that already exists: rslave, as docs/deploy.md says.
    engine.run("sibling", "-v", f"{shared_dir}:/models:rslave", IMAGE, "sleep", "600")
    sibling_path = "/models/" + str(setup.host_mountpoint.relative_to(shared_dir))

    started = time.monotonic()
    engine.run("modelfs", *setup.run_args("--privileged"))
    _wait_mounted(engine, "modelfs", setup.host_mountpoint)
    _report("run_to_mount_answering_s", round(time.monotonic() - started, 2))

    # Mounted, nothing read: the mount probes pass, the cache probe does not.
    for probe in READY_ONCE_MOUNTED:
        assert engine.exec("modelfs", *PROBES[probe]) == 0, probe
    assert engine.exec("modelfs", *PROBES[READY_ONCE_CACHED]) == 1

    for name, data in files.items():
        assert (setup.host_mountpoint / name).read_bytes() == data, name
    sums = engine.output("sibling", "sha256sum", *(f"{sibling_path}/{n}" for n in files))
    got = {line.split()[1].rsplit("/", 1)[1]: line.split()[0] for line in sums.splitlines()}
    assert got == {n: _sha(d) for n, d in files.items()}
    assert proxy.object_bytes() == model_bytes

    # Everything read once is in the cache: ready.
    assert engine.exec("modelfs", *PROBES[READY_ONCE_CACHED]) == 0

    _stop(engine, "modelfs", setup.host_mountpoint)
    mounts = engine.output("sibling", "cat", "/proc/self/mountinfo")
    assert " - fuse.modelfs " not in mounts, "the sibling still sees the mount after stop"

    # A new pod over the same cache hostPath fetches nothing.
    proxy.reset()
    engine.run("modelfs2", *setup.run_args("--privileged"))
    _wait_mounted(engine, "modelfs2", setup.host_mountpoint)
    sums = engine.output("sibling", "sha256sum", *(f"{sibling_path}/{n}" for n in files))
    assert {ln.split()[0] for ln in sums.splitlines()} == {_sha(d) for d in files.values()}
    for name, data in files.items():
        assert (setup.host_mountpoint / name).read_bytes() == data, name
    assert proxy.object_bytes() == 0
    assert engine.exec("modelfs2", *PROBES[READY_ONCE_CACHED]) == 0
    _stop(engine, "modelfs2", setup.host_mountpoint)


def test_unprivileged_container_with_fuse_device_and_sys_admin_mounts(
    engine: Engine, tmp_path: Path, shared_dir: Path, bucket: Bucket, proxy: CountingProxy
) -> None:
    files = _model(bucket)
    setup = Setup(tmp_path, shared_dir, bucket, proxy)
    engine.run(
        "modelfs",
        *setup.run_args(
            "--device",
            "/dev/fuse",
            "--cap-add",
            "SYS_ADMIN",
            "--security-opt",
            "apparmor=unconfined",
        ),
    )
    _wait_mounted(engine, "modelfs", setup.host_mountpoint)
    for name, data in files.items():
        assert (setup.host_mountpoint / name).read_bytes() == data, name
    assert proxy.object_bytes() == sum(len(v) for v in files.values())
    _stop(engine, "modelfs", setup.host_mountpoint)


def test_image_size_is_reported(engine: Engine) -> None:
    size = int(engine.call("image", "inspect", "--format", "{{.Size}}", IMAGE).strip())
    # A sanity bound, not a target: python, fuse3, the wheels.
    assert 50 << 20 < size < 1 << 30
    _report("image_mib", round(size / (1 << 20)))
