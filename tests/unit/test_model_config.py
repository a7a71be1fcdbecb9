"""actor.model: HF config -> TransformerConfig, layer spec choice, and the errors (single process)."""

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from atpo_megatron.actor.attention import SDPAttention
from atpo_megatron.actor.model import (
    layer_spec,
    padded_vocab_size,
    transformer_config_from_hf,
    transformer_engine_import_error,
)
from atpo_megatron.config import ConfigError, ModelConfig, ParallelConfig

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=500, rms_norm_eps=1e-5)
no_te = pytest.mark.skipif(transformer_engine_import_error() is None, reason="Transformer Engine imports here")


def config(hf, **model):
    return transformer_config_from_hf(hf, ModelConfig(**model), ParallelConfig(tp=2))


def test_llama_fields():
    c = config(LlamaConfig(**TINY, initializer_range=0.05))
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (4, 64, 96)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 2, 16)
    assert (c.normalization, c.layernorm_epsilon, c.gated_linear_unit) == ("RMSNorm", 1e-5, True)
    assert c.activation_func is torch.nn.functional.silu
    assert (c.add_bias_linear, c.add_qkv_bias, c.qk_layernorm) == (False, False, False)
    assert (c.hidden_dropout, c.attention_dropout, c.init_method_std) == (0.0, 0.0, 0.05)
    assert (c.tensor_model_parallel_size, c.params_dtype, c.bf16, c.fp8) == (2, torch.float32, False, None)
    assert c.recompute_granularity is None


def test_qwen2_bias_qwen3_qk_norm_and_head_dim():
    assert config(Qwen2Config(**TINY)).add_qkv_bias
    c = config(Qwen3Config(**TINY, head_dim=32))
    assert (c.qk_layernorm, c.add_qkv_bias, c.kv_channels) == (True, False, 32)


def test_bf16_and_recompute():
    c = config(LlamaConfig(**TINY), dtype="bfloat16", recompute="full")
    assert (c.bf16, c.params_dtype, c.pipeline_dtype) == (True, torch.bfloat16, torch.bfloat16)
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == ("full", "uniform", 1)
    c = config(LlamaConfig(**TINY), recompute="selective")
    assert (c.recompute_granularity, c.recompute_modules) == ("selective", ["core_attn"])


def test_padded_vocab():
    assert [padded_vocab_size(500, 1), padded_vocab_size(300, 1), padded_vocab_size(300, 2)] == [512, 384, 512]
    assert padded_vocab_size(49152, 2) == 49152 and padded_vocab_size(49153, 4) == 49664


def test_unsupported_architecture_names_it_and_the_supported_ones():
    with pytest.raises(ConfigError, match=r"unsupported architecture GPT2LMHeadModel \(model_type 'gpt2'\)"
                                          r".*LlamaForCausalLM \(llama\), Qwen2ForCausalLM \(qwen2\), "
                                          r"Qwen3ForCausalLM \(qwen3\)"):
        config(GPT2Config(architectures=["GPT2LMHeadModel"]))


@pytest.mark.parametrize("field, value, tp, message", [
    ("num_attention_heads", 2, 4, "num_attention_heads=2"),
    ("num_key_value_heads", 2, 4, "num_key_value_heads=2"),
    ("intermediate_size", 90, 4, "intermediate_size=90"),
])
def test_tp_must_divide_heads_kv_heads_and_mlp(field, value, tp, message):
    hf = LlamaConfig(**{**TINY, "num_attention_heads": 8, "num_key_value_heads": 4, field: value})
    with pytest.raises(ConfigError, match=f"parallel.tp={tp} does not divide the model's {message}"):
        transformer_config_from_hf(hf, ModelConfig(), ParallelConfig(tp=tp))


def test_layers_must_split_over_pp_times_vpp():
    with pytest.raises(ConfigError, match=r"2\*3 = 6 does not divide num_hidden_layers=4"):
        transformer_config_from_hf(LlamaConfig(**TINY), ModelConfig(), ParallelConfig(pp=2, vpp=3))


@pytest.mark.parametrize("hf_kwargs, message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "low_freq_factor=2.0"),
])
def test_unreproducible_hf_options_are_refused(hf_kwargs, message):
    with pytest.raises(ConfigError, match=message):
        config(LlamaConfig(**TINY, **hf_kwargs))


@no_te
def test_te_spec_or_fp8_without_transformer_engine_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.spec=te but Transformer Engine does not import"):
        config(LlamaConfig(**TINY), spec="te")
    with pytest.raises(ConfigError, match="model.fp8=e4m3 needs Transformer Engine layers"):
        config(LlamaConfig(**TINY), fp8="e4m3")  # spec auto falls back to local: FP8 impossible
    with pytest.raises(ConfigError, match="but model.spec=local"):
        config(LlamaConfig(**TINY), spec="local", fp8="hybrid")


@no_te
def test_local_spec_core_attention_choice():
    def core(**model):
        return layer_spec(ModelConfig(**model), qk_layernorm=True).submodules.self_attention.submodules

    from megatron.core.transformer.dot_product_attention import DotProductAttention

    assert core(attention="sdpa").core_attention is SDPAttention
    assert core(attention="unfused").core_attention is DotProductAttention
    assert core().q_layernorm is not None and core().k_layernorm is not None
