"""Megatron actor vs transformers on tiny random Llama / Qwen2 / Qwen3 models, over gloo.

Each torchrun launch runs several layouts in one process group (megatron's groups are rebuilt per
layout): logits parity with transformers (<= 1e-4, fp32) at TP=1, TP=2, PP=2, PP=2 x VPP=2 and
TP=2 x PP=2; SDPA vs megatron's unfused attention (<= 1e-5); bf16; HF -> Megatron -> HF bit-exact
at TP=2 x PP=2 and a saved HF checkpoint.
"""

import json

import pytest
import torch
from launch import run_dist

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=500, rms_norm_eps=1e-5, max_position_embeddings=32768)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _tiny_hf_models(root):
    """Save three random HF models (weights scaled so logits are O(1)) with reference logits."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    cases = {
        "llama": LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False, rope_theta=1e6)),
        "qwen3": Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True)),
    }
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12), generator=g)
    dirs = {}
    for seed, (arch, model) in enumerate(cases.items()):
        g.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
            logits = model.eval()(tokens).logits
        path = root / arch
        model.save_pretrained(path)
        torch.save({"tokens": tokens, "logits": logits, "inv_freq": model.model.rotary_emb.inv_freq}, path / "ref.pt")
        dirs[arch] = str(path)
    return dirs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_hf_models(tmp_path_factory.mktemp("tiny_hf"))


# ----------------------------------------------------------------------------- rank-side helpers
def forward_logits(models, tokens):
    """Forward-only through all (virtual) pipeline stages; full-vocab fp32 logits on the last
    stage (TP shards gathered), None elsewhere. Activations go stage to stage by broadcast."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp_group, pp_rank = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank()
    pp = dist.get_world_size(pp_group)
    b, s = tokens.shape
    positions = torch.arange(s).expand(b, s)
    hidden, out = None, None
    for chunk, model in enumerate(models):
        for stage in range(pp):
            if stage == pp_rank:
                model.eval().set_input_tensor(hidden)
                out = model(tokens, positions, None)
            if pp > 1 and not (chunk == len(models) - 1 and stage == pp - 1):
                config = models[0].config
                hidden = out.contiguous() if stage == pp_rank else torch.empty(
                    s, b, config.hidden_size, dtype=config.pipeline_dtype)
                dist.broadcast(hidden, group_src=stage, group=pp_group)
    if not ps.is_pipeline_last_stage():
        return None
    shards = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1).float()


def _build_and_load(hf_dir, tp, pp, vpp, **model):
    from transformers import AutoConfig

    from atpo_megatron.actor.model import build_model
    from atpo_megatron.config import ModelConfig, ParallelConfig
    from atpo_megatron.weights.hf_bridge import load_hf_weights

    models = build_model(AutoConfig.from_pretrained(hf_dir), ModelConfig(**model), ParallelConfig(tp=tp, pp=pp, vpp=vpp))
    load_hf_weights(models, hf_dir)
    return models


def _parity(hf_dir, tp, pp, vpp, ref_path=None, **model):
    """max |megatron - transformers| over real vocab columns, max |padded columns|, and the
    RoPE frequency difference; Nones off the last stage. The reference (tokens, logits, inv_freq)
    is ``ref_path`` or <hf_dir>/ref.pt."""
    from atpo_megatron.actor.model import unwrap

    ref = torch.load(ref_path or f"{hf_dir}/ref.pt")
    models = _build_and_load(hf_dir, tp, pp, vpp, **model)
    logits = forward_logits(models, ref["tokens"])
    inv_freq = unwrap(models[0]).rotary_pos_emb.inv_freq
    result = {"inv_freq_diff": (inv_freq - ref["inv_freq"]).abs().max().item(), "max_diff": None, "padded": None}
    if logits is not None:
        vocab = ref["logits"].shape[-1]
        result["max_diff"] = (logits[..., :vocab] - ref["logits"]).abs().max().item()
        result["padded"] = logits[..., vocab:].abs().sum().item()  # 0 iff every padded logit is 0
        result["padded_columns"] = logits.shape[-1] - vocab
    return result, models, logits


