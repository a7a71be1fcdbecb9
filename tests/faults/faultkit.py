"""Helpers of the fault-injection suite (fixtures are in conftest.py; see its docstring).

    from faultkit import fault_env, wait_held, release, ...   # tests/faults is on sys.path
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # atpo_cli

from atpo_cli import finish_atpo, read_metrics, run_atpo, start_atpo  # noqa: E402,F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "embedded_smollm2.yaml"
INJECTOR = Path(__file__).parent / "inject"
REFERENCE_STEPS = 4
# What must agree, step by step, between a run that met a transient fault and one that did not.
SAME_KEYS = ("actor/loss", "actor/grad_norm", "actor/input_tokens", "actor/log_ratio_abs_mean",
             "rollout/reward_mean", "rollout/generated_tokens", "rollout/leaves", "rollout/search_queries")


def fault_env(*faults: dict) -> dict[str, str]:
    """The environment of a child run with ``faults`` armed (an empty tuple arms none)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(INJECTOR), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["ATPO_FAULTS"] = json.dumps(list(faults))
    return env


def wait_held(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    """The pid of the process the injector holds in ``folder``; fails with the run's output if it exits first."""
    deadline = time.monotonic() + timeout
    while not (folder / "held").exists():
        if proc.poll() is not None:
            result = finish_atpo(proc, check=False)
            pytest.fail(f"the run ended (exit {result.returncode}) before reaching the fault:\n{result.stderr[-4000:]}")
        assert time.monotonic() < deadline, "the run did not reach the fault in time"
        time.sleep(0.05)
    return int((folder / "held").read_text())


def release(folder: Path) -> None:
    (folder / "release").touch()


def latest(run_dir: Path) -> int | None:
    marker = run_dir / "checkpoints" / "latest"
    return int(marker.read_text()) if marker.is_file() else None


def assert_same_steps(run: dict[int, dict], reference: dict[int, dict], steps) -> None:
    for step in steps:
        for key in SAME_KEYS:
            assert run[step][key] == reference[step][key], (step, key, run[step][key], reference[step][key])


def assert_same_checkpoint(a: Path, b: Path) -> dict:
    """Every model weight, Adam moment, optimizer step and scheduler field of two checkpoints is equal
    (tests/dist/test_checkpoint_dist.py's comparison, in a process of its own)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "dist" / "test_checkpoint_dist.py"), "--compare",
                           str(a), str(b)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    """Give ``dst_run`` the checkpoint of ``step`` of ``src_run`` as its latest (a run to resume)."""
    src = src_run / "checkpoints" / f"step_{step:06d}"
    dst = dst_run / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copytree(src, dst / src.name)
    (dst / "latest").write_text(f"{step}\n")


def fails_in_one_line_per_rank(result, ranks: int = 1, same: bool = True) -> list[str]:
    """The ``atpo train: ...`` error lines of a failed run: one per rank (identical if ``same``), and no
    traceback from a rank (torchrun's own report of a failed child is allowed)."""
    lines = [line for line in result.stderr.splitlines()
             if line.startswith(("atpo train: error: ", "atpo train: configuration error: "))]
    assert result.returncode != 0 and len(lines) == ranks, result.stderr[-4000:]
    assert not same or len(set(lines)) == 1, lines
    rank_tracebacks = [line for line in result.stderr.splitlines() if line.startswith("[rank") and "Traceback" in line]
    assert rank_tracebacks == [], result.stderr[-4000:]
    if ranks == 1:
        assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return lines


@contextlib.contextmanager
def tiny_http_server(answer: Callable[[bytes], tuple[str, bytes]]) -> Iterator[str]:
    """A real HTTP server on a free loopback port that answers every GET and POST with HTTP 200 and
    ``answer(request_body) -> (content_type, body)`` (a slow retriever, one answering garbage, ...).
    Yields its ``/retrieve`` URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._reply(b"")

        def do_POST(self):
            self._reply(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def _reply(self, request: bytes):
            content_type, body = answer(request)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    finally:
        server.shutdown()
        server.server_close()
