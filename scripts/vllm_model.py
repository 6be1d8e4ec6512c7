"""A small Llama for vLLM to serve in tests and benchmarks, made here.

Random bf16 weights (seeded, so every run makes the same bytes), sharded
into `*.safetensors` with a `model.safetensors.index.json`, and a byte-level
BPE tokenizer trained on a few sentences, so that nothing comes from a hub.
Runs in the vLLM venv (scripts/vllm-venv.sh), which has torch, transformers
and tokenizers.

usage: python scripts/vllm_model.py OUT [--hidden N] [--layers N] [--shards N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEXT = [
    "modelfs presents an S3 bucket as a local read-only directory.",
    "A chunk that has not changed is never downloaded twice.",
    "The quick brown fox jumps over the lazy dog.",
    "Model servers read weights through the mount as if they were local.",
] * 50


def make_tokenizer(out: Path, vocab: int) -> int:
    """Saves the tokenizer; returns its real vocabulary size, which a small
    corpus keeps below `vocab` (ids past it would decode to nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    return len(fast)


def make_model(out: Path, hidden: int, layers: int, shards: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Bigger than init's std so that greedy decoding does not settle on one token.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, max_shard_size=f"{total // shards // 1000 + 1}KB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(a.out, a.vocab)
    make_model(a.out, a.hidden, a.layers, a.shards, vocab)
    files = sorted(f.name for f in a.out.iterdir())
    size = sum(f.stat().st_size for f in a.out.iterdir())
    print(json.dumps({"files": files, "bytes": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
