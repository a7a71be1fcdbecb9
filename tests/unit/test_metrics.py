"""metrics.py: writer (TensorBoard + JSONL), stage timer, FLOPs/MFU, profiler, step line."""

import json
import logging

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from atpo_megatron.config import ProfileConfig
from atpo_megatron.metrics import (
    NONFINITE_TAG,
    MetricsWriter,
    Profiler,
    StageTimer,
    StepLog,
    count_params,
    detect_peak_tflops,
    effective_seq_len,
    forward_flops_per_token,
    model_flops_per_token,
    throughput,
)

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def _scalars(tb_dir):
    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_writer_tensorboard_and_jsonl_exact(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(3):
            w.log(step, {"rollout/reward_mean": 0.25 * step, "actor/loss": torch.tensor(-1.5 + step),
                         "rollout/tool_calls": step + 1, "rollout/truncated": step == 2, "eval/em": None})
        w.log(3, {"loss": 0.125}, prefix="actor")
    tb = _scalars(tmp_path / "tensorboard")
    assert tb["rollout/reward_mean"] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert tb["actor/loss"] == [(0, -1.5), (1, -0.5), (2, 0.5), (3, 0.125)]
    assert tb["rollout/tool_calls"] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert tb["rollout/truncated"] == [(0, 0.0), (1, 0.0), (2, 1.0)]
    assert "eval/em" not in tb
    rows = _jsonl(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["actor/loss"] == -0.5 and rows[2]["rollout/tool_calls"] == 3 and rows[2]["rollout/truncated"] == 1
    assert rows[3] == {"step": 3, "time": rows[3]["time"], "actor/loss": 0.125}


def test_writer_skips_nonfinite_and_counts(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="atpo_megatron.metrics"), MetricsWriter(tmp_path) as w:
        w.log(0, {"a/x": float("nan"), "a/y": 2.0, "a/z": torch.tensor(float("inf"))})
        w.log(1, {"a/x": np.float32("nan"), "a/y": 3.0})
        assert w.nonfinite_total == 3
    tb = _scalars(tmp_path / "tensorboard")
    assert "a/x" not in tb and "a/z" not in tb
    assert tb["a/y"] == [(0, 2.0), (1, 3.0)]
    assert tb[NONFINITE_TAG] == [(0, 2.0), (1, 1.0)]
    rows = _jsonl(tmp_path)
    assert "a/x" not in rows[0] and rows[0][NONFINITE_TAG] == 2 and rows[1][NONFINITE_TAG] == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "a/x" in warnings[0] and "a/z" in warnings[0]  # once per tag


def test_writer_rejects_non_scalars_and_reserved_tags(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="shape"):
            w.log(0, {"a/v": torch.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            w.log(0, {"step": 1})
    assert not (tmp_path / "tensorboard").exists()


def test_writer_noop_off_rank0_and_disabled(tmp_path):
    for w in (MetricsWriter(tmp_path / "r1", rank=1), MetricsWriter(tmp_path / "off", enabled=False)):
        w.log(0, {"a/x": 1.0})
        w.flush()
        w.close()
    assert not (tmp_path / "r1").exists() and not (tmp_path / "off").exists()


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_stage_timer_accumulates_nests_and_pops():
    clock = FakeClock()
    timer = StageTimer(clock=clock)
    with timer.stage("rollout"):
        clock.t += 2.0
        with timer.stage("reward"):
            clock.t += 0.5
        with timer.stage("rollout"):  # re-entered: counted once, by the outer block
            clock.t += 1.0
    with timer.stage("actor"):
        clock.t += 3.0
    with timer.stage("rollout"):  # a second visit in the same step adds
        clock.t += 0.25
    with pytest.raises(RuntimeError):
        with timer.stage("sync"):
            clock.t += 4.0
            raise RuntimeError("boom")
    assert timer.pop() == {"timing/rollout_s": 3.75, "timing/reward_s": 0.5, "timing/actor_s": 3.0,
                           "timing/sync_s": 4.0}
    assert timer.pop() == {}
    with timer.stage("actor"):
        clock.t += 1.0
    assert timer.pop() == {"timing/actor_s": 1.0}


def test_flops_tiny_config_by_hand():
    cfg = dict(hidden_size=8, num_hidden_layers=2, intermediate_size=16, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=10, tie_word_embeddings=True)
    # head_dim 2: q 8*8=64, k 8*4=32, v 32, o 64 -> 192; mlp 3*8*16=384; norms 16 -> 592 per layer
    # body 2*592 + final norm 8 = 1192; output layer 10*8=80 (tied, still a matmul) -> N = 1272
    assert count_params(cfg) == {"total": 1192 + 80, "embedding": 80, "matmul": 1272}
    assert count_params({**cfg, "tie_word_embeddings": False})["total"] == 1192 + 160
    # 6*1272 + 6 * 2 layers * (4 heads * 2) * seq 5 = 7632 + 480
    assert model_flops_per_token(cfg, seq_len=5) == 8112.0
    assert model_flops_per_token({**cfg, "seq_len": 5}) == 8112.0
    assert forward_flops_per_token(cfg, 5) == 2704.0
    with pytest.raises(ValueError, match="seq_len"):
        model_flops_per_token(cfg)
    with pytest.raises(ValueError, match="hidden_size"):
        model_flops_per_token({"num_hidden_layers": 2}, 5)

    class HFLike:  # attribute access, explicit head_dim (Qwen3/Gemma style)
        hidden_size, num_hidden_layers, intermediate_size, num_attention_heads = 8, 2, 16, 4
        num_key_value_heads, vocab_size, head_dim = 2, 10, 4
    # q 8*16=128, k,v 8*8=64 each, o 128 -> 384; +384 mlp +16 norms = 784; body 1576; +80 -> 1656
    assert model_flops_per_token(HFLike(), 5) == 6 * 1656 + 6 * 2 * 16 * 5


def test_flops_llama3_8b_reproduces_environment_md():
    # environment.md: Llama-3-8B shape, seq 4096, mbs 1, 0.426 s/step = 9,605 tokens/s = 463.4 TFLOP/s,
    # 58.5 % of the measured 792 TFLOP/s bf16 GEMM rate.
    assert count_params(LLAMA3_8B)["total"] == 8_030_261_248  # the published 8.03 B
    fpt = model_flops_per_token(LLAMA3_8B, seq_len=4096)
    assert fpt == 6 * 7_504_924_672 + 6 * 32 * 4096 * 4096
    t = throughput(9605, 1.0, fpt, n_devices=1, peak_tflops=792.0)
    assert t["tokens_per_s"] == 9605.0
    assert t["tflops_per_device"] == pytest.approx(463.4, abs=0.06)
    assert t["mfu"] == pytest.approx(0.585, abs=0.0006)
    t = throughput(4096, 0.426, fpt, n_devices=1, peak_tflops=989.0)  # 0.426 is rounded: 463.9
    assert t["tflops_per_device"] == pytest.approx(463.4, rel=2e-3)
    eight = throughput(8 * 4096, 0.426, fpt, n_devices=8, peak_tflops=0.0)
    assert eight["tflops_per_device"] == pytest.approx(t["tflops_per_device"]) and eight["mfu"] == 0.0


def test_effective_seq_len():
    assert effective_seq_len([4096]) == 4096
    assert effective_seq_len([100, 300]) == (100**2 + 300**2) / 400
    assert effective_seq_len([]) == 0.0


def test_detect_peak_tflops():
    assert detect_peak_tflops("bfloat16", "NVIDIA H200") == 989.0
    assert detect_peak_tflops(torch.bfloat16, "NVIDIA H100 80GB HBM3") == 989.0
    assert detect_peak_tflops("fp8", "NVIDIA H100 80GB HBM3") == 1979.0
    assert detect_peak_tflops("e4m3", "NVIDIA H200") == 1979.0
    assert detect_peak_tflops("bf16", "NVIDIA H100 PCIe") == 756.0
    assert detect_peak_tflops("bf16", "NVIDIA H200 NVL") == 835.0
    assert detect_peak_tflops("bf16", "NVIDIA GH200 480GB") == 989.0
    assert detect_peak_tflops("bf16", "NVIDIA A100-SXM4-80GB") == 312.0
    assert detect_peak_tflops("fp8", "NVIDIA A100-SXM4-80GB") == 0.0
    assert detect_peak_tflops(torch.float32, "NVIDIA A100-PCIE-40GB") == 19.5
    assert detect_peak_tflops("bf16", "Some Future GPU") == 0.0
    with pytest.raises(ValueError, match="dtype"):
        detect_peak_tflops("int3", "NVIDIA H200")
    if not torch.cuda.is_available():
        assert detect_peak_tflops("bf16") == 0.0


def _profiled_loop(prof, steps=5):
    a = torch.randn(32, 32)
    for step in range(steps):
        prof.step(step)
        if step in (1, 2):
            a @ a
        else:
            a.cumsum(0)
    prof.close()


def test_profiler_traces_only_the_step_range(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="atpo_megatron.metrics"):
        prof = Profiler(ProfileConfig(enabled=True, steps=[1, 2]), tmp_path / "profile", rank=0)
        _profiled_loop(prof)
    traces = list((tmp_path / "profile").glob("*.pt.trace.json"))
    assert traces == [prof.trace_path] and traces[0].name.startswith("rank0_steps1-2.")
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert "aten::mm" in names and "aten::cumsum" not in names  # step 0 is warm-up, step 3 after
    assert sum(1 for n in names if n and n.startswith("ProfilerStep#")) == 2
    assert any(str(traces[0]) in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "profile").glob("*.txt"))


def test_profiler_range_reaching_loop_end_is_saved_at_close(tmp_path):
    prof = Profiler(ProfileConfig(enabled=True, steps=[3, 9]), tmp_path, rank=2)
    _profiled_loop(prof, steps=5)  # steps 3, 4 recorded; loop ends inside the range
    assert prof.trace_path is not None and prof.trace_path.name.startswith("rank2_steps3-9.")


def test_profiler_disabled_writes_nothing(tmp_path):
    prof = Profiler(ProfileConfig(enabled=False, steps=[1, 2]), tmp_path / "profile")
    _profiled_loop(prof)
    assert prof.trace_path is None and not (tmp_path / "profile").exists()
    with pytest.raises(ValueError, match="profile.steps"):
        Profiler(ProfileConfig(enabled=True, steps=[3, 1]), tmp_path)


def test_step_log_line():
    line = StepLog()({"rollout/reward_mean": torch.tensor(0.41234), "actor/loss": -0.012345,
                      "actor/pg_clipfrac": 0.03125, "rollout/em": 0.4375, "rollout/format_failure_rate": 0.0625,
                      "rollout/tool_calls_per_leaf": 1.875, "eval/em_avg": 0.5,
                      "timing/rollout_s": 12.345, "timing/actor_s": 0.0512},
                     step=7)
    assert line == ("step 7 | reward 0.412 | EM 0.44 | format fail 0.06 | tools/leaf 1.9 | loss -0.01235 | "
                    "clip 0.031 | eval EM 0.500 | rollout 12.3s actor 0.0512s")
    assert StepLog()({"actor/loss": 1.0}) == "loss 1"
    assert StepLog(fields=(("em", "eval/em", "{:.2f}"),), timing=False)({"eval/em": 0.5, "timing/a_s": 1}) == "em 0.50"
