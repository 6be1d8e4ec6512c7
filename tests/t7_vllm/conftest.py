"""vLLM tier: vLLM itself (the CPU build) serving a model from a mount.

`make test-vllm` builds the vLLM venv (scripts/vllm-venv.sh) and runs this
tier; `make test` leaves it out. Without that venv it skips, unless
MODELFS_REQUIRE_VLLM=1 (set by `make test-vllm`) makes that a failure.

vLLM runs in its own venv, as a subprocess; the servers, the proxy and the
mounts are the shared fixtures of tests/conftest.py.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("MODELFS_VLLM_PYTHON", REPO / ".venv-vllm/bin/python"))
RESULT = "VLLM_RUN_RESULT "


# vLLM leaves its ZMQ sockets (a few per run, named by UUID) in the temp
# directory: its processes get one of their own, removed after the tier.
_VLLM_TMP = Path(tempfile.mkdtemp(prefix="modelfs-vllm-tmp-"))
atexit.register(shutil.rmtree, _VLLM_TMP, ignore_errors=True)


def vllm_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", TMPDIR=str(_VLLM_TMP), **extra)
    return env


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        why = f"no vLLM venv at {VLLM_PYTHON}"
        if os.environ.get("MODELFS_REQUIRE_VLLM") == "1":
            pytest.fail(f"{why} (MODELFS_REQUIRE_VLLM=1)")
        pytest.skip(f"{why}; `make test-vllm` builds it")
    return VLLM_PYTHON


@dataclass
class Model:
    path: Path
    files: dict[str, int]  # name -> size

    @property
    def weights(self) -> dict[str, int]:
        return {n: s for n, s in self.files.items() if n.endswith(".safetensors")}


@pytest.fixture(scope="session")
def llama(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Model:
    out = tmp_path_factory.mktemp("llama")
    proc = subprocess.run(
        [str(vllm_python), str(REPO / "scripts/vllm_model.py"), str(out), "--hidden", "1024"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Model(out, {f.name: f.stat().st_size for f in out.iterdir()})


@dataclass
class Run:
    ready_s: float
    weights_s: float | None
    token_ids: list[list[int]]


def run_vllm(vllm_python: Path, model: Path, *args: str, in_process: bool = True) -> Run:
    """One `LLM()` start and greedy generation (scripts/vllm_run.py).
    In-process (no engine subprocess) by default: the same load path,
    15 s less start-up on two cores."""
    extra = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else {}
    proc = subprocess.run(
        [str(vllm_python), str(REPO / "scripts/vllm_run.py"), str(model), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=vllm_env(**extra),
    )
    out = proc.stdout + proc.stderr
    found = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
    assert proc.returncode == 0 and found, out[-4000:]
    doc = json.loads(found[-1][len(RESULT) :])
    m = re.search(r"Loading weights took ([0-9.]+) seconds", out)
    return Run(doc["ready_s"], float(m.group(1)) if m else None, doc["token_ids"])
