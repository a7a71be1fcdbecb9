"""Calibration of ``atpo plan``'s memory model: its predictions next to measured peaks.

    python benchmarks/plan_calibration.py            # CPU runs (a few minutes) + the H200 records

Two sources of truth:

* **CPU runs here.** Each case is a fresh process (world size 1, glibc's mmap threshold pinned so
  freed tensors leave the RSS at once) that builds the actor as the trainer does (``build_model``,
  megatron DDP, distributed Adam), takes one ``train_step`` (ATPO loss) so that Adam's state exists,
  then measures two things: the **training state** (RSS after that step minus RSS before the model
  was built) against ``plan.memory.actor_states``, and the **step's working memory** (the growth of
  the peak RSS during a second ``train_step``) against the activations, logits and log-prob chunks
  of ``plan.memory.stage_activation_bytes``.
* **The H200 records** of ``shared/notes/environment.md`` (2026-11-28; that script is not in the
  repository): megatron-core GPTModel, local spec, bf16, seq 4096, a plain SGD step (no optimizer
  state; gradients allocated as the backward goes, so none at the activation peak), peak
  ``torch.cuda.max_memory_allocated``. Predicted: bf16 weights + one micro-batch's activations
  and the last stage's logits. The records are "GB" in the note; they are taken as 10^9 bytes.

Writes ``benchmarks/results/plan_calibration.json`` and prints the table the README shows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import common

GB = 1e9
# name: (HF shape, dtype, attention, recompute, tokens per sequence, sequences per micro-batch)
# 75 M parameters: 8 layers, hidden 768, 12 heads / 4 KV heads, ffn 2048, vocab 16384
SMALL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=16384)
CPU_CASES = {
    "75 M, fp32, SDPA, 1 x 2048 tokens": (SMALL, "float32", "sdpa", "none", 2048, 1),
    "75 M, fp32, SDPA, 2 x 2048 tokens": (SMALL, "float32", "sdpa", "none", 2048, 2),
    "75 M, bf16, SDPA, 2 x 2048 tokens": (SMALL, "bfloat16", "sdpa", "none", 2048, 2),
    "75 M, fp32, unfused, 2 x 1024 tokens": (SMALL, "float32", "unfused", "none", 1024, 2),
    "75 M, fp32, SDPA, full recompute, 2 x 2048 tokens": (SMALL, "float32", "sdpa", "full", 2048, 2),
}
# environment.md: (label, HF shape, attention, micro-batch, measured peak in GB)
H200_RECORDS = [
    ("1.36 B, local spec (unfused), mb 2", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
     num_attention_heads=16, num_key_value_heads=16, vocab_size=32000), "unfused", 2, 110.0),
    ("1.36 B, SDPA, mb 2", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
     num_attention_heads=16, num_key_value_heads=16, vocab_size=32000), "sdpa", 2, 28.6),
    ("Llama-3-8B shape, SDPA, mb 1", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256), "sdpa", 1, 53.2),
]
RECORD_SEQ = 4096


def _shape_and_layout(fields: dict):
    from atpo_megatron.plan.shapes import Layout, ModelShape

    hf = common.hf_config({"model_type": "llama", "tie_word_embeddings": False, **fields}, max_positions=8192)
    return hf, ModelShape.from_hf(hf), Layout(1, 1, 1, 1)


def predict_step(fields, dtype, attention, recompute, seq, rows) -> dict:
    from atpo_megatron.plan import memory as M
    from atpo_megatron.plan.shapes import stage_params

    _, shape, layout = _shape_and_layout(fields)
    mb = M.MicroBatchShape(tokens=rows * seq, seq=seq, count=1)
    params = stage_params(shape, 1, 1, 0)
    return {"state": M.actor_states(params, dtype, 1, True).total,
            "step": M.stage_activation_bytes(shape, layout, 0, mb, M.dtype_bytes(dtype), attention, recompute)}


def measure(name: str) -> dict:
    """In this process: build, one step, then measure the state and a second step's growth."""
    import torch

    from actor_step import Seq
    from atpo_megatron.actor.model import build_model
    from atpo_megatron.actor.optimizer import build_optimizer, wrap_ddp
    from atpo_megatron.actor.parallel import init_distributed
    from atpo_megatron.actor.train_step import train_step
    from atpo_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig

    fields, dtype, attention, recompute, seq, rows = CPU_CASES[name]
    common.quiet()
    common.setup_cpu_threads()
    init_distributed(1, 1, 1, seed=0)
    hf, _, _ = _shape_and_layout(fields)
    gc.collect()
    before = common.rss_bytes()
    cfg = ModelConfig(dtype=dtype, spec="local", attention=attention, recompute=recompute)
    models = wrap_ddp(build_model(hf, cfg, ParallelConfig()))
    optimizer, _ = build_optimizer(models, OptimizerConfig(lr=1e-5, min_lr=1e-5), total_steps=10)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(rows):
        ids = torch.randint(0, fields["vocab_size"], (seq + 1,), generator=g).tolist()
        s = Seq(ids[:seq // 4], ids[seq // 4:], [1] * (seq + 1 - seq // 4), [1.0 if i % 2 else -1.0] * (seq + 1 - seq // 4))
        s.old_logprobs = [-9.0] * len(s.response_ids)
        seqs.append(s)

    def step():
        train_step(models, optimizer, seqs, "atpo", {"clip_low": 0.2, "clip_high": 0.2}, max_tokens=rows * seq)

    step()
    gc.collect()
    state = common.rss_bytes() - before
    base = common.rss_bytes()
    common.reset_peak_rss()
    step()
    return {"state": state, "step": common.peak_rss_bytes() - base}


def run_case(name: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--measure", name], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict_record(fields, attention, rows) -> float:
    from atpo_megatron.plan import memory as M
    from atpo_megatron.plan.shapes import stage_params

    _, shape, layout = _shape_and_layout(fields)
    mb = M.MicroBatchShape(tokens=rows * RECORD_SEQ, seq=RECORD_SEQ, count=1)
    weights = 2 * stage_params(shape, 1, 1, 0)
    return weights + M.stage_activation_bytes(shape, layout, 0, mb, 2, attention, "none")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--json", default=str(common.REPO_ROOT / "benchmarks/results/plan_calibration.json"))
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return {}
    rows = []
    for label, fields, attention, mb, measured in H200_RECORDS:
        predicted = predict_record(fields, attention, mb)
        rows.append({"case": f"H200 record: {label}", "what": "peak", "measured_gb": measured,
                     "predicted_gb": predicted / GB, "error": predicted / GB / measured - 1})
    for name in CPU_CASES:
        got, want = run_case(name), predict_step(*CPU_CASES[name])
        for what in ("state", "step"):
            rows.append({"case": f"CPU: {name}", "what": {"state": "training state", "step": "step working memory"}[what],
                         "measured_gb": got[what] / GB, "predicted_gb": want[what] / GB,
                         "error": want[what] / got[what] - 1})
    print(common.format_table(rows, [("case", "case", ""), ("what", "what", ""), ("measured_gb", "measured GB", ".3f"),
                                     ("predicted_gb", "predicted GB", ".3f"), ("error", "error", "+.1%")]))
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest error {worst:.1%} (plan.memory.TOLERANCE is the stated bound); load average "
          f"{os.getloadavg()[0]:.1f}")
    out = {"env": common.environment("cpu"), "rows": rows, "largest_error": worst}
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
