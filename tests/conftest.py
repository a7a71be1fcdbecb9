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

    from atpo_megatron.model_files import resolve_model

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


def build_searching_llama(out_dir: Path, hidden: int = 64) -> Path:
    """A tiny Llama (SmolLM2's tokenizer) that is a hand-set bigram model writing tool calls.

    Attention and MLP outputs are zero (o_proj, down_proj), so the logits depend on the current token
    only: ``logits = lm_head @ rmsnorm(embedding[token])``. Each token class has its own embedding
    direction and lm_head column, giving the transitions (probabilities at temperature 1)

        any other token -> "<";  "<" -> "search";  "search" -> ">";  ">" -> "<" .5, " q" .3, EOS .2;
        " q" -> " q" .4, "</" .6;  "</" -> "search"

    so it writes ``<search> q q</search>`` turns, and after each tool result (which ends in ">")
    searches again or stops: real tool calls, results, notices and EOS with a random-size model.
    The weights are untied (the embedding and lm_head play different roles).
    """
    import math

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from atpo_megatron.model_files import resolve_model

    smol = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(smol)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    ids = {text: tokenizer.encode(text, add_special_tokens=False) for text in ("<", "search", ">", " q", "</")}
    assert all(len(v) == 1 for v in ids.values()), ids
    tok = {text: v[0] for text, v in ids.items()}
    classes = ["other", "<", "search", ">", " q", "</"]  # embedding direction k+1 (direction 0: none)
    transitions = {
        "other": {"<": 1.0}, "<": {"search": 1.0}, "search": {">": 1.0},
        ">": {"<": 0.5, " q": 0.3, "EOS": 0.2}, " q": {" q": 0.4, "</": 0.6}, "</": {"search": 1.0},
    }
    tok["EOS"] = tokenizer.eos_token_id
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, 1] = 1.0  # "other" for every token, then the known ones
        for k, name in enumerate(classes[1:], start=2):
            embed[tok[name]] = 0.0
            embed[tok[name], k] = 1.0
        head = model.lm_head.weight
        head.zero_()
        scale = math.sqrt(hidden)  # rmsnorm of a one-hot vector is sqrt(hidden) times it
        for k, name in enumerate(classes, start=1):
            for nxt, p in transitions[name].items():
                head[tok[nxt], k] = (30.0 + math.log(p)) / scale  # 30 nats above the other tokens
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if (smol / "generation_config.json").is_file():
        shutil.copy(smol / "generation_config.json", out_dir / "generation_config.json")
    return out_dir


@pytest.fixture(scope="session")
def searching_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama that writes search calls (see ``build_searching_llama``)."""
    return build_searching_llama(tmp_path_factory.mktemp("searching_llama"))


@pytest.fixture(scope="session")
def searching_vllm_llama_dir(tmp_path_factory) -> Path:
    """The same bigram tool-caller with head_dim 64, which vLLM's CPU attention accepts."""
    return build_searching_llama(tmp_path_factory.mktemp("searching_vllm_llama"), hidden=256)


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
    # what the tests were written for, where the embedded job's tuning differs (fp32: exact parities)
    "model.dtype=float32", "optimizer.min_lr=1e-6", "retriever.topk=3", "logging.eval_before_train=false",
]


@pytest.fixture
def tiny_run() -> list[str]:
    """``key=value`` overrides for a seconds-per-step `atpo train` with the tiny model."""
    return list(TINY_RUN)
