"""Run the ``atpo`` CLI in a subprocess and read back what a run wrote (integration-test helpers).

    from atpo_cli import run_atpo, read_metrics, exported_weights   # tests/integration is on sys.path
    proc = start_atpo([...], cwd); ...; result = finish_atpo(proc)   # act on the run while it goes
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: process_tags
from process_tags import kill_tagged, tagged  # noqa: E402


def start_atpo(args: Sequence[str], cwd: Path, *, env: Mapping[str, str] | None = None,
               preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
    """Start ``python -m atpo_megatron.cli ARGS`` with one thread per rank, in its own session, its
    stdout and stderr going to temporary files (a pipe nobody reads could fill and block the run);
    :func:`finish_atpo` waits for it. ``preexec_fn`` runs in the child before the program (limits)."""
    env, tag = tagged({**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "atpo_megatron.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=out, stderr=err, text=True, start_new_session=True, preexec_fn=preexec_fn)
    proc.output_files, proc.tag = (out, err), tag
    return proc


def finish_atpo(proc: subprocess.Popen, *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_atpo` process, then kill its whole process group and every process it
    started elsewhere (torchrun's ranks have sessions of their own; the ranks catch SIGTERM; see
    tests/process_tags.py). ``check``: assert exit 0, with the output's tail. The result holds the
    captured stdout and stderr."""
    try:
        proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_tagged(proc.tag)
    texts = []
    for f in proc.output_files:
        f.seek(0)
        texts.append(f.read())
        f.close()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, *texts)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return result


def run_atpo(args: Sequence[str], cwd: Path, *, timeout: float = 600, check: bool = True,
             env: Mapping[str, str] | None = None,
             preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``python -m atpo_megatron.cli ARGS`` to the end (:func:`start_atpo` then :func:`finish_atpo`)."""
    return finish_atpo(start_atpo(args, cwd, env=env, preexec_fn=preexec_fn), timeout=timeout, check=check)


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
