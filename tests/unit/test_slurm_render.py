"""sbatch rendering, allocation checks, `atpo submit` arguments, and the PreemptionHandler (one process).

The committed scripts in slurm/ are render_sbatch outputs; regenerate them with
``python tests/unit/test_slurm_render.py --write`` after changing the renderer.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import pytest

from atpo_megatron.launch import PreemptionHandler, SlurmError, add_submit_arguments, render_sbatch, submit_main
from atpo_megatron.launch.slurm import parse_time_limit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "llama3_70b.yaml"


def _sbatch_options(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def test_70b_multinode_script_has_signal_requeue_rdzv_and_counts():
    text = render_sbatch(EXAMPLE, ["train.steps=500"], nodes=8, gpus_per_node=8, partition="batch",
                         account="proj", time="04:00:00", job_name="atpo70b", signal_seconds=600)
    opts = _sbatch_options(text)
    assert opts["nodes"] == "8" and opts["gpus-per-node"] == "8" and opts["ntasks-per-node"] == "1"
    assert opts["signal"] == "B:USR1@600" and "requeue" in opts and opts["open-mode"] == "append"
    assert opts["partition"] == "batch" and opts["account"] == "proj" and opts["time"] == "04:00:00"
    assert opts["output"] == "runs/llama3_70b/slurm/%x-%j.out" and "exclusive" in opts
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert ('torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node=8 --rdzv-backend=c10d '
            '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"') in text
    assert "atpo train " + str(EXAMPLE) + " train.steps=500 &" in text
    assert "srun --kill-on-bad-exit=1" in text
    # USR1 to the batch shell -> stop file (never relayed to the step); torchrun ignores USR1.
    assert """touch \"$ATPO_STOP_FILE\"' USR1""" in text and "kill -USR1" not in text
    assert 'export ATPO_STOP_FILE="runs/llama3_70b/slurm/stop-$SLURM_JOB_ID"' in text
    assert "trap \"\" USR1; exec \"$@\"" in text
    for var in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        assert f"export {var}=${{{var}:-" in text
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    assert "export ATPO_CHECKPOINT_DIR=runs/llama3_70b/checkpoints" in text


def test_cpu_job_uses_nproc_flag_and_no_gpu_lines():
    text = render_sbatch(None, nodes=2, gpus_per_node=0, nproc_per_node=3, cpus_per_task=6, time="10")
    opts = _sbatch_options(text)
    assert "gpus-per-node" not in opts and "exclusive" not in opts and opts["cpus-per-task"] == "6"
    assert "--nproc-per-node=3" in text and "NCCL" not in text and "CUDA_DEVICE_MAX_CONNECTIONS" not in text
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}" in text
    assert 'atpo train "$@" &' in text  # generic: config and overrides are the script's arguments


def test_more_gpus_than_allocation_is_a_clear_error():
    with pytest.raises(SlurmError, match=r"tp \* parallel.pp = 4\*4 = 16 GPUs.*1\*8 = 8 GPUs.*--nodes 2"):
        render_sbatch(EXAMPLE, nodes=1, gpus_per_node=8)
    with pytest.raises(SlurmError, match=r"4\*4 = 16 GPUs.*3\*8 = 24 GPUs, which it does not divide"):
        render_sbatch(EXAMPLE, nodes=3, gpus_per_node=8)
    with pytest.raises(SlurmError, match="rollout.tp_size=8 must divide the 4 GPUs"):
        render_sbatch(EXAMPLE, ["parallel.tp=2", "parallel.pp=2"], nodes=2, gpus_per_node=4)
    with pytest.raises(SlurmError, match="unknown key parallel.tpp"):
        render_sbatch(EXAMPLE, ["parallel.tpp=2"], nodes=2, gpus_per_node=8)


@pytest.mark.parametrize("kwargs, message", [
    ({"gpus_per_node": 0}, "needs --nproc-per-node"),
    ({"gpus_per_node": 8, "nproc_per_node": 4}, "one rank per GPU"),
    ({"nodes": 0}, "at least one node"),
    ({"time": "00:04:00", "signal_seconds": 300}, "between 0 and the time limit"),
    ({"time": "soon"}, "not a SLURM time limit"),
])
def test_bad_allocation_options(kwargs, message):
    with pytest.raises(SlurmError, match=message):
        render_sbatch(None, **kwargs)


def test_time_limit_formats():
    assert parse_time_limit("90") == 5400
    assert parse_time_limit("90:30") == 5430
    assert parse_time_limit("04:00:00") == 14400
    assert parse_time_limit("2-04") == 2 * 86400 + 4 * 3600
    assert parse_time_limit("1-00:30") == 86400 + 1800
    assert parse_time_limit("1-00:00:05") == 86405


def test_program_setup_and_extra_sbatch_args():
    text = render_sbatch(None, nodes=1, gpus_per_node=0, nproc_per_node=2, time="5",
                         signal_seconds=60, program=["python", "loop.py", "--out", "a b"],
                         setup=["source .venv/bin/activate"], sbatch_args=["--qos=high"],
                         workdir="/work", master_port=29512, output_dir="/logs")
    opts = _sbatch_options(text)
    assert opts["qos"] == "high" and opts["chdir"] == "/work" and opts["output"] == "/logs/%x-%j.out"
    assert "    python loop.py --out 'a b' &" in text
    assert text.index("source .venv/bin/activate") < text.index("srun ")
    assert "MASTER_PORT=${MASTER_PORT:-29512}" in text