def _round_trip(hf_dir, models):
    """Names that differ and tensors that are not bit-equal between the export and the files."""
    from safetensors.torch import load_file

    from atpo_megatron.weights.hf_bridge import export_hf_weights

    original = load_file(f"{hf_dir}/model.safetensors")
    exported = dict(export_hf_weights(models))
    return {"name_mismatch": sorted(set(original) ^ set(exported)),
            "unequal": sorted(n for n in original.keys() & exported.keys() if not torch.equal(original[n], exported[n]))}


def layouts_worker(cases, layouts, refs=None):
    """For each (tp, pp, vpp, extras): parity for every case (arch -> HF dir; reference files
    ``refs[arch]`` or <hf_dir>/ref.pt), under the key "<arch>@<layout>"; extras per case:
    'unfused' (SDPA vs unfused logits), 'bf16', 'recompute' (TP=PP=1: gradients with full and
    selective recompute vs none), 'roundtrip' (+ save_hf_checkpoint into <hf_dir>/saved); once per
    layout: 'sdpa_module' (under the key "sdpa_module")."""
    from megatron.core import parallel_state as ps

    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.weights.hf_bridge import save_hf_checkpoint

    results = {}
    for tp, pp, vpp, extras in layouts:
        init_distributed(tp, pp, vpp, seed=0)
        for arch, hf_dir in cases.items():
            key = f"{arch}@tp{tp}pp{pp}vpp{vpp}"
            results[key], models, logits = _parity(hf_dir, tp, pp, vpp, (refs or {}).get(arch))
            if "unfused" in extras:
                _, _, unfused = _parity(hf_dir, tp, pp, vpp, attention="unfused")
                results[key]["sdpa_vs_unfused"] = None if logits is None else (logits - unfused).abs().max().item()
            if "bf16" in extras:
                results[key]["bf16"] = _parity(hf_dir, tp, pp, vpp, dtype="bfloat16")[0]
                results[key]["bf16"]["round_trip"] = _round_trip_bf16(hf_dir, tp, pp, vpp)
            if "recompute" in extras:
                results[key]["recompute_grad_diff"] = {g: _recompute_grad_diff(hf_dir, g) for g in ("full", "selective")}
            if "roundtrip" in extras:
                results[key]["round_trip"] = _round_trip(hf_dir, models)
                save_hf_checkpoint(models, f"{hf_dir}/saved", models_hf_config(models), tokenizer_dir=None,
                                   max_shard_bytes=100_000)
        if "sdpa_module" in extras:
            results["sdpa_module"] = _sdpa_module_checks()
        ps.destroy_model_parallel()
    destroy_distributed()
    return results


