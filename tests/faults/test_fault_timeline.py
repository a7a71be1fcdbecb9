"""One run, five faults, nothing lost.

A 4-step `atpo train` of the tiny model (a checkpoint every step) meets, in turn:

1. SIGUSR1 during step 1's rollout      -> saves step 1 and exits 0 (SLURM's "time is nearly up")
2. SIGTERM during step 2's update       -> saves step 2 and exits 0 (scancel / preemption)
3. SIGUSR1 during step 3's save         -> finishes that save and exits 0 at once (no extra step)
4. SIGKILL during step 4's update       -> dies; `latest` still names step 3
5. a full disk during step 4's save     -> one-line error; `latest` and step 3's files untouched

and is resumed after each (`atpo train` again, same run folder). The sixth launch finishes step 4,
and every step's metrics and the final checkpoint (weights, Adam moments, step counts, scheduler)
are bit-identical to the uninterrupted reference run's.

"Full disk" is a file-size limit (RLIMIT_FSIZE, ``ulimit -f``) set in the child: writing past it
fails with EFBIG ("File too large"), as a write to a full disk fails with ENOSPC; it needs no
privileges, where mounting a small tmpfs needs root.

Stages share one run folder and run in order; asking for stage k runs the earlier ones first, so
each test can also run alone (``-k kill``).
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
from pathlib import Path

import pytest

from faultkit import (REFERENCE_STEPS, assert_same_checkpoint, assert_same_steps, fault_env, finish_atpo, latest,
                      read_metrics, release, start_atpo, wait_held)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

ROLLOUT = "atpo_megatron.rollout.tree_rollout:TreeRollout.sample"
UPDATE = "atpo_megatron.actor.train_step:train_step"  # once per mini-batch (2 per step here)
COMMIT = "atpo_megatron.checkpoint.store:_commit"  # a save's shards are on disk, its commit not yet done
FILE_LIMIT = 4 << 20  # bytes: above every log file of the run, below one checkpoint shard (~40 MB)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


class Timeline:
    def __init__(self, run_dir: Path, train_args):
        self.run_dir, self.train_args = run_dir, train_args
        self.results: dict[int, object] = {}

    def _launch(self, *faults, preexec_fn=None):
        return start_atpo(self.train_args(self.run_dir, REFERENCE_STEPS), self.run_dir.parent,
                          env=fault_env(*faults), preexec_fn=preexec_fn)

    def _signal_at(self, stage: int, target: str, signum: int):
        """Hold the run at its first call of ``target``, send ``signum``, let it go on, wait for its end."""
        folder = self.run_dir.parent / f"hold{stage}"
        proc = self._launch({"target": target, "call": 1, "action": "hold", "dir": str(folder)})
        os.kill(wait_held(folder, proc), signum)
        release(folder)
        return finish_atpo(proc, timeout=600, check=False)

    def stage(self, k: int):
        """The result of stage ``k`` (running stages 1..k that have not run yet)."""
        for j in range(1, k + 1):
            if j not in self.results:
                self.results[j] = getattr(self, f"_stage{j}")()
        return self.results[k]

    def _stage1(self):
        return self._signal_at(1, ROLLOUT, signal.SIGUSR1)

    def _stage2(self):
        return self._signal_at(2, UPDATE, signal.SIGTERM)

    def _stage3(self):
        return self._signal_at(3, COMMIT, signal.SIGUSR1)

    def _stage4(self):
        return finish_atpo(self._launch({"target": UPDATE, "call": 1, "action": "kill"}), check=False)

    def _stage5(self):
        before = _digests(self.run_dir / "checkpoints" / "step_000003")
        result = finish_atpo(self._launch(preexec_fn=_limit_file_size), check=False)
        return result, before

    def _stage6(self):
        return finish_atpo(self._launch())


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def timeline(tmp_path_factory, train_args) -> Timeline:
    return Timeline(tmp_path_factory.mktemp("timeline") / "run", train_args)


def test_usr1_during_rollout_saves_that_step_and_exits(timeline):
    result = timeline.stage(1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stop requested: checkpoint of step 1 committed" in result.stderr
    assert latest(timeline.run_dir) == 1 and sorted(read_metrics(timeline.run_dir)) == [1]


def test_term_during_update_saves_that_step_and_exits(timeline):
    result = timeline.stage(2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "stop requested: checkpoint of step 2 committed" in result.stderr
    assert latest(timeline.run_dir) == 2 and sorted(read_metrics(timeline.run_dir)) == [1, 2]


def test_usr1_during_save_exits_right_after_that_save(timeline):
    result = timeline.stage(3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stop requested: checkpoint of step 3 committed" in result.stderr
    assert latest(timeline.run_dir) == 3 and sorted(read_metrics(timeline.run_dir)) == [1, 2, 3]


def test_sigkill_during_update_keeps_the_last_checkpoint(timeline):
    result = timeline.stage(4)
    assert result.returncode == -signal.SIGKILL
    assert latest(timeline.run_dir) == 3
    assert not (timeline.run_dir / "checkpoints" / "step_000004").exists()


def test_full_disk_during_save_is_one_line_and_keeps_the_last_checkpoint(timeline):
    result, before = timeline.stage(5)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("atpo train: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "step_000004 could not be written" in errors[0] and "`latest` still names step 3" in errors[0]
    assert "Traceback" not in result.stderr
    assert latest(timeline.run_dir) == 3
    assert _digests(timeline.run_dir / "checkpoints" / "step_000003") == before


def test_resumed_run_equals_the_uninterrupted_one(timeline, reference_run):
    result = timeline.stage(6)
    assert "replacing the partial checkpoint folder" in result.stderr  # step 4's, left by the full disk
    assert latest(timeline.run_dir) == REFERENCE_STEPS
    run, reference = read_metrics(timeline.run_dir), read_metrics(reference_run)
    assert sorted(run) == sorted(reference) == list(range(1, REFERENCE_STEPS + 1))
    assert_same_steps(run, reference, range(1, REFERENCE_STEPS + 1))
    assert reference[REFERENCE_STEPS]["actor/grad_norm"] > 0  # the steps did train ...
    assert all(reference[s]["rollout/search_queries"] > 0 for s in reference)  # ... with the retriever in the loop
    name = f"step_{REFERENCE_STEPS:06d}"
    seen = assert_same_checkpoint(reference_run / "checkpoints" / name, timeline.run_dir / "checkpoints" / name)
    assert seen["optimizer_kinds"] == ["exp_avg", "exp_avg_sq", "param"]
    assert set(seen["adam_steps"]) == {REFERENCE_STEPS * 2}  # two mini-batch updates per step
