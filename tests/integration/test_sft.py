"""`atpo sft` end to end: the loss falls on a tiny model, a second run reuses the folder, and the folder
is what `atpo train` then starts from (1 step at lr 0: the exported actor equals the warm start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atpo_cli import exported_weights, load_safetensors, read_metrics, run_atpo

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "examples/embedded_smollm2.yaml")


@pytest.mark.integration
@pytest.mark.slow
def test_sft_loss_falls_and_train_starts_from_it(tmp_path, tiny_llama_dir, tiny_run):
    task, out = tmp_path / "task", tmp_path / "sft"
    sft = [CONFIG, f"sft.base_model={tiny_llama_dir}", f"sft.out_dir={out}", "sft.steps=8", "sft.batch_size=2",
           "sft.lr=1e-2", f"data.embedded_dir={task}", "model.dtype=float32"]
    run_atpo(["sft", *sft], tmp_path)
    record = json.loads((out / "sft.json").read_text())
    loss = record["loss"]
    assert len(loss) == 8 and record["demonstrations"] >= 8
    assert sum(loss[-3:]) / 3 < loss[0] - 2.0, loss  # a random model starts near ln(49152) = 10.8
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run_atpo(["sft", *sft], tmp_path)
    assert "reusing" in again.stderr and weights.stat().st_mtime_ns == stamp

    run_dir = tmp_path / "run"
    run_atpo(["train", CONFIG, f"model.name_or_path={out}", f"sft.out_dir={out}", "train.steps=1",
              f"logging.run_dir={run_dir}", f"data.embedded_dir={task}", *tiny_run, "optimizer.lr=0", "optimizer.min_lr=0",
              "logging.eval_before_train=true", "logging.eval_every=1", "checkpoint.save_every=1",
              "logging.save_tree_pictures=false"], tmp_path)
    rows = read_metrics(run_dir)
    assert sorted(rows) == [0, 1] and "eval/em_avg" in rows[0] and "eval/em_avg" in rows[1]
    assert rows[1]["rollout/generated_tokens_total"] == rows[1]["rollout/generated_tokens"]
    warm, actor = load_safetensors(out), exported_weights(run_dir)
    assert "model.embed_tokens.weight" in warm and set(warm) <= set(actor)
    assert all(torch.equal(warm[k], actor[k]) for k in warm)


@pytest.mark.integration
def test_train_without_the_warm_start_says_to_write_it(tmp_path):
    missing = tmp_path / "sft"
    proc = run_atpo(["train", CONFIG, f"model.name_or_path={missing}", f"sft.out_dir={missing}",
                     f"logging.run_dir={tmp_path / 'run'}", f"data.embedded_dir={tmp_path / 'task'}"],
                    tmp_path, check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is sft.out_dir and holds no model yet: write the warm start first with `atpo sft CONFIG`" in proc.stderr
    assert "Traceback" not in proc.stderr