def _grads(hf_dir, **model):
    """Parameter gradients of mean log-sum-exp of the logits (TP = PP = 1, training mode)."""
    models = _build_and_load(hf_dir, 1, 1, 1, **model)
    tokens = torch.load(f"{hf_dir}/ref.pt")["tokens"]
    logits = models[0].train()(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    logits.float().logsumexp(-1).mean().backward()
    return {name: p.grad for name, p in models[0].named_parameters()}


def _recompute_grad_diff(hf_dir, granularity):
    base, recomputed = _grads(hf_dir), _grads(hf_dir, recompute=granularity)
    return max((base[n] - recomputed[n]).abs().max().item() for n in base)


def _sdpa_module_checks():
    """SDPAttention alone: explicit causal mask == is_causal; dropout only in training; shapes."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from atpo_megatron.actor.attention import SDPAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.5, use_cpu_initialization=True)
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = torch.randn(6, 2, 4, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)  # [s, b, heads, d]
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1).expand(2, 1, 6, 6)  # True = masked
    attention.eval()
    plain, masked = attention(q, k, v, None), attention(q, k, v, causal)
    dropped = attention.train()(q, k, v, None)
    return {"shape": list(plain.shape), "mask_vs_causal": (plain - masked).abs().max().item(),
            "train_vs_eval": (plain - dropped).abs().max().item()}


def _round_trip_bf16(hf_dir, tp, pp, vpp):
    """bf16 export == the HF fp32 weights rounded to bf16, for every tensor."""
    from safetensors.torch import load_file

    from atpo_megatron.weights.hf_bridge import export_hf_weights

    original = load_file(f"{hf_dir}/model.safetensors")
    exported = dict(export_hf_weights(_build_and_load(hf_dir, tp, pp, vpp, dtype="bfloat16")))
    return all(exported[n].dtype == torch.bfloat16 and torch.equal(exported[n], t.bfloat16())
               for n, t in original.items()) and exported.keys() == original.keys()


def models_hf_config(models):
    from atpo_megatron.actor.model import unwrap

    return unwrap(models[0]).hf_config


# ----------------------------------------------------------------------------------------- tests
def _check_parity(ranks):
    """Every rank's RoPE frequencies equal HF's; every (case, layout) has last-stage logits within
    1e-4 of transformers, and its padded vocabulary columns are exactly 0."""
    for key in (k for k in ranks[0] if "@" in k):
        assert all(rank[key]["inv_freq_diff"] == 0.0 for rank in ranks), key  # incl. Llama-3 scaling
        last_stage = [rank[key] for rank in ranks if rank[key]["max_diff"] is not None]
        assert last_stage, f"{key}: no rank reported logits"
        for r in last_stage:
            assert r["max_diff"] <= 1e-4 and r["padded"] == 0.0 and r["padded_columns"] == 12, (key, r)


def test_tp1_parity_sdpa_vs_unfused_bf16_recompute(tiny):
    [results] = run_dist(__file__, "layouts_worker", nproc=1,
                         kwargs={"cases": tiny, "layouts": [(1, 1, 1, ["unfused", "bf16", "recompute", "sdpa_module"])]})
    print(json.dumps(results, indent=1))
    _check_parity([results])
    module = results.pop("sdpa_module")
    assert module["shape"] == [6, 2, 32] and module["mask_vs_causal"] <= 1e-6 and module["train_vs_eval"] > 0.1
    for r in results.values():
        assert r["sdpa_vs_unfused"] <= 1e-5
        assert r["recompute_grad_diff"] == {"full": 0.0, "selective": 0.0}
        assert r["bf16"]["max_diff"] <= 0.1  # bf16 weights and activations vs the fp32 reference
        assert r["bf16"]["round_trip"]


def test_tp2_and_pp2_parity(tiny):
    results = run_dist(__file__, "layouts_worker", nproc=2,
                       kwargs={"cases": tiny, "layouts": [(2, 1, 1, ["unfused"]), (1, 2, 1, []), (1, 2, 2, [])]})
    print(json.dumps(results, indent=1))
    _check_parity(results)
    for key in results[0]:
        if key.endswith("tp2pp1vpp1"):  # TP-local heads: each rank attends over its 2 of 4 heads
            assert all(rank[key]["sdpa_vs_unfused"] <= 1e-5 for rank in results)
    for layout in ("tp1pp2vpp1", "tp1pp2vpp2"):  # only the last stage reports logits
        assert [rank[f"llama@{layout}"]["max_diff"] is None for rank in results] == [True, False]


def test_tp2_pp2_parity_round_trip_and_saved_checkpoint(tiny):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    results = run_dist(__file__, "layouts_worker", nproc=4,
                       kwargs={"cases": tiny, "layouts": [(2, 2, 1, ["roundtrip"])]})
    print(json.dumps(results, indent=1))
    _check_parity(results)
    for rank in results:
        for key, r in rank.items():
            assert r["round_trip"] == {"name_mismatch": [], "unequal": []}, key
    for arch, hf_dir in tiny.items():
        saved = f"{hf_dir}/saved"
        index = json.load(open(f"{saved}/model.safetensors.index.json"))  # 100 kB shards: several files
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1
        reloaded = {k: v for f in files for k, v in load_file(f"{saved}/{f}").items()}
        original = load_file(f"{hf_dir}/model.safetensors")
        assert reloaded.keys() == original.keys()
        assert all(torch.equal(reloaded[n], original[n]) for n in original)
        config = {k: v for k, v in AutoConfig.from_pretrained(saved).to_dict().items() if k != "_name_or_path"}
        assert config == {k: v for k, v in AutoConfig.from_pretrained(hf_dir).to_dict().items() if k != "_name_or_path"}
