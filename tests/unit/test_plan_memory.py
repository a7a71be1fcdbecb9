"""The plan's memory model against what the real actor keeps, and against hand-computed numbers.

The activation count is checked byte for byte: a real megatron build (world size 1, CPU) runs a
forward with saved-tensor hooks, and every tensor autograd keeps for the backward is attributed to
the transformer layer that saved it.
"""

from __future__ import annotations

import collections

import pytest
import torch
import transformers

from atpo_megatron.plan import memory as M
from atpo_megatron.plan.shapes import GPUS, GiB, Layout, ModelShape

SEQ, ROWS = 96, 2


def _hf(family: str, **kw):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, head_dim=16)
    return cls(**{**base, **kw})


@pytest.fixture(scope="module")
def world():
    from atpo_megatron.actor.parallel import destroy_distributed, init_distributed

    init_distributed(1, 1, 1, seed=1)
    yield
    destroy_distributed()


def _saved_bytes_per_layer(hf, dtype: str, attention: str, recompute: str) -> list[int]:
    """Bytes of the distinct storages each decoder layer saves for the backward (parameters excluded)."""
    from atpo_megatron.actor.model import build_model, unwrap
    from atpo_megatron.config import ModelConfig, ParallelConfig

    model = build_model(hf, ModelConfig(dtype=dtype, spec="local", attention=attention, recompute=recompute),
                        ParallelConfig())[0]
    model.train()
    gpt = unwrap(model)
    current = [None]
    saved: dict = collections.defaultdict(dict)
    for i, layer in enumerate(gpt.decoder.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__(0, i))
    gpt.decoder.final_layernorm.register_forward_pre_hook(lambda mod, args: current.__setitem__(0, None))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in params:
            saved[current[0]][storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, hf.vocab_size, (ROWS, SEQ))
    positions = torch.arange(SEQ).expand(ROWS, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, None, **({"fp32_output": False} if dtype == "bfloat16" else {}))
    # RoPE's frequencies under full recompute are one tensor handed to every layer: count it once
    shared = set(saved[0]) & set(saved[1])
    return [sum(n for p, n in saved[i].items() if i == 0 or p not in shared) for i in range(len(saved))]


@pytest.mark.parametrize("family,dtype,attention,recompute", [
    ("llama", "bfloat16", "sdpa", "none"),
    ("llama", "float32", "sdpa", "none"),
    ("llama", "bfloat16", "unfused", "none"),
    ("llama", "bfloat16", "unfused", "selective"),
    ("llama", "bfloat16", "sdpa", "selective"),
    ("qwen2", "bfloat16", "sdpa", "none"),
    ("qwen3", "bfloat16", "sdpa", "none"),
    ("qwen3", "bfloat16", "unfused", "none"),
    ("llama", "float32", "unfused", "none"),
])
def test_layer_activation_bytes_equal_what_autograd_keeps(world, family, dtype, attention, recompute):
    hf = _hf(family)
    got = _saved_bytes_per_layer(hf, dtype, attention, recompute)
    want = M.layer_activation_bytes(ModelShape.from_hf(hf), ROWS * SEQ, SEQ, 1, M.dtype_bytes(dtype),
                                    attention, recompute)
    # selective recompute also keeps the checkpoint's 4-byte RNG flag per layer
    slack = 4 if recompute == "selective" else 0
    assert got == [want + slack] * 2, (got, want)


def test_full_recompute_keeps_each_layers_input(world):
    hf = _hf("llama")
    got = _saved_bytes_per_layer(hf, "bfloat16", "sdpa", "full")
    s = ModelShape.from_hf(hf)
    layer_input = M.layer_activation_bytes(s, ROWS * SEQ, SEQ, 1, 2, "sdpa", "full")
    assert layer_input == 2 * ROWS * SEQ * 64
    freqs = 4 * SEQ * 16  # RoPE's fp32 frequencies, shared by all layers (counted with layer 0)
    assert got == [layer_input + freqs, layer_input]


def test_layer_activation_formula_by_hand():
    """Llama-3-8B shape, bf16, SDPA, 4096 tokens, TP 1: every term written out."""
    s = ModelShape(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256,
                   tied=False, qkv_bias=False, qk_norm=False)
    T, h, d = 4096, 4096, 128
    norms = 2 * ((8 + 2) * T * h + 4 * T)
    rope = 4 * T * d * 2
    attn = 2 * T * 32 * d + 2 * T * (32 + 8) * d + 2 * T * (32 + 16) * d + 4 * T * 32
    mlp = 5 * 2 * T * 14336
    assert M.layer_activation_bytes(s, T, T, 1, 2, "sdpa", "none") == norms + rope + attn + mlp
    # TP 4 divides the attention and MLP terms, not the norms (no sequence parallelism)
    tp4 = M.layer_activation_bytes(s, T, T, 4, 2, "sdpa", "none")
    assert tp4 == norms + rope + attn // 4 + mlp // 4
    # the unfused spec adds b*heads*s^2*(4+2) bytes of scores and an s^2 mask
    unfused = M.layer_activation_bytes(s, T, T, 1, 2, "unfused", "none")
    assert unfused - (norms + rope + mlp + 2 * T * 32 * d * 4) == 6 * T * T * 32 + T * T


