"""Run the ``atpo`` CLI in a subprocess and read back what a run wrote (integration-test helpers).

    from atpo_cli import run_atpo, read_metrics, exported_weights   # tests/integration is on sys.path
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file


def run_atpo(args: Sequence[str], cwd: Path, *, timeout: float = 600, check: bool = True,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m atpo_megatron.cli ARGS`` with one thread per rank; stdout and stderr captured.

    It runs in its own session and the whole group is killed afterwards: the ranks catch SIGTERM
    and torchrun's children would outlive a timeout. ``check``: assert exit 0, with the output's tail.
    """
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "atpo_megatron.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert result.returncode == 0, out[-2000:] + err[-6000:]
    return result


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """``metrics.jsonl`` of a run, by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder``."""
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's latest checkpoint, exported with ``atpo convert --to-hf`` and loaded."""
    out = run_dir / "hf_final"
    run_atpo(["convert", "--to-hf", run_dir / "checkpoints", out], run_dir.parent)
    return load_safetensors(out)
