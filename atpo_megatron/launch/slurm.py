"""Render and submit SLURM batch scripts for ``atpo train``.

    atpo submit examples/llama3_70b.yaml --nodes 8 --gpus-per-node 8 --partition batch \\
        --time 04:00:00 --dry-run                      # print the script
    atpo submit examples/llama3_70b.yaml --nodes 8 --gpus-per-node 8 train.steps=500   # sbatch it

One script per job: ``srun`` starts one ``torchrun`` per node, all of them meeting at a c10d
rendezvous on the job's first node (``scontrol show hostnames``); each torchrun starts one rank per
GPU (or ``--nproc-per-node`` ranks on CPU nodes, which then use gloo). Every rank runs
``atpo train CONFIG [key=value ...]``.

Preemption and time limits: the script asks for ``--signal=B:USR1@<seconds>`` and ``--requeue``.
SLURM sends USR1 to the batch shell only; its trap touches ``$ATPO_STOP_FILE`` (on the shared file
system, beside the job's log). Every rank checks that file after each step
(``launch.preemption.PreemptionHandler.should_stop``), the ranks agree to stop, save a checkpoint
and ``scontrol requeue`` the job, which restarts with ``SLURM_RESTART_COUNT`` + 1 and resumes from
the checkpoint (``checkpoint.resume=auto``). Choose ``signal_seconds`` larger than one training step
plus one checkpoint save (70B: minutes). The signal is deliberately not relayed to the job step:
SLURM delivers a step signal to every process of the step, and helper processes (the checkpoint
writer's multiprocessing manager, data-loader and inference workers) die of USR1's default action;
seen here as ``BrokenPipeError`` in the next ``dist_checkpointing.save``. torchrun itself runs with
USR1 ignored, so a stray ``scancel --signal=USR1`` (without ``--batch``) cannot kill it.

Before rendering, a GPU job is planned (``atpo plan``, :mod:`atpo_megatron.plan`): a layout that
does not fit its GPUs is refused with the numbers (``force=True`` / ``--force`` renders it anyway),
and the plan is printed into the job's log at every (re)start. ``--launcher nemo-run`` submits the
same job through nemo-run's SlurmExecutor instead (:mod:`atpo_megatron.launch.nemo`).

The config is read again at every (re)start: do not edit the YAML of a queued or running job.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import ConfigError, UserError, load_config
from ..plan.command import add_plan_options


class SlurmError(UserError, ValueError):
    """A job that cannot be rendered or submitted as asked; the message says what to change."""


# NCCL / CUDA settings for GPU jobs. `${VAR:-default}`: a value set where you submit wins.
NCCL_ENV = (
    ("NCCL_SOCKET_IFNAME", "^lo,docker0", "bootstrap/socket traffic: any interface but loopback/docker"),
    ("NCCL_IB_HCA", "mlx5", "InfiniBand adapters to use (ibv_devices lists them)"),
    ("NCCL_IB_TIMEOUT", "22", "IB verbs timeout exponent; higher survives congested fabrics"),
    ("NCCL_IB_DISABLE", "0", "1 falls back to sockets (no InfiniBand)"),
    ("NCCL_DEBUG", "WARN", "INFO prints the topology and transports chosen"),
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1", "a failed/hung collective aborts the rank instead of hanging the job"),
    ("TORCH_NCCL_AVOID_RECORD_STREAMS", "1", "free NCCL buffers without record_stream (less memory)"),
)
# Megatron's TP/SP communication overlap relies on kernels reaching the GPU in launch order.
CUDA_DEVICE_MAX_CONNECTIONS = "1"


def parse_time_limit(text: str) -> int:
    """SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SlurmError(f"--time {text!r} is not a SLURM time limit; use HH:MM:SS, D-HH:MM:SS or minutes")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def _check_allocation(cfg_path, overrides, nodes: int, nproc: int, gpus_per_node: int):
    """Load the config and check that its parallel layout fits nodes x ranks-per-node."""
    try:
        cfg = load_config(cfg_path, list(overrides))
    except ConfigError as exc:
        raise SlurmError(f"config {cfg_path}: {exc}") from exc
    world = nodes * nproc
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    unit = "GPUs" if gpus_per_node else "ranks"
    if tp * pp > world or world % (tp * pp):
        raise SlurmError(
            f"the config asks for parallel.tp * parallel.pp = {tp}*{pp} = {tp * pp} {unit} per model "
            f"replica, but the allocation has nodes * {'gpus_per_node' if gpus_per_node else 'nproc_per_node'} "
            f"= {nodes}*{nproc} = {world} {unit}, which {'is fewer' if tp * pp > world else 'it does not divide'}; "
            f"ask for a multiple of {tp * pp} {unit} (e.g. --nodes {-(-tp * pp // nproc)}) or lower tp/pp"
        )
    try:
        cfg.parallel.validate_world(world)
    except ConfigError as exc:
        raise SlurmError(str(exc)) from exc
    r = cfg.rollout
    if r.engine == "vllm" and (r.tp_size > nproc or nproc % r.tp_size):
        raise SlurmError(
            f"rollout.tp_size={r.tp_size} must divide the {nproc} {unit} of one node (the inference "
            f"engine's tensor parallelism stays within a node); lower rollout.tp_size"
        )
    return cfg