def test_submit_refuses_a_layout_that_does_not_fit_unless_forced(capsys):
    """70B on 2 nodes is DP 1: the optimizer is not sharded over DP and the training state (76 GiB)
    outgrows an 80 GB GPU, not a 141 GB one. The refusal carries the plan's numbers; --force prints
    the script anyway, and the plan goes into it (the job prints it into its log)."""
    parser = add_submit_arguments(argparse.ArgumentParser())
    argv = [str(EXAMPLE), "train.steps=7", "--nodes", "2", "--gpus-per-node", "8", "--partition", "p",
            "--time", "01:00:00", "--dry-run"]
    assert submit_main(parser.parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert "the plan says this job does not fit: DOES NOT FIT: peak" in err and "on H100 SXM 80GB" in err
    assert "--force submits anyway" in err
    assert submit_main(parser.parse_args([*argv, "--gpu", "h200"])) == 0  # 141 GB GPUs hold it
    assert "verdict: FITS" in capsys.readouterr().out
    assert submit_main(parser.parse_args([*argv, "--force"])) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "train.steps=7" in out and "#SBATCH --signal=B:USR1@300" in out
    plan = out[out.index("cat <<'ATPO_PLAN'"):out.index("\nATPO_PLAN\n")]
    assert "on 2 nodes x 8 H100 SXM 80GB" in plan and "verdict: DOES NOT FIT" in plan
    assert out.index("ATPO_PLAN\n") < out.index("srun ")


def test_submit_reports_allocation_error(capsys):
    args = add_submit_arguments(argparse.ArgumentParser()).parse_args(
        [str(EXAMPLE), "--nodes", "1", "--gpus-per-node", "8", "--dry-run"])
    assert submit_main(args) == 2
    assert "16 GPUs per model replica" in capsys.readouterr().err


def test_nemo_run_launcher_plans_first(capsys):
    """--launcher nemo-run checks the same plan before nemo-run is asked for anything."""
    pytest.importorskip("nemo_run", reason="pip install --no-deps -r requirements/nemo-run.txt")
    args = add_submit_arguments(argparse.ArgumentParser()).parse_args(
        [str(EXAMPLE), "--nodes", "2", "--gpus-per-node", "8", "--launcher", "nemo-run", "--dry-run"])
    assert submit_main(args) == 2
    assert "the plan says this job does not fit" in capsys.readouterr().err


def example_scripts() -> dict[str, str]:
    """The scripts committed in slurm/ (regenerate with --write)."""
    return {
        "slurm/llama3_70b.sbatch": render_sbatch(
            "examples/llama3_70b.yaml", nodes=8, gpus_per_node=8, partition="batch", time="04:00:00",
            job_name="atpo-llama3-70b", signal_seconds=600, cpus_per_task=96,
            setup=["source .venv/bin/activate"]),
        "slurm/atpo_1node.sbatch": render_sbatch(
            None, nodes=1, gpus_per_node=8, time="04:00:00", job_name="atpo",
            setup=["source .venv/bin/activate"]),
        "slurm/atpo_multinode.sbatch": render_sbatch(
            None, nodes=4, gpus_per_node=8, time="04:00:00", job_name="atpo",
            setup=["source .venv/bin/activate"]),
        "slurm/atpo_cpu.sbatch": render_sbatch(
            None, nodes=1, gpus_per_node=0, nproc_per_node=2, cpus_per_task=2, time="01:00:00",
            signal_seconds=120, job_name="atpo-cpu", setup=["source .venv/bin/activate"]),
    }


def test_committed_scripts_match_renderer(monkeypatch):
    monkeypatch.chdir(ROOT)
    for rel, text in example_scripts().items():
        assert (ROOT / rel).read_text() == text, f"{rel} is stale: python {__file__} --write"


# ------------------------------------------------------------------------ PreemptionHandler


def test_handler_only_flags_and_usr1_means_requeue():
    with PreemptionHandler() as handler:
        assert not handler.should_stop() and not handler.should_requeue
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received == signal.SIGUSR1
        assert handler.should_stop() and handler.should_requeue
        assert handler.should_stop()  # sticky
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored


def test_sigterm_stops_without_requeue():
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.should_stop() and not handler.should_requeue


def test_stop_file_counts_as_usr1(tmp_path, monkeypatch):
    stop = tmp_path / "stop-42"
    monkeypatch.setenv("ATPO_STOP_FILE", str(stop))
    handler = PreemptionHandler()
    assert not handler.should_stop()
    stop.touch()
    assert handler.should_stop() and handler.should_requeue


def test_restart_count_and_requeue_outside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    handler = PreemptionHandler()
    assert handler.restart_count == 3
    assert handler.requeue() is False  # nothing to requeue


def test_requeue_failure_says_what_to_do(monkeypatch, tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(RuntimeError, match="scontrol requeue 77.*presently disabled.*resubmit"):
        PreemptionHandler().requeue()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        os.chdir(ROOT)
        for rel, text in example_scripts().items():
            Path(rel).write_text(text)
            print("wrote", rel)
