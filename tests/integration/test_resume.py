"""Exact resume of `atpo train`: 2 steps straight == 1 step, stop, resume, 1 more step (fp32, CPU).

The whole step is covered: the rollout (engine weights re-synced from the restored actor, seeded
sampling and expansion), credit, old log-probs, the update with the restored Adam state, and the
data position. Losses, gradient norms and the final weights must be bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atpo_cli import exported_weights, read_metrics, run_atpo

REPO = Path(__file__).resolve().parents[2]


def _train(run_dir: Path, steps: int, tiny: Path, task: Path, tiny_run: list[str]) -> None:
    run_atpo(["train", str(REPO / "examples/embedded_smollm2.yaml"), f"model.name_or_path={tiny}",
              f"train.steps={steps}", f"logging.run_dir={run_dir}", f"data.embedded_dir={task}", *tiny_run,
              "checkpoint.save_every=1", "logging.eval_every=0", "logging.save_tree_pictures=false",
              # raw rewards (a random model always gets the format penalty -1): non-zero advantages,
              # so the update really moves the weights and the Adam state matters for step 2
              "credit.normalize_leaves=false"], run_dir.parent)


@pytest.mark.integration
@pytest.mark.slow
def test_stop_and_resume_equals_straight_run(tmp_path, tiny_llama_dir, tiny_run):
    task = tmp_path / "task"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, 2, tiny_llama_dir, task, tiny_run)
    _train(resumed, 1, tiny_llama_dir, task, tiny_run)
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "1"
    _train(resumed, 2, tiny_llama_dir, task, tiny_run)  # same run dir: resumes from step 1 automatically

    a, b = read_metrics(straight), read_metrics(resumed)
    assert sorted(b) == [1, 2]
    for key in ("actor/loss", "actor/grad_norm", "rollout/reward_mean", "rollout/generated_tokens",
                "actor/input_tokens", "actor/log_ratio_abs_mean"):
        assert a[2][key] == b[2][key], key
    assert a[2]["actor/grad_norm"] > 0  # the steps did train something
    wa, wb = exported_weights(straight), exported_weights(resumed)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
