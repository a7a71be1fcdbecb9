"""Preemption on a real SLURM cluster: signal -> save -> requeue -> resume -> same final state.

The job is what ``atpo submit`` renders (srun + torchrun, 2 gloo ranks on one CPU node) with a toy
training loop as its program (``TOY_LOOP`` below: a counter updated with per-rank random numbers
and an all-reduce, checkpointed with ``atpo_megatron.checkpoint``, stopped by
``PreemptionHandler``). To test the real trainer, pass its command as ``program`` instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

from atpo_megatron import checkpoint
from atpo_megatron.launch.slurm import render_sbatch, submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY, SLEEP_S = 24, 6, 0.5
# What a user's --setup does: put the venv (torchrun, python) on PATH and the package on PYTHONPATH.
SETUP = [f"export PATH={Path(sys.executable).parent}:$PATH", f"export PYTHONPATH={ROOT}",
         "export OMP_NUM_THREADS=1"]

TOY_LOOP = '''\
"""Toy trainer: python toy_loop.py OUT_DIR STEPS SAVE_EVERY SLEEP_S (under torchrun)."""
import json, sys, time
from pathlib import Path


def main(out, steps, save_every, sleep_s):
    import torch
    import torch.distributed as dist
    from atpo_megatron import checkpoint
    from atpo_megatron.launch.preemption import PreemptionHandler

    handler = PreemptionHandler().install()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(100 + rank)  # a different stream per rank: the checkpoint must restore each
    ckpt = out / "ckpt"
    step, counter = 0, 0.0
    if checkpoint.prepare(ckpt, "auto") is not None:
        step, extra = checkpoint.load(ckpt, [])
        counter = extra["counter"]
    print(f"[toy] rank {rank} restart_count={handler.restart_count} resumed_step={step}", flush=True)
    while step < steps:
        step += 1
        t = torch.tensor([counter * 0.9 + torch.rand(1).item() + step], dtype=torch.float64)
        dist.all_reduce(t)
        counter = t.item() / world
        time.sleep(sleep_s)
        if rank == 0:
            print(f"[toy] step {step} counter {counter!r}", flush=True)
        stop = handler.should_stop()
        if step % save_every == 0 or stop:
            checkpoint.save(ckpt, step, [], extra={"counter": counter}, keep_last=2)
        if stop:
            requeued = handler.should_requeue and handler.requeue()
            print(f"[toy] rank {rank} preempted at step {step}: saved, requeued={requeued}", flush=True)
            dist.destroy_process_group()
            return
    if rank == 0:
        (out / "final.json").write_text(json.dumps(
            {"step": step, "counter": counter, "restart_count": handler.restart_count}))
    dist.destroy_process_group()


if __name__ == "__main__":  # the checkpoint writer spawns helpers that re-import __main__
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy(tmp_path: Path) -> Path:
    path = tmp_path / "toy_loop.py"
    path.write_text(TOY_LOOP)
    return path


def _uninterrupted(tmp_path: Path, toy: Path) -> dict:
    """The same loop under plain torchrun, no SLURM, no signal."""
    out = tmp_path / "reference"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in [v for v in env if v.startswith("SLURM_") or v == "ATPO_STOP_FILE"]:
        env.pop(var)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(toy), str(out), str(STEPS), str(SAVE_EVERY), "0"]
    with open(out / "log.txt", "w") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=300)
        finally:  # the ranks catch SIGTERM (PreemptionHandler): kill the whole session
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, (out / "log.txt").read_text()[-4000:]
    return json.loads((out / "final.json").read_text())


def _job_log(run_dir: Path) -> str:
    logs = sorted((run_dir / "slurm").glob("*.out"))
    return logs[0].read_text() if logs else ""


def test_usr1_saves_requeues_and_resumes_to_the_uninterrupted_result(slurm_cluster, tmp_path, monkeypatch):
    toy = _toy(tmp_path)
    reference = _uninterrupted(tmp_path, toy)
    run_dir = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"logging:\n  run_dir: {run_dir}\n")
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    # Every fresh cluster numbers jobs from 1, so the script's default port (20000 + job id) would
    # always be 20001 on this shared machine; an explicit free port avoids a clash.
    options = dict(nodes=1, gpus_per_node=0, nproc_per_node=2, cpus_per_task=slurm_cluster.cpus,
                   time="15", signal_seconds=120, job_name="toy", workdir=tmp_path, setup=SETUP,
                   master_port=_free_port(),
                   program=[sys.executable, toy, run_dir, STEPS, SAVE_EVERY, SLEEP_S])
    job = submit(cfg, **options)
    assert (run_dir / "slurm" / "toy.sbatch").read_text() == render_sbatch(cfg, **options)

    # Let it train a few steps, then deliver what --signal=B:USR1@120 delivers 2 min before the limit.
    slurm_cluster.wait_for(job, "RUNNING", timeout=120,
                           predicate=lambda: "[toy] step 8 " in _job_log(run_dir))
    slurm_cluster.signal_batch(job, "USR1")
    slurm_cluster.wait_for(job, "PENDING", "RUNNING", timeout=120,
                           predicate=lambda: "restart_count=1" in _job_log(run_dir))
    state = slurm_cluster.wait_until_finished(job, timeout=300)
    log = _job_log(run_dir)
    assert state == "COMPLETED", log[-4000:]

    # First run: the shell got USR1, the ranks saved at their next step and requeued the job.
    first, _, second = log.partition("restart_count=1")
    assert "[atpo] USR1 at" in first and "restart_count=0" in first
    preempted = [int(line.split("preempted at step ")[1].split(":")[0])
                 for line in first.splitlines() if "preempted at step" in line]
    assert len(preempted) == 2 and preempted[0] == preempted[1] and 8 <= preempted[0] < STEPS, first[-3000:]
    assert "requeued=True" in first
    # Second run (SLURM_RESTART_COUNT=1): resumed from that checkpoint, finished all steps.
    assert f"resumed_step={preempted[0]}" in second
    final = json.loads((run_dir / "final.json").read_text())
    assert final == {**reference, "restart_count": 1}, (final, reference)
    assert slurm_cluster.job(job)["Restarts"] == "1"
    # keep_last=2 after the final save at step 24: 18 and 24 remain.
    ckpt = run_dir / "ckpt"
    assert checkpoint.read_latest(ckpt) == STEPS
    assert [s for s, _ in checkpoint.list_checkpoints(ckpt)[0]] == [STEPS - SAVE_EVERY, STEPS]