def test_states_and_pipeline_in_flight():
    st = M.actor_states(1000, "bfloat16", dp=4, distributed_optimizer=True)
    assert (st.weights, st.grads, st.main_params, st.adam) == (2000, 4000, 1000, 2000)
    assert M.actor_states(1000, "float32", dp=4, distributed_optimizer=True).total == 4000 + 4000 + 2000
    assert M.actor_states(1000, "bfloat16", dp=4, distributed_optimizer=False).total == 2000 + 4000 + 12000
    # 1F1B: stage i holds pp - i micro-batches of its layers; fewer when the step has fewer
    assert [M.in_flight_layers(80, 4, 1, st, 22) for st in range(4)] == [80, 60, 40, 20]
    assert M.in_flight_layers(80, 4, 1, 0, 2) == 40
    # interleaved, pp 4, vpp 5: rank 0 warms up 2*3 + 4*4 = 22 chunks of 4 layers, +1 in flight
    assert M.in_flight_layers(80, 4, 5, 0, 22) == 23 * 4
    assert M.in_flight_layers(80, 1, 1, 0, 9) == 80


def test_micro_batch_shape_and_engine():
    mb = M.micro_batch_shape(seq=8191, budget=16384, sequences_per_dp=44)
    assert (mb.tokens, mb.count) == (16382, 22)
    assert M.micro_batch_shape(seq=20000, budget=16384, sequences_per_dp=3).tokens == 20000
    s = ModelShape(layers=80, hidden=8192, ffn=28672, heads=64, kv_heads=8, head_dim=128, vocab=128256,
                   tied=False, qkv_bias=False, qk_norm=False)
    eng = M.engine_memory(s, 70_553_706_496, 8, 2, GPUS["h200"], 0.6, 0)
    assert eng.weights == 2 * 70_553_706_496 // 8
    assert eng.total == int(0.6 * GPUS["h200"].memory)  # vLLM's budget: a fraction of the device
    assert eng.kv_bytes_per_token == 2 * 80 * 1 * 128 * 2
    fixed = M.engine_memory(s, 70_553_706_496, 8, 2, GPUS["h200"], 0.6, 16 * GiB)
    assert fixed.kv_cache == 16 * GiB and fixed.kv_tokens == 16 * GiB // (2 * 80 * 128 * 2)


def test_verdict_and_checkpoint_size():
    cap = 80 * GiB
    assert M.verdict(60 * GiB, cap) == "fits"
    assert M.verdict(74 * GiB, cap) == "tight"
    assert M.verdict(77 * GiB, cap) == "does not fit"
    s = ModelShape(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, vocab=100,
                   tied=True, qkv_bias=False, qk_norm=False)
    layer = (64 + 2 * 32) * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64
    params = 2 * layer + 64 + 256 * 64  # vocab 100 padded to 256 at TP 2; tied: stored once
    weights, full = M.checkpoint_bytes(s, 2, "bfloat16")
    assert (weights, full) == (2 * params, 2 * params + 12 * params)
    assert Layout(8, 8, 4, 4).dp_rank0_per_node() == 4
    assert Layout(2, 8, 8, 1).dp_rank0_per_node() == 8


def test_save_host_memory_reproduces_the_measurements():
    """The per-parameter save costs give back the CPU measurements they were read from (within the
    measurement's few-percent noise), and project onto the 70B layout per node."""
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    for name, dp in (("checkpoint_host_memory_cpu_dp1.json", 1), ("checkpoint_host_memory_cpu_dp2.json", 2)):
        data = json.loads((results / name).read_text())
        for r in data["results"]:
            for x in r["ranks"]:
                model = M.save_host_bytes_per_param(r["format"], x["rank"] == 0, dp, 2)
                assert x["save_bytes_per_param"] == pytest.approx(model, rel=0.06, abs=0.06), (name, r["format"], x)
    layout = Layout(8, 8, 4, 4)  # 4 DP-rank-0 processes on the busiest node, DP 4
    assert M.save_host_bytes(layout, 10**9, "fully_reshardable", 2) == 4 * 27 * 10**9 + 4 * 3 * 10**9
    assert M.save_host_bytes(layout, 10**9, "dp_reshardable", 2) == 8 * 0.5 * 10**9


def test_calibration_table_is_within_the_stated_tolerance(monkeypatch):
    """benchmarks/results/plan_calibration.json (the README's calibration table): the model, as it is
    now, still predicts what was recorded there, and every measured case is within TOLERANCE."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))  # the script imports its sibling `common`
    spec = importlib.util.spec_from_file_location("plan_calibration", root / "benchmarks" / "plan_calibration.py")
    calib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calib)
    rows = json.loads((root / "benchmarks" / "results" / "plan_calibration.json").read_text())["rows"]
    assert len(rows) == len(calib.H200_RECORDS) + 2 * len(calib.CPU_CASES)
    for (label, fields, attention, mb, measured), row in zip(calib.H200_RECORDS, rows):
        assert row["measured_gb"] == measured
        assert calib.predict_record(fields, attention, mb) / 1e9 == pytest.approx(row["predicted_gb"], rel=1e-9)
    cpu = rows[len(calib.H200_RECORDS):]
    for i, name in enumerate(calib.CPU_CASES):
        want = calib.predict_step(*calib.CPU_CASES[name])
        assert want["state"] / 1e9 == pytest.approx(cpu[2 * i]["predicted_gb"], rel=1e-9), name
        assert want["step"] / 1e9 == pytest.approx(cpu[2 * i + 1]["predicted_gb"], rel=1e-9), name
    assert max(abs(r["error"]) for r in rows) <= M.TOLERANCE