def checked_plan(cfg_path: str | Path, overrides: Sequence[str], *, nodes: int, gpus_per_node: int,
                 plan: Mapping[str, Any] | None = None, force: bool = False) -> str:
    """Plan the job (``plan``: gpu, fs_gbps, host_memory_gib) and return the plan's text; a plan
    that does not fit raises :class:`SlurmError` with its numbers unless ``force``."""
    from ..plan.command import plan_for, render, verdict_line

    result = plan_for(str(cfg_path), overrides, nodes=nodes, gpus_per_node=gpus_per_node, **dict(plan or {}))
    if result.verdict == "does not fit" and not force:
        fix = f"; would fit with {result.suggestions[0]}" if result.suggestions else ""
        raise SlurmError(f"the plan says this job does not fit: {verdict_line(result)}{fix}. `atpo plan {cfg_path} "
                         f"--nodes {nodes} --gpus-per-node {gpus_per_node}` prints the breakdown; --force "
                         f"submits anyway")
    return render(result)


def job_environment(run_dir: Path, ckpt: Path | None, out_dir: Path, *, gpus_per_node: int,
                    cpus_per_task: int | None, nproc: int) -> list[str]:
    """The shell lines every launcher runs in the batch shell before the ranks start: where the run
    and its checkpoints live, the preemption stop file, and NCCL/CUDA (GPU) or OpenMP (CPU)."""
    q = shlex.quote
    lines = [f"export ATPO_RUN_DIR={q(str(run_dir))}"]
    if ckpt is not None:
        lines.append(f"export ATPO_CHECKPOINT_DIR={q(str(ckpt))}")
    lines += [f'export ATPO_STOP_FILE="{out_dir}/stop-$SLURM_JOB_ID"',
              'rm -f "$ATPO_STOP_FILE"  # left by the previous run of a requeued job']
    if gpus_per_node:
        lines += ["", "# --- NCCL / CUDA (a value already set in the submitting environment wins)"]
        for var, default, why in NCCL_ENV:
            lines.append(f"export {var}=${{{var}:-{default}}}  # {why}")
        lines.append(f"export CUDA_DEVICE_MAX_CONNECTIONS={CUDA_DEVICE_MAX_CONNECTIONS}  "
                     f"# megatron: TP comm/compute overlap needs in-order kernel launch")
    elif cpus_per_task:
        lines.append(f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{max(1, cpus_per_task // nproc)}}}")
    return lines


def plan_lines(plan_text: str | None) -> list[str]:
    """Shell lines that print the job's plan into its log (at every start and restart)."""
    if plan_text is None:
        return []
    return ["", "# --- the plan this job was submitted with (atpo plan), printed into the log at every start",
            "cat <<'ATPO_PLAN'", *plan_text.rstrip("\n").splitlines(), "ATPO_PLAN"]


# SLURM sends USR1 to the batch shell only (--signal=B:USR1@...): the ranks watch this file.
USR1_TRAP = ("trap 'echo \"[atpo] USR1 at $(date +%T): asking the ranks to save and requeue\"; "
             "touch \"$ATPO_STOP_FILE\"' USR1")


def ranks_per_node(nodes: int, gpus_per_node: int, nproc_per_node: int | None, time: str,
                   signal_seconds: int) -> int:
    """Check the allocation options; return the ranks each node starts."""
    if nodes < 1:
        raise SlurmError(f"--nodes {nodes}: need at least one node")
    if gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node {gpus_per_node} must be >= 0 (0 = a CPU job)")
    if gpus_per_node == 0 and not nproc_per_node:
        raise SlurmError("a CPU job (--gpus-per-node 0) needs --nproc-per-node: how many ranks per node")
    if gpus_per_node and nproc_per_node not in (None, gpus_per_node):
        raise SlurmError(f"--nproc-per-node {nproc_per_node} with --gpus-per-node {gpus_per_node}: "
                         f"GPU jobs run one rank per GPU; drop --nproc-per-node")
    limit = parse_time_limit(time)
    if not 0 < signal_seconds < limit:
        raise SlurmError(f"--signal-seconds {signal_seconds} must be between 0 and the time limit "
                         f"{time} ({limit} s): the job needs that warning to save before it is killed")
    return nproc_per_node or gpus_per_node


@dataclass(frozen=True)
class Job:
    """What a launcher needs to know about a checked job."""

    run_dir: Path
    checkpoint_dir: Path
    out_dir: Path
    """Where SLURM (or nemo-run's srun) logs go and the preemption stop file lives."""
    plan_text: str | None
    """The plan printed into the job's log (GPU jobs)."""


def prepare_job(cfg_path: str | Path, overrides: Sequence[str], *, nodes: int, nproc: int, gpus_per_node: int,
                output_dir: str | Path | None = None, plan: Mapping[str, Any] | None = None,
                force: bool = False) -> Job:
    """Check the config against the allocation, plan a GPU job (refusing one that does not fit
    unless ``force``), and say where its run, checkpoints and logs go."""
    from ..checkpoint import checkpoint_dir

    cfg = _check_allocation(cfg_path, overrides, nodes, nproc, gpus_per_node)
    plan_text = None
    if gpus_per_node:
        plan_text = checked_plan(cfg_path, overrides, nodes=nodes, gpus_per_node=gpus_per_node, plan=plan,
                                 force=force)
    run_dir = Path(cfg.logging.run_dir)
    return Job(run_dir, checkpoint_dir(cfg), Path(output_dir) if output_dir else run_dir / "slurm", plan_text)


def render_sbatch(
    cfg_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    partition: str | None = None,
    time: str = "04:00:00",
    account: str | None = None,
    job_name: str = "atpo",
    nproc_per_node: int | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    signal_seconds: int = 300,
    output_dir: str | Path | None = None,
    workdir: str | Path | None = None,
    setup: Sequence[str] = (),
    exclusive: bool | None = None,
    sbatch_args: Sequence[str] = (),
    program: Sequence[str] | None = None,
    master_port: int | None = None,
    plan: Mapping[str, Any] | None = None,
    force: bool = False,
) -> str:
    """The text of an sbatch script that runs ``atpo train cfg_path overrides`` on the allocation.

    nodes, gpus_per_node: the allocation; ``gpus_per_node=0`` makes a CPU job whose ranks per node
        come from ``nproc_per_node`` (gloo). With GPUs, one rank per GPU.
    cfg_path: the YAML config (validated here: tp*pp must divide nodes*ranks_per_node). None renders
        a generic script that takes the config and overrides as its own arguments
        (``sbatch script.sbatch CONFIG key=value ...``), unvalidated.
    partition, account, time, job_name, cpus_per_task, mem: the usual #SBATCH options.
    signal_seconds: SLURM sends USR1 this many seconds before the time limit (save + requeue).
    output_dir: where SLURM writes ``<job_name>-<jobid>.out``; default ``<logging.run_dir>/slurm``.
    workdir: ``--chdir`` (default: the folder sbatch is run from).
    setup: shell lines run first on the batch node and inherited by every rank (module load,
        ``source .venv/bin/activate``, exports).
    exclusive: whole nodes (default: yes for GPU jobs, no for CPU jobs).
    sbatch_args: more ``#SBATCH`` options verbatim, e.g. ``("--qos=high", "--constraint=h100")``.
    program: what torchrun runs on every rank instead of ``atpo train ...`` (tests use a toy loop).
    plan, force: a GPU job with a config is planned first (:func:`checked_plan`; ``plan`` holds its
        gpu, fs_gbps and host_memory_gib); the plan goes into the script, which prints it.
    """
    nproc = ranks_per_node(nodes, gpus_per_node, nproc_per_node, time, signal_seconds)
    if cfg_path is not None:
        job = prepare_job(cfg_path, overrides, nodes=nodes, nproc=nproc, gpus_per_node=gpus_per_node,
                          output_dir=output_dir, plan=plan, force=force)
        run_dir, ckpt, out_dir, plan_text = job.run_dir, job.checkpoint_dir, job.out_dir, job.plan_text
        train_args = ["train", str(cfg_path), *overrides]
    else:
        if overrides:
            raise SlurmError("overrides need a config path (cfg_path=None takes both from the script's arguments)")
        run_dir, ckpt, train_args, plan_text = Path("runs/atpo"), None, None, None
        out_dir = Path(output_dir) if output_dir else run_dir / "slurm"
    if exclusive is None:
        exclusive = gpus_per_node > 0
    options = sbatch_options(job_name=job_name, nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
                             mem=mem, time=time, partition=partition, account=account, out_dir=out_dir,
                             signal_seconds=signal_seconds, exclusive=exclusive, workdir=workdir,
                             sbatch_args=sbatch_args)
    lines = ["#!/bin/bash",
             "# Generated by atpo_megatron.launch.slurm.render_sbatch (`atpo submit`).",
             *[f"#SBATCH {a}" for a in options],
             "",
             "set -euo pipefail"]
    lines += plan_lines(plan_text)
    if setup:
        lines += ["", "# --- environment setup", *setup]
    lines += ["", *job_environment(run_dir, ckpt, out_dir, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
                                   nproc=nproc)]
    if program is not None:
        command = " ".join(shlex.quote(str(a)) for a in program)
    elif train_args is not None:
        command = "atpo " + " ".join(shlex.quote(a) for a in train_args)
    else:
        command = 'atpo train "$@"'
    return "\n".join(lines + launch_lines(nproc, master_port, command))


def sbatch_options(*, job_name: str, nodes: int, gpus_per_node: int, cpus_per_task: int | None, mem: str | None,
                   time: str, partition: str | None, account: str | None, out_dir: Path, signal_seconds: int,
                   exclusive: bool, workdir: str | Path | None, sbatch_args: Sequence[str]) -> list[str]:
    """The ``#SBATCH`` options of a job (see :func:`render_sbatch`): USR1 before the limit, requeue-able."""
    sb = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if gpus_per_node:
        sb.append(f"--gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        sb.append(f"--cpus-per-task={cpus_per_task}")
    if mem:
        sb.append(f"--mem={mem}")
    sb.append(f"--time={time}")
    if partition:
        sb.append(f"--partition={partition}")
    if account:
        sb.append(f"--account={account}")
    sb += [f"--output={out_dir}/%x-%j.out", "--open-mode=append",
           f"--signal=B:USR1@{signal_seconds}", "--requeue"]
    if exclusive:
        sb.append("--exclusive")
    if workdir:
        sb.append(f"--chdir={workdir}")
    return sb + list(sbatch_args)


def launch_lines(nproc: int, master_port: int | None, command: str) -> list[str]:
    """The batch script's body after its environment: rendezvous on the first node, the USR1 trap, one
    torchrun per node running ``command`` on every rank, and a wait that survives trapped signals."""
    port = str(master_port) if master_port else "$((20000 + SLURM_JOB_ID % 20000))"
    return [
        "",
        "# --- rendezvous on the first node of the allocation",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT=${{MASTER_PORT:-{port}}}",
        "export MASTER_ADDR MASTER_PORT",
        'echo "[atpo] job $SLURM_JOB_ID restart_count=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NUM_NODES'
        ' rendezvous=$MASTER_ADDR:$MASTER_PORT start=$(date +%FT%T)"',
        "",
        "# --- preemption: SLURM sends USR1 to this shell before the time limit (--signal=B:USR1@...).",
        "# The ranks look for the stop file after every step; they save, then `scontrol requeue` the job.",
        "# (Not relayed as a signal: a step signal reaches every process of the step, helpers included.)",
        USR1_TRAP,
        "",
        "# One torchrun per node, with USR1 ignored (its default action would kill torchrun).",
        'srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \\',
        "  bash -c 'trap \"\" USR1; exec \"$@\"' atpo-node \\",
        '  torchrun --nnodes="$SLURM_JOB_NUM_NODES" ' f"--nproc-per-node={nproc} "
        '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \\',
        "    --max-restarts=0 --no-python \\",
        f"    {command} &",
        "SRUN_PID=$!",
        "# A trapped signal interrupts `wait`; keep waiting until srun itself has exited.",
        "while :; do",
        '  rc=0; wait "$SRUN_PID" || rc=$?',
        '  kill -0 "$SRUN_PID" 2>/dev/null || break',
        "done",
        'echo "[atpo] srun exited with $rc at $(date +%FT%T)"',
        'exit "$rc"',
        "",
    ]


def submit(
    cfg_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    script_path: str | Path | None = None,
    sbatch: str = "sbatch",
    **render_kwargs,
) -> str:
    """Render the script, write it beside the job's output, create the output folder, and
    ``sbatch --parsable`` it. Returns the job id. Options as :func:`render_sbatch`."""
    text = render_sbatch(cfg_path, overrides, **render_kwargs)
    out_line = next(line for line in text.splitlines() if line.startswith("#SBATCH --output="))
    out_dir = Path(out_line.split("=", 1)[1]).parent
    workdir = render_kwargs.get("workdir")
    if workdir and not out_dir.is_absolute():
        out_dir = Path(workdir) / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create it; a missing one fails silently
    job_name = render_kwargs.get("job_name", "atpo")
    path = Path(script_path) if script_path else out_dir / f"{job_name}.sbatch"
    path.write_text(text)
    if shutil.which(sbatch) is None:
        raise SlurmError(f"`{sbatch}` is not on PATH: run `atpo submit` on a SLURM login node (the "
                         f"script is in {path}; --dry-run prints it without submitting)")
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch rejected {path} (exit {proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch --parsable printed {proc.stdout.strip()!r}, not a job id")
    return job_id


# ------------------------------------------------------------------------------------- CLI
def add_submit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``atpo submit CONFIG [key.sub=value ...]``."""
    parser.add_argument("config", help="YAML config of the run")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes (gloo)")
    parser.add_argument("--nproc-per-node", type=int, help="ranks per node on CPU nodes")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", default="04:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--job-name", default="atpo")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--mem")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="USR1 this long before the time limit: save + requeue (> step + save time)")
    parser.add_argument("--output-dir", help="SLURM log folder (default <logging.run_dir>/slurm)")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line run before training, e.g. 'source .venv/bin/activate' (repeatable)")
    parser.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args",
                        help="extra #SBATCH option, e.g. --sbatch-arg=--qos=high (repeatable)")
    parser.add_argument("--no-exclusive", action="store_true", help="share nodes with other jobs")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument("--launcher", choices=["sbatch", "nemo-run"], default="sbatch",
                        help="sbatch our script (default), or submit the same job through nemo-run's "
                             "SlurmExecutor (pip install --no-deps -r requirements/nemo-run.txt)")
    parser.add_argument("--force", action="store_true", help="submit even when the plan says the job does not fit")
    add_plan_options(parser)
    return parser


def submit_main(args: argparse.Namespace) -> int:
    """``atpo submit``: print the script (--dry-run) or submit it and print the job id."""
    kwargs = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
                  partition=args.partition, account=args.account, time=args.time, job_name=args.job_name,
                  cpus_per_task=args.cpus_per_task, mem=args.mem, signal_seconds=args.signal_seconds,
                  output_dir=args.output_dir, setup=args.setup, sbatch_args=args.sbatch_args,
                  exclusive=False if args.no_exclusive else None, force=args.force,
                  plan={"gpu": args.gpu, "fs_gbps": args.fs_gbps, "host_memory_gib": args.host_memory_gib})
    try:
        if args.launcher == "nemo-run":
            from .nemo import submit_nemo

            result = submit_nemo(args.config, args.overrides, dry_run=args.dry_run, **kwargs)
            print(result)
            return 0
        if args.dry_run:
            sys.stdout.write(render_sbatch(args.config, args.overrides, **kwargs))
            return 0
        job_id = submit(args.config, args.overrides, **kwargs)
    except SlurmError as exc:
        print(f"atpo submit: {exc}", file=sys.stderr)
        return 2
    print(job_id)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_submit_arguments(argparse.ArgumentParser(prog="atpo submit", description=__doc__.split("\n\n")[0]))
    return submit_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
