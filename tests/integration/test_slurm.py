"""Preemption of `atpo train` on a real SLURM cluster: USR1 -> save -> requeue -> resume -> same run.

The job is what ``atpo submit`` renders (srun + torchrun, 2 gloo ranks on one CPU node, DP=2 with the
distributed optimizer) running ``atpo train`` on the tiny Llama. After step 1 the test sends the
batch shell USR1 (what ``--signal=B:USR1@T`` does T seconds before the time limit). The ranks save at
the next step boundary and ``scontrol requeue`` the job; SLURM restarts it (``SLURM_RESTART_COUNT=1``),
it resumes from that checkpoint and finishes. Every step's loss and gradient norm and the final
weights must equal an uninterrupted run of the same config under plain torchrun (fp32, CPU).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from atpo_cli import exported_weights, read_metrics, run_atpo
from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

from atpo_megatron import checkpoint
from atpo_megatron.env.retriever import free_port
from atpo_megatron.launch.slurm import render_sbatch, submit

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.dist]
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/embedded_smollm2.yaml"
STEPS = 4
# What a user's --setup does: put the venv (torchrun, atpo) on PATH.
SETUP = [f"export PATH={Path(sys.executable).parent}:$PATH", f"export PYTHONPATH={ROOT}",
         "export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1"]


def _overrides(run_dir: Path, tiny: Path, task: Path, tiny_run: list[str]) -> list[str]:
    return [f"model.name_or_path={tiny}", f"train.steps={STEPS}", f"logging.run_dir={run_dir}",
            f"data.embedded_dir={task}", *tiny_run, "logging.eval_every=0", "logging.save_tree_pictures=false",
            # only the final periodic save: the checkpoint the requeued job resumes from is the signal's
            f"checkpoint.save_every={STEPS}", "checkpoint.keep_last=2",
            # raw rewards: non-zero advantages, so every step moves the weights and the Adam state
            "credit.normalize_leaves=false"]


def _job_log(run_dir: Path) -> str:
    logs = sorted((run_dir / "slurm").glob("*.out"))
    return logs[0].read_text() if logs else ""


def test_usr1_saves_requeues_and_resumes_to_the_uninterrupted_run(
        slurm_cluster, tmp_path, monkeypatch, tiny_llama_dir, tiny_run):
    task = tmp_path / "task"
    reference = tmp_path / "reference"
    outside_slurm = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ATPO_"))}
    run_atpo(["train", CONFIG, "--nproc-per-node", "2", *_overrides(reference, tiny_llama_dir, task, tiny_run)],
             tmp_path, env=outside_slurm)

    run_dir = tmp_path / "run"
    overrides = _overrides(run_dir, tiny_llama_dir, task, tiny_run)
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    # Every fresh cluster numbers jobs from 1, so the script's default port (20000 + job id) would
    # always be 20001 on this shared machine; an explicit free port avoids a clash.
    options = dict(nodes=1, gpus_per_node=0, nproc_per_node=2, cpus_per_task=slurm_cluster.cpus,
                   time="20", signal_seconds=120, job_name="atpo-test", workdir=tmp_path, setup=SETUP,
                   master_port=free_port())
    job = submit(CONFIG, overrides, **options)
    assert (run_dir / "slurm" / "atpo-test.sbatch").read_text() == render_sbatch(CONFIG, overrides, **options)

    # After step 1, deliver what --signal=B:USR1@120 delivers 2 minutes before the time limit.
    slurm_cluster.wait_for(job, "RUNNING", timeout=300, predicate=lambda: (run_dir / "metrics.jsonl").is_file())
    slurm_cluster.signal_batch(job, "USR1")
    slurm_cluster.wait_for(job, "PENDING", "RUNNING", timeout=300,
                           predicate=lambda: "restart_count=1" in _job_log(run_dir))
    state = slurm_cluster.wait_until_finished(job, timeout=600)
    log = _job_log(run_dir)
    assert state == "COMPLETED", log[-6000:]
    assert slurm_cluster.job(job)["Restarts"] == "1"

    # First run: the shell got USR1, the ranks agreed to stop after step p, saved it and requeued.
    first, _, second = log.partition("restart_count=1")
    assert "[atpo] USR1 at" in first and "restart_count=0" in first
    committed = {int(m) for m in re.findall(r"stop requested: checkpoint of step (\d+) committed", first)}
    assert len(committed) == 1, first[-4000:]
    stopped = committed.pop()
    assert 1 <= stopped < STEPS
    assert "preemption: scontrol requeue" in first and "(restart 0 -> 1)" in first
    # Second run: resumed from that checkpoint (not a fresh start) and trained the remaining steps.
    assert f"SLURM restart 1: resuming at step {stopped}" in second, second[-4000:]

    ref, got = read_metrics(reference), read_metrics(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("actor/loss", "actor/grad_norm", "rollout/reward_mean", "rollout/generated_tokens"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])
    assert ref[STEPS]["actor/grad_norm"] > 0
    # keep_last=2: the signal's checkpoint and the final one; the final weights equal the reference's.
    ckpt = run_dir / "checkpoints"
    assert checkpoint.read_latest(ckpt) == STEPS
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt)[0]] == [stopped, STEPS]
    wa, wb = exported_weights(reference), exported_weights(run_dir)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
