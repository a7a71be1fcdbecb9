"""Vocab-parallel log-probs / entropy under TP=2 against a gathered log_softmax, megatron's
vocab_parallel_cross_entropy and TP=1, values and gradients; then through a tiny GPTModel."""

import pytest
from launch import run_dist

pytestmark = [pytest.mark.dist]


def shards_worker():
    """World 2 = TP 2. Every rank draws the same full logits and keeps its vocabulary shard."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from atpo_megatron.actor.logprobs import gathered_log_softmax, vocab_parallel_logprobs_entropy
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed

    init_distributed(tp=2)
    rank, V_local = ps.get_tensor_model_parallel_rank(), 64
    out = {}
    for vocab_size, temperature in ((128, 1.0), (100, 1.0), (100, 0.6)):  # 100: 28 padded columns on rank 1
        g = torch.Generator().manual_seed(vocab_size)
        full = (3 * torch.randn(5, 3, 2 * V_local, generator=g)).double()  # [s, b, V]
        full[..., vocab_size:] = 0.0  # megatron's padded rows are zero: their logit is 0, not -inf
        targets = torch.randint(0, vocab_size, (5, 3), generator=g)
        w_lp, w_h = torch.randn(5, 3, generator=g).double(), torch.randn(5, 3, generator=g).double()
        shard = full[..., rank * V_local : (rank + 1) * V_local].float().clone().requires_grad_(True)
        logp, ent = vocab_parallel_logprobs_entropy(
            shard, targets, vocab_size=vocab_size, temperature=temperature, entropy_grad=True, chunk_rows=4
        )
        (logp.double() * w_lp + ent.double() * w_h).sum().backward()
        # TP=1 reference: float64 log_softmax over the real vocabulary of the full logits
        ref_full = full.clone().requires_grad_(True)
        ls = torch.log_softmax(ref_full[..., :vocab_size] / temperature, dim=-1)
        ref_lp = ls.gather(-1, targets[..., None]).squeeze(-1)
        ref_h = -(ls.exp() * ls).sum(-1)
        (ref_lp * w_lp + ref_h * w_h).sum().backward()
        ref_grad = ref_full.grad[..., rank * V_local : (rank + 1) * V_local]
        gathered = gathered_log_softmax(shard / temperature, vocab_size=vocab_size).gather(-1, targets[..., None]).squeeze(-1)
        key = f"V{vocab_size}_T{temperature}"
        out[key] = {
            "logp": (logp.double() - ref_lp).abs().max().item(),
            "entropy": (ent.double() - ref_h).abs().max().item(),
            "gathered": (logp - gathered).abs().max().item(),
            "grad": (shard.grad.double() - ref_grad).abs().max().item(),
            "grad_scale": ref_grad.abs().max().item(),
            "pad_grad": shard.grad[..., max(0, vocab_size - rank * V_local):].abs().max().item()
            if vocab_size < (rank + 1) * V_local else 0.0,
        }
    # megatron's own op (on a clone: it overwrites its input), unpadded, no temperature; log-prob only
    g = torch.Generator().manual_seed(0)
    full = 3 * torch.randn(4, 2, 2 * V_local, generator=g)
    targets = torch.randint(0, 2 * V_local, (4, 2), generator=g)
    shard = full[..., rank * V_local : (rank + 1) * V_local].clone().requires_grad_(True)
    logp, _ = vocab_parallel_logprobs_entropy(shard, targets)
    logp.sum().backward()
    mine_grad = shard.grad.clone()
    shard.grad = None
    nll = tensor_parallel.vocab_parallel_cross_entropy(shard.clone(), targets)
    (-nll).sum().backward()
    out["megatron"] = {"logp": (logp + nll).abs().max().item(), "grad": (mine_grad - shard.grad).abs().max().item()}
    # entropy is detached by default
    logp, ent = vocab_parallel_logprobs_entropy(shard, targets)
    out["entropy_detached"] = not ent.requires_grad and logp.requires_grad
    destroy_distributed()
    return out


def test_vocab_parallel_logprobs_entropy_tp2():
    results = run_dist(__file__, "shards_worker", nproc=2, timeout=240)
    for rank, res in enumerate(results):
        assert res["entropy_detached"]
        assert res["megatron"]["logp"] <= 1e-5 and res["megatron"]["grad"] <= 1e-6, (rank, res["megatron"])
        for key in ("V128_T1.0", "V100_T1.0", "V100_T0.6"):
            r = res[key]
            assert r["logp"] <= 1e-5 and r["entropy"] <= 1e-5 and r["gathered"] <= 1e-5, (rank, key, r)
            assert r["grad"] <= 1e-6 * max(1.0, r["grad_scale"]), (rank, key, r)
            assert r["pad_grad"] == 0.0, (rank, key, r)


def model_worker():
    """World 2: the same tiny Llama under TP=2 (DP=1) and TP=1 (DP=2); log-probs of the response
    tokens from compute_logprobs, and the gradient of their sum w.r.t. the output layer."""
    import torch
    from megatron.core import parallel_state as ps
    from transformers import LlamaConfig

    from atpo_megatron.actor.logprobs import gathered_log_softmax
    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed
    from atpo_megatron.actor.train_step import compute_logprobs
    from atpo_megatron.config import ModelConfig, ParallelConfig

    # vocab 256: padded to 256 for TP 1 and 2 alike, so CPU initialisation draws the same weights
    hf = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=False)

    class S:
        def __init__(self, p, r):
            self.prompt_ids, self.response_ids = p, r

    g = torch.Generator().manual_seed(1)
    seqs = [S(torch.randint(0, 256, (3 + i,), generator=g).tolist(), torch.randint(0, 256, (2 + 2 * i,), generator=g).tolist())
            for i in range(5)]
    out = {}
    for tp in (2, 1):
        init_distributed(tp=tp, seed=11)
        (model,) = build_model(hf, ModelConfig(dtype="float32", spec="local", attention="sdpa"), ParallelConfig(tp=tp))
        model.eval()
        lps, ents, raw = compute_logprobs([model], seqs, max_tokens=24, temperature=0.8, with_entropy=True,
                                          with_raw=True)
        # direct: one padded batch, gathered logits, log_softmax
        s = seqs[4]
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None], None)

        def direct(temperature):
            ls = gathered_log_softmax(logits / temperature)[0, len(s.prompt_ids) - 1 :]
            return ls.gather(-1, ids[0, len(s.prompt_ids):, None]).squeeze(-1)

        out[f"tp{tp}"] = {"logp": [x.tolist() for x in lps], "entropy": [x.tolist() for x in ents],
                          "direct_diff": (lps[4] - direct(0.8)).abs().max().item(),
                          "raw_direct_diff": (raw[4] - direct(1.0)).abs().max().item(),
                          "raw_vs_tempered": (raw[4] - lps[4]).abs().max().item(),
                          "dp": ps.get_data_parallel_world_size()}
        destroy_distributed() if tp == 1 else ps.destroy_model_parallel()
    return out


def test_compute_logprobs_tp2_equals_tp1_and_direct():
    results = run_dist(__file__, "model_worker", nproc=2, timeout=240)
    import numpy as np

    assert results[0]["tp2"]["dp"] == 1 and results[0]["tp1"]["dp"] == 2
    for res in results:
        for tp in ("tp1", "tp2"):
            assert res[tp]["direct_diff"] <= 1e-5
            # with_raw: the temperature-1 log-probs of the same pass (what the engines report)
            assert res[tp]["raw_direct_diff"] <= 1e-5 and res[tp]["raw_vs_tempered"] > 1e-3
            assert [len(x) for x in res[tp]["logp"]] == [2, 4, 6, 8, 10]
        for a, b in zip(res["tp2"]["logp"] + res["tp2"]["entropy"], res["tp1"]["logp"] + res["tp1"]["entropy"]):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # every rank got every sequence's values (gathered over DP for tp1)
    assert results[0]["tp1"]["logp"] == results[1]["tp1"]["logp"]
