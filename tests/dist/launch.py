"""Run one function of a python file on N ranks under torchrun and return what each rank returned.

    from launch import run_dist          # tests/dist is on sys.path when pytest collects it

    def worker(tp):                      # runs on every rank; returns something JSON-serialisable
        ...
        return {"max_diff": 1e-6}

    def test_something():
        results = run_dist(__file__, "worker", nproc=2, kwargs={"tp": 2})   # [rank 0's, rank 1's]

Every run gets its own free master port, OMP_NUM_THREADS=1 and a timeout (the whole process group
is killed when it expires). A failing rank fails the call with the tail of the output. Keep the
worker file's top-level imports light: every rank imports it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_dist(path: str | Path, function: str, nproc: int, kwargs: dict | None = None,
             timeout: float = 180.0, env: dict[str, str] | None = None) -> list:
    """Call ``function(**kwargs)`` from the python file ``path`` on ``nproc`` torchrun ranks.

    Returns the per-rank return values (JSON round-tripped), in rank order. Raises AssertionError
    with the output's tail when a rank fails or the run exceeds ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="atpo_dist_") as out_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               __file__, str(Path(path).resolve()), function, json.dumps(kwargs or {}), out_dir]
        child_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                     **(env or {})}
        proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
            output, _ = proc.communicate()
            raise AssertionError(f"{function} on {nproc} ranks timed out after {timeout:.0f} s:\n{output[-6000:]}")
        if proc.returncode != 0:
            raise AssertionError(f"{function} on {nproc} ranks failed (exit {proc.returncode}):\n{output[-6000:]}")
        return [json.loads((Path(out_dir) / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def _main(path: str, function: str, kwargs_json: str, out_dir: str) -> None:
    """Rank entry point: import ``path``, call ``function``, write the result as JSON."""
    spec = importlib.util.spec_from_file_location(f"_dist_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = getattr(module, function)(**json.loads(kwargs_json))
    (Path(out_dir) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _main(*sys.argv[1:])
