"""Non-finite mini-batches: skipped up to ``train.max_nonfinite_skips``, then a one-line stop.

Issue 13 defect 7: one non-finite batch ended the run (a NonFiniteError traceback), and nothing let
a user skip a bounded number of them. The actor's log-probs are made NaN (the injector, a diverged
forward pass) in the first mini-batch of step 1 and of step 2; the limit is 1.
"""

from __future__ import annotations

import pytest

from faultkit import fails_in_one_line_per_rank, fault_env, finish_atpo, latest, read_metrics, start_atpo

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

UPDATE = "atpo_megatron.actor.train_step:train_step"  # 2 mini-batches per step here


def test_nonfinite_minibatches_are_skipped_up_to_the_limit(tmp_path, train_args):
    run_dir = tmp_path / "run"
    proc = start_atpo(train_args(run_dir, 3, "train.max_nonfinite_skips=1"), tmp_path,
                      env=fault_env({"target": UPDATE, "call": 1, "action": "nan_logprobs"},
                                    {"target": UPDATE, "call": 3, "action": "nan_logprobs"}))
    result = finish_atpo(proc, check=False)
    [line] = fails_in_one_line_per_rank(result)
    assert "2 mini-batches had a non-finite loss or gradient, more than train.max_nonfinite_skips=1" in line
    assert "the last checkpoint is step 1" in line
    assert "skipped a mini-batch with a non-finite loss or gradient (1 of train.max_nonfinite_skips=1)" in result.stderr
    step1 = read_metrics(run_dir)[1]
    assert step1["actor/nonfinite_skipped"] == 1 and step1["actor/updates"] == 1  # the other mini-batch trained
    assert latest(run_dir) == 1
