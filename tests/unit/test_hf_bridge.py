"""weights.hf_bridge pure conversion: HF tensors -> megatron TP shards -> HF tensors (no processes)."""

import pytest
import torch

from atpo_megatron.weights.hf_bridge import Layout, hf_names_of, hf_to_megatron, megatron_to_hf

# 4 query heads in 2 KV groups, head_dim 3, hidden 8, ffn 6, vocab 5 padded to 256 at TP=2.
LAYOUT = Layout(num_heads=4, num_kv_heads=2, head_dim=3, vocab_size=5, padded_vocab_size=256, tp=2, tied=False)


class DictReader:
    def __init__(self, tensors):
        self.tensors = tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, index=()):
        return self.tensors[name][index].clone()


@pytest.fixture
def hf():
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (5, 8), "lm_head.weight": (5, 8), "model.norm.weight": (8,),
              "model.layers.1.input_layernorm.weight": (8,), "model.layers.1.post_attention_layernorm.weight": (8,),
              "model.layers.1.self_attn.q_proj.weight": (12, 8), "model.layers.1.self_attn.q_proj.bias": (12,),
              "model.layers.1.self_attn.k_proj.weight": (6, 8), "model.layers.1.self_attn.k_proj.bias": (6,),
              "model.layers.1.self_attn.v_proj.weight": (6, 8), "model.layers.1.self_attn.v_proj.bias": (6,),
              "model.layers.1.self_attn.o_proj.weight": (8, 12), "model.layers.1.self_attn.q_norm.weight": (3,),
              "model.layers.1.mlp.gate_proj.weight": (6, 8), "model.layers.1.mlp.up_proj.weight": (6, 8),
              "model.layers.1.mlp.down_proj.weight": (8, 6)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


MEGATRON_NAMES = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight",
                  "decoder.layers.1.input_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.weight",
                  "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
                  "decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
                  "decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.self_attention.linear_qkv.bias",
                  "decoder.layers.1.self_attention.q_layernorm.weight",
                  "decoder.layers.1.self_attention.linear_proj.weight", "decoder.layers.1.mlp.linear_fc1.weight",
                  "decoder.layers.1.mlp.linear_fc2.weight"]


@pytest.mark.parametrize("name", MEGATRON_NAMES)
def test_round_trip_over_tp2_is_exact(hf, name):
    reader = DictReader(hf)
    shards = [hf_to_megatron(name, reader, LAYOUT, rank) for rank in range(2)]
    back = megatron_to_hf(name, shards, LAYOUT)
    assert [n for n, _ in back] == list(hf_names_of(name, LAYOUT)[0])
    for hf_name, tensor in back:
        assert torch.equal(tensor, hf[hf_name]), hf_name


def test_qkv_rows_are_grouped_per_kv_group(hf):
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    rank1 = hf_to_megatron("decoder.layers.1.self_attention.linear_qkv.weight", DictReader(hf), LAYOUT, 1)
    # rank 1 holds KV group 1: its 2 query heads (rows 6..11 of q), then k and v rows 3..5
    assert torch.equal(rank1, torch.cat([q[6:12], k[3:6], v[3:6]]))


def test_fc1_is_gate_then_up_per_rank(hf):
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    rank0 = hf_to_megatron("decoder.layers.1.mlp.linear_fc1.weight", DictReader(hf), LAYOUT, 0)
    assert torch.equal(rank0, torch.cat([gate[:3], up[:3]]))


def test_vocab_is_split_on_the_padded_vocabulary_with_zero_rows(hf):
    reader = DictReader(hf)
    rank0, rank1 = (hf_to_megatron("embedding.word_embeddings.weight", reader, LAYOUT, r) for r in (0, 1))
    assert rank0.shape == rank1.shape == (128, 8)
    assert torch.equal(rank0[:5], hf["model.embed_tokens.weight"]) and not rank0[5:].any() and not rank1.any()


def test_tied_output_layer_reads_the_embedding_and_exports_nothing(hf):
    tied = Layout(**{**LAYOUT.__dict__, "tied": True})
    shard = hf_to_megatron("output_layer.weight", DictReader(hf), tied, 0)
    assert torch.equal(shard[:5], hf["model.embed_tokens.weight"])
    assert megatron_to_hf("output_layer.weight", [shard, shard], tied) == []


def test_vocab_rows_must_match_the_config(hf):
    wrong = Layout(**{**LAYOUT.__dict__, "vocab_size": 6})
    with pytest.raises(ValueError, match="has 5 rows but the model config's vocab_size is 6"):
        hf_to_megatron("embedding.word_embeddings.weight", DictReader(hf), wrong, 0)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="Unknown parameter name: decoder.layers.0.mlp.router.weight"):
        hf_names_of("decoder.layers.0.mlp.router.weight", LAYOUT)
