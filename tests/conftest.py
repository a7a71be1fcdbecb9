"""Shared fixtures: small models we build (nothing is downloaded), CPU-friendly settings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per vLLM engine (its default sizes it from free memory)


def build_tiny_llama(out_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     seed: int = 0) -> Path:
    """A randomly initialised Llama with the real SmolLM2 tokenizer (vocab 49152), saved as an HF folder.

    Shapes are chosen so TP=2 divides heads and KV heads; the tokenizer and chat template are the
    bundled SmolLM2's, so prompts, stop strings and tool results tokenise exactly as in a real run.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from atpo_megatron.hub import resolve_model

    smol = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(smol)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    for extra in ("generation_config.json",):
        if (smol / extra).is_file():
            shutil.copy(smol / extra, out_dir / extra)
    return out_dir


@pytest.fixture(scope="session")
def tiny_vllm_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama vLLM's CPU attention accepts (head_dim 64: hidden 128, 2 heads, 2 KV heads)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_vllm_llama"), hidden=128, heads=2, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, 4 heads / 2 KV heads) with SmolLM2's tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


# Overrides that shrink the embedded job to seconds per step with the tiny model (tests only).
TINY_RUN = [
    "rollout.max_turns=3", "rollout.tool_call_limit=2", "rollout.max_prompt_tokens=1024",
    "rollout.max_response_tokens=48", "rollout.max_turn_tokens=24",
    "tree.initial_chains=2", "tree.expansion_iterations=1", "tree.top_k=1", "tree.leaves_per_tree=3",
    "train.batch_prompts=2", "train.mini_batch_prompts=1", "train.micro_batch_tokens=2048",
    "optimizer.lr=1e-4", "logging.eval_every=2", "data.eval_limit=2", "checkpoint.save_every=0",
]


@pytest.fixture
def tiny_run() -> list[str]:
    """``key=value`` overrides for a seconds-per-step `atpo train` with the tiny model."""
    return list(TINY_RUN)
