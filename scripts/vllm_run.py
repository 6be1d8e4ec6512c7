"""One vLLM start on a model directory, and its greedy output, as JSON.

Runs in the vLLM venv (scripts/vllm-venv.sh). Builds `LLM()` (timed: the
whole construction), then generates greedily from fixed token-id prompts
and prints one line

    VLLM_RUN_RESULT {"ready_s": ..., "ready_at": ..., "token_ids": [[...], ...]}

(`ready_at` is CLOCK_MONOTONIC, which a parent can compare with its own)
among vLLM's own output (whose "Loading weights took N seconds", logged by
its worker process, callers read too). `--load-format runai_streamer` with an s3://
model reads the bucket through vLLM's own streaming loader instead.

usage: python scripts/vllm_run.py MODEL [--load-format F] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The line callers look for in the output, among vLLM's own.
RESULT = "VLLM_RUN_RESULT "
PROMPTS = [[1, 17, 42, 99, 7], [1, 300, 5, 5, 250, 11, 64]]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--tokenizer", help="a local tokenizer dir (for an s3:// model)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    start = time.monotonic()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=a.model,
        tokenizer=a.tokenizer,
        load_format=a.load_format,
        dtype="bfloat16",
        max_model_len=256,
        enforce_eager=True,
        seed=0,
    )
    ready_at = time.monotonic()
    ready = ready_at - start
    params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS], params)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    print(
        RESULT + json.dumps({"ready_s": round(ready, 3), "ready_at": ready_at, "token_ids": ids}),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
