"""`atpo submit --launcher nemo-run` on a real one-node SLURM cluster: the job nemo-run submits is
the one the sbatch path renders (environment, plan, USR1 signal, requeue), and its preemption works.

The job is `atpo train` on the tiny Llama, 2 gloo ranks on one CPU node (DP=2), submitted through
nemo-run's SlurmExecutor with its torchrun launcher. After step 1 the test sends the batch shell USR1
(what ``--signal=B:USR1@T`` does); the trap touches the stop file although nemo-run's script runs
srun in the foreground (launch/nemo.py's srun shim), the ranks save and `scontrol requeue` the job,
and SLURM counts one restart. The rest (the requeued run resuming to the uninterrupted result) is the
sbatch path's test (test_slurm.py); here the job is cancelled once requeued.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

from atpo_megatron import checkpoint
from atpo_megatron.env.retriever import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.dist]
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/embedded_smollm2.yaml"
SETUP = [f"export PATH={Path(sys.executable).parent}:$PATH", f"export PYTHONPATH={ROOT}",
         "export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1"]


def _job_files(run_dir: Path) -> dict[str, str]:
    """nemo-run's files of the job: its sbatch script, the batch shell's log and the rank logs."""
    found = {}
    for path in sorted((run_dir / "nemo-run").rglob("*")):
        if path.is_file() and (path.name.endswith("_sbatch.sh") or path.suffix == ".out"):
            found[path.name] = path.read_text(errors="replace")
    return found


def test_nemo_run_submits_the_same_job_and_usr1_requeues_it(slurm_cluster, tmp_path, monkeypatch, tiny_llama_dir,
                                                             tiny_run):
    pytest.importorskip("nemo_run", reason="pip install --no-deps -r requirements/nemo-run.txt")
    from atpo_megatron.launch.nemo import submit_nemo

    run_dir = tmp_path / "run"
    shutil.copy(CONFIG, tmp_path / "job.yaml")  # a path relative to the submitting folder, as users give it
    overrides = [f"model.name_or_path={tiny_llama_dir}", "train.steps=3", f"logging.run_dir={run_dir}",
                 f"data.embedded_dir={tmp_path / 'task'}", *tiny_run, "logging.eval_every=0",
                 "logging.save_tree_pictures=false", "checkpoint.save_every=3"]
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.chdir(tmp_path)  # submitted from the folder that holds job.yaml
    job = submit_nemo("job.yaml", overrides, nodes=1, gpus_per_node=0, nproc_per_node=2, cpus_per_task=slurm_cluster.cpus,
                      time="20", signal_seconds=120, job_name="atpo-nemo", setup=SETUP,
                      master_port=free_port())

    script = next(text for name, text in _job_files(run_dir).items() if name.endswith("_sbatch.sh"))
    for line in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                 f'export ATPO_STOP_FILE="{run_dir}/slurm/stop-$SLURM_JOB_ID"', "export OMP_NUM_THREADS=",
                 "touch \"$ATPO_STOP_FILE\"' USR1", "srun() {", "--nnodes 1 --nproc-per-node 2",
                 "-m atpo_megatron.cli train job.yaml", f"--chdir {tmp_path} torchrun"):
        assert line in script, (line, script[-3000:])

    slurm_cluster.wait_for(job, "RUNNING", timeout=300, predicate=lambda: (run_dir / "metrics.jsonl").is_file())
    slurm_cluster.signal_batch(job, "USR1")
    slurm_cluster.wait_for(job, "PENDING", "RUNNING", "REQUEUED", timeout=300,
                           predicate=lambda: slurm_cluster.job(job).get("Restarts") == "1")
    slurm_cluster.run("scancel", job)
    logs = "\n".join(_job_files(run_dir).values())
    assert "[atpo] USR1 at" in logs, logs[-4000:]
    committed = {int(m) for m in re.findall(r"stop requested: checkpoint of step (\d+) committed", logs)}
    assert len(committed) == 1 and 1 <= committed.pop() < 3, logs[-4000:]
    assert "preemption: scontrol requeue" in logs
    assert checkpoint.find_latest(run_dir / "checkpoints") is not None
