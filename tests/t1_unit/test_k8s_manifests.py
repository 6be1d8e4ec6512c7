"""Unit tier: the Kubernetes manifests in docs/deploy/k8s follow the
conventions docs/deploy.md describes, and pass modelfs options it accepts.

No cluster runs here, so this checks structure: propagation modes, the
privileged mounter, the cache on a hostPath, and every MODELFS_OPTIONS value
parsed by the same code the container's entrypoint hands it to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from modelfs.cli import build_parser, normalize_argv

K8S = Path(__file__).resolve().parents[2] / "docs/deploy/k8s"


def _load(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all((K8S / name).read_text()))
    assert len(docs) == 1
    return dict(docs[0])


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["spec"]["template"]["spec"] if "template" in doc["spec"] else doc["spec"])


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _check_modelfs_container(c: dict[str, Any], spec: dict[str, Any]) -> None:
    assert c["securityContext"]["privileged"] is True
    env = _env(c)
    argv = normalize_argv(
        [env["MODELFS_SOURCE"], env["MODELFS_MOUNTPOINT"], "-o", env["MODELFS_OPTIONS"]]
    )
    args = build_parser().parse_args(argv)
    assert str(args.cache_dir) == "/var/cache/modelfs"
    # The cache volume is a hostPath, so it outlives the pod.
    cache = _mounts(c)["cache"]
    assert cache["mountPath"] == "/var/cache/modelfs"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["cache"]["hostPath"]["path"] == "/var/cache/modelfs"
    # The credentials are a file from a Secret, never an env var or argument.
    assert str(args.credentials_file).startswith(_mounts(c)["credentials"]["mountPath"])
    assert not any("SECRET" in name for name in env)
    models = _mounts(c)["models"]
    assert models["mountPropagation"] == "Bidirectional"
    assert env["MODELFS_MOUNTPOINT"].startswith(models["mountPath"] + "/")


def test_daemonset_mounts_on_the_node_with_bidirectional_propagation() -> None:
    doc = _load("daemonset.yaml")
    assert doc["kind"] == "DaemonSet"
    spec = _pod_spec(doc)
    (c,) = spec["containers"]
    _check_modelfs_container(c, spec)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["hostPath"]["path"] == "/mnt/models"


def test_vllm_deployment_reads_with_host_to_container() -> None:
    doc = _load("vllm-deployment.yaml")
    assert doc["kind"] == "Deployment"
    spec = _pod_spec(doc)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["hostPath"]["path"] == "/mnt/models"
    for c in spec["containers"] + spec.get("initContainers", []):
        m = _mounts(c)["models"]
        assert m["mountPropagation"] == "HostToContainer" and m["readOnly"] is True
        assert "privileged" not in str(c.get("securityContext", {}))
    (vllm,) = spec["containers"]
    model = vllm["args"][vllm["args"].index("--model") + 1]
    assert model.startswith(_mounts(vllm)["models"]["mountPath"] + "/")
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in vllm["env"]
    # vLLM starts once the model is in the node's cache: checked, else warmed.
    (warm,) = spec["initContainers"]
    script = " ".join(warm["command"])
    assert f"modelfs warm --check {model}" in script and f"modelfs warm {model}" in script


def test_memory_limits_fit_the_measured_rss() -> None:
    """docs/benchmarks.md: 188-269 MiB peak with the default --memory-cache."""
    for name in ("daemonset.yaml", "sidecar.yaml"):
        spec = _pod_spec(_load(name))
        c = next(
            c
            for c in spec["containers"] + spec.get("initContainers", [])
            if "MODELFS_SOURCE" in str(c)
        )
        limit = c["resources"]["limits"]["memory"]
        assert limit.endswith("Mi") and 256 <= int(limit[:-2]) <= 1024


def test_sidecar_pod_shares_the_mount_through_an_emptydir() -> None:
    doc = _load("sidecar.yaml")
    spec = _pod_spec(doc)
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before vLLM
    assert "startupProbe" in sidecar
    _check_modelfs_container(sidecar, spec)
    assert "modelfs warm --check" in str(sidecar["readinessProbe"])
    (vllm,) = spec["containers"]
    assert _mounts(vllm)["models"]["mountPropagation"] == "HostToContainer"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in vllm["env"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["models"]


def test_secret_is_a_credentials_file_with_the_profile_the_pods_use() -> None:
    doc = _load("secret.yaml")
    assert doc["kind"] == "Secret"
    text = doc["stringData"]["credentials"]
    assert text.startswith("[models]")
    for name in ("daemonset.yaml", "sidecar.yaml"):
        assert "profile=models" in (K8S / name).read_text()
