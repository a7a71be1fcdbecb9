"""``atpo submit --launcher nemo-run``: the job ``render_sbatch`` describes, submitted through nemo-run.

    atpo submit examples/llama3_70b.yaml --nodes 8 --gpus-per-node 8 --launcher nemo-run [--dry-run]

nemo-run's ``SlurmExecutor`` (through a ``LocalTunnel``: sbatch on this machine) with its torchrun
launcher: one ``torchrun`` per node starting ``--nproc-per-node`` ranks, a c10d rendezvous on the
first node, every rank running ``python -m atpo_megatron.cli train CONFIG [key=value ...]`` in the
submitting folder. The job gets what the sbatch path gives it: the plan (refused when it does not
fit, printed into the log), ``--signal=B:USR1@<seconds>`` and ``--requeue``, the ATPO_* and
NCCL/CUDA (or OpenMP) environment and the USR1 trap that touches the stop file
(``slurm.job_environment``, ``slurm.USR1_TRAP``), then the ``--setup`` lines.

One difference needs a shim. nemo-run's batch script runs ``srun`` in the foreground, and bash runs
a trap only once the foreground command has ended: the USR1 of ``--signal=B:USR1@T`` would wait
for the whole job. The setup lines therefore define a shell function ``srun`` that starts the real
one in the background and waits for it, as ``render_sbatch``'s script does; a trapped signal
interrupts ``wait``, the trap touches the stop file, and the ranks save and requeue.

nemo-run keeps its files under ``<logging.run_dir>/nemo-run`` (its NEMORUN_HOME): per submission
``experiments/<job>/<job>_<id>/train/`` holds the sbatch script (``*_sbatch.sh``), the batch shell's
log (``sbatch_*.out``) and each start's rank output (``log-*_<restart count>.out``). Needs
``pip install --no-deps -r requirements/nemo-run.txt``.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from .slurm import SlurmError, USR1_TRAP, job_environment, plan_lines, prepare_job, ranks_per_node

# nemo-run's script runs srun in the foreground, where bash defers traps until it ends: run it in
# the background and wait (a trapped signal interrupts `wait`), as render_sbatch's script does.
SRUN_IN_BACKGROUND = """\
srun() {
  command srun "$@" &
  local pid=$! rc=0
  while :; do
    rc=0; wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || return "$rc"
  done
}"""


def _sbatch_parameters(sbatch_args: Sequence[str]) -> dict[str, Any]:
    """``--key=value`` / ``--flag`` options as nemo-run's ``additional_parameters``."""
    params: dict[str, Any] = {}
    for arg in sbatch_args:
        if not arg.startswith("--"):
            raise SlurmError(f"--sbatch-arg {arg!r}: give it as --name=value or --flag for --launcher nemo-run")
        key, _, value = arg[2:].partition("=")
        params[key.replace("-", "_")] = value or True
    return params


def submit_nemo(
    cfg_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    dry_run: bool = False,
    nodes: int = 1,
    gpus_per_node: int = 8,
    nproc_per_node: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    time: str = "04:00:00",
    job_name: str = "atpo",
    cpus_per_task: int | None = None,
    mem: str | None = None,
    signal_seconds: int = 300,
    output_dir: str | Path | None = None,
    workdir: str | Path | None = None,
    setup: Sequence[str] = (),
    exclusive: bool | None = None,
    sbatch_args: Sequence[str] = (),
    master_port: int | None = None,
    plan: Mapping[str, Any] | None = None,
    force: bool = False,
) -> str:
    """Submit ``atpo train cfg_path overrides`` with nemo-run; options as ``slurm.render_sbatch``.
    Returns the SLURM job id (``dry_run``: nemo-run prints its script and nothing is submitted)."""
    try:
        import nemo_run as run
        from nemo_run.config import set_nemorun_home
    except ImportError as exc:
        raise SlurmError(f"--launcher nemo-run needs nemo-run ({exc}); install it with `pip install --no-deps "
                         f"-r requirements/nemo-run.txt`, or use the default --launcher sbatch") from exc
    nproc = ranks_per_node(nodes, gpus_per_node, nproc_per_node, time, signal_seconds)
    job = prepare_job(cfg_path, overrides, nodes=nodes, nproc=nproc, gpus_per_node=gpus_per_node,
                      output_dir=output_dir, plan=plan, force=force)
    workdir = Path(workdir or os.getcwd()).resolve()
    home = (workdir / job.run_dir / "nemo-run").resolve()  # not .../nemo_run: nemo-run rewrites "/nemo_run"
    out_dir = workdir / job.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)  # the stop file lives there
    env = job_environment(job.run_dir, job.checkpoint_dir, job.out_dir, gpus_per_node=gpus_per_node,
                          cpus_per_task=cpus_per_task, nproc=nproc)
    setup_lines = [f"cd {shlex.quote(str(workdir))}", *plan_lines(job.plan_text), *setup, *env, USR1_TRAP,
                   SRUN_IN_BACKGROUND]
    port = master_port or "$((20000 + SLURM_JOB_ID % 20000))"  # the same default as render_sbatch's
    exclusive = gpus_per_node > 0 if exclusive is None else exclusive
    set_nemorun_home(str(home))
    executor = run.SlurmExecutor(
        account=account, job_name_prefix=f"{job_name}.", partition=partition, nodes=nodes, ntasks_per_node=nproc,
        gpus_per_node=gpus_per_node or None, cpus_per_task=cpus_per_task, mem=mem, time=time,
        signal=f"B:USR1@{signal_seconds}", exclusive=exclusive or None,
        additional_parameters={"requeue": True, **_sbatch_parameters(sbatch_args)},
        setup_lines="\n".join(setup_lines), srun_args=["--chdir", str(workdir)],
        tunnel=run.LocalTunnel(job_dir=""), packager=run.Packager(),  # "": NEMORUN_HOME/experiments
        launcher=run.Torchrun(rdzv_port=port),
    )
    script = run.Script(path="atpo_megatron.cli", args=["train", str(cfg_path), *overrides], entrypoint="python", m=True)
    # invoke, which runs sbatch and the status commands for the tunnel, copies sys.stdin into each
    # command, and blocks or fails where there is no stdin to read (CI, nohup, pytest).
    stdin = sys.stdin
    try:
        with open(os.devnull) as sys.stdin, run.Experiment(job_name, executor=executor, base_dir=str(home),
                                                           log_level="WARN") as exp:
            exp.add(script, name="train")
            if dry_run:
                exp.dryrun()
                return "dry run: nothing submitted"
            exp.run(detach=True)
            handle = exp.jobs[0].handle
    finally:
        sys.stdin = stdin
    job_id = handle.rsplit("/", 1)[-1]
    if not job_id.isdigit():
        raise SlurmError(f"nemo-run submitted the job but returned the handle {handle!r}, not a SLURM job id")
    return job_id
