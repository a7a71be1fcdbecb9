"""``atpo plan`` end to end on the 70B example, with numbers worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atpo_megatron.cli import main
from atpo_megatron.plan import memory as M
from atpo_megatron.plan.command import plan_for
from atpo_megatron.plan.shapes import GiB, ModelShape

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "llama3_70b.yaml"


def test_70b_example_on_8_nodes_of_h100():
    plan = plan_for(EXAMPLE, [], nodes=8, gpus_per_node=8, gpu="h100")
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp) == (4, 4, 4)
    first, last = plan.stages
    # 20 layers of 213,925,888 parameters per TP rank (qkv 2560x8192, proj 8192x2048, fc1 14336x8192,
    # fc2 8192x7168, two norms) + the embedding's 32,128 padded rows x 8192 (vocab 128256 -> 128512)
    layer = 2560 * 8192 + 8192 * 2048 + 14336 * 8192 + 8192 * 7168 + 2 * 8192
    assert layer == 213_925_888
    assert first.params == 20 * layer + 32128 * 8192 == 4_541_710_336
    assert last.params == first.params + 8192  # + the final norm
    st = first.states  # bf16 weights, fp32 gradient buffer, fp32 main params + 2 moments over DP 4
    assert (st.weights, st.grads, st.main_params, st.adam) == (
        2 * first.params, 4 * first.params, 4 * first.params // 4, 8 * first.params // 4)
    # full recompute: each of the 80 in-flight layer x micro-batches keeps its bf16 input (16382 x 8192)
    assert plan.mb.tokens == 2 * 8191 and plan.mb.count == 22
    per_layer = M.layer_activation_bytes(plan.shape, plan.mb.tokens, plan.mb.seq, 4, 2, "sdpa", "full")
    assert per_layer == 2 * 16382 * 8192
    # the engine: 70.55 B bf16 weights over TP 8, an 11 GiB KV cache of 2 x 80 x 1 x 128 x 2 bytes per token
    assert plan.engine.weights == 2 * plan.hf_params // 8 and plan.engine.kv_cache == 11 * GiB
    assert plan.engine.kv_tokens == 11 * GiB // (2 * 80 * 128 * 2)
    assert plan.verdict == "fits" and plan.peak[1] == "rollout"
    rollout = next(ph for ph in first.phases if ph.name == "rollout")
    assert rollout.total == st.total + plan.engine.weights + 11 * GiB + M.VLLM_NON_KV
    # the checkpoint: 70,553,706,496 parameters + 2 x 256 padded vocabulary rows, 2 + 12 bytes each
    params = 70_553_706_496 + 2 * 256 * 8192
    assert plan.checkpoint == (2 * params, 14 * params)
    # per node: 4 DP-rank-0 ranks at 24 + 12/4 B/param, 4 others at 12/4 (fully_reshardable), or 2/4 each
    assert plan.host["checkpoint save (fully_reshardable)"] == int((4 * (24 + 3) + 4 * 3) * last.params)
    assert plan.host["checkpoint save (dp_reshardable)"] == int(8 * 0.5 * last.params)
    assert [t.name for t in plan.terms] == ["generation", "old log-probs", "training", "weight sync", "checkpoint"]
    assert all(t.seconds >= 0 for t in plan.terms)


def test_checkpoint_size_matches_the_measured_checkpoint():
    """The CPU host-memory runs wrote real checkpoints (bf16, distributed Adam, TP 1): their size on
    disk is the formula's, plus megatron's metadata."""
    import transformers

    data = json.loads((ROOT / "benchmarks" / "results" / "checkpoint_host_memory_cpu_dp2.json").read_text())
    fields = dict(data["shape"])
    shape = ModelShape.from_hf(transformers.CONFIG_MAPPING[fields.pop("model_type")](**fields))
    _, full = M.checkpoint_bytes(shape, 1, "bfloat16")
    for result in data["results"]:
        assert result["checkpoint_bytes"] == pytest.approx(full, rel=0.002), result["format"]


def test_plan_cli_prints_the_breakdown_and_exits_1_when_it_does_not_fit(capsys):
    assert main(["plan", str(EXAMPLE), "--nodes", "8", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    for text in ("Per-GPU memory, GiB", "activations, recompute full (configured)", "Host memory per node",
                 "Checkpoint (whole job)", "Step time estimate", "verdict: FITS"):
        assert text in out, text
    assert main(["plan", str(EXAMPLE), "--nodes", "8", "--gpus-per-node", "8", "model.recompute=selective"]) == 1
    out = capsys.readouterr().out
    assert "verdict: DOES NOT FIT" in out and "would fit with: model.recompute=full" in out


@pytest.mark.parametrize("argv,message", [
    (["--nodes", "8", "--gpus-per-node", "0"], "the plan sizes GPU jobs"),
    (["--nodes", "3", "--gpus-per-node", "8"], "does not divide the world size 24"),
    (["--nodes", "8", "--gpus-per-node", "8", "model.name_or_path=/nowhere/Unknown-7B"], "model.name_or_path"),
])
def test_plan_cli_refuses_bad_input_in_one_line(argv, message, capsys):
    assert main(["plan", str(EXAMPLE), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atpo plan: configuration error:") and message in err and "\n" not in err, err


def test_rates_prefer_gpu_results_on_file_and_name_them(tmp_path, monkeypatch):
    """A GPU benchmark result in benchmarks/results/ replaces the record/anchor (scaled to the GPU
    by datasheet peak) and is named; CPU results never count."""
    from atpo_megatron.plan import timing as T
    from atpo_megatron.plan.shapes import GPUS

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(T, "RESULTS_DIR", results)
    assert T.training_rate(GPUS["h100"]).source == T.RECORD_TRAIN_SOURCE
    assert T.sync_rate().source == T.ANCHOR_SYNC_SOURCE
    (results / "actor_step_cpu.json").write_text(json.dumps(
        {"device": "cpu", "results": [{"train": {"tflops_per_device": 0.1}}]}))
    (results / "weight_sync_cpu.json").write_text(json.dumps(  # what benchmarks/common.py writes on a CPU
        {"env": {"device": "cpu (x86_64, 1 threads)"}, "result": {"weights_gb_per_s": 2.3}}))
    assert T.training_rate(GPUS["h100"]).source == T.RECORD_TRAIN_SOURCE
    assert T.sync_rate().source == T.ANCHOR_SYNC_SOURCE
    (results / "actor_step_8b.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "results": [{"train": {"tflops_per_device": 400.0}},
                                              {"train": {"tflops_per_device": 450.0}}]}))
    rate = T.training_rate(GPUS["a100"])
    assert rate.value == pytest.approx(450.0 * 312.0 / 989.0)
    assert rate.source == "benchmarks/results/actor_step_8b.json (NVIDIA H200)"
    (results / "weight_sync_8b.json").write_text(json.dumps(
        {"env": {"device": "NVIDIA H200"}, "result": {"weights_gb_per_s": 120.0}}))
    assert (T.sync_rate().value, T.sync_rate().source) == (120.0, "benchmarks/results/weight_sync_8b.json")
