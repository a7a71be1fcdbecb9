"""Shared pieces of the fault-injection suite: real `atpo train` runs of the tiny model, faults from outside.

Every case launches the real CLI (tests/integration/atpo_cli.py) with the TINY_RUN overrides. Faults
come from outside the process where the OS allows it (signals, SIGKILL, a killed retriever, a file-size
limit, a damaged file, bad data); where a fault must hit a precise moment (a signal *during* a save),
the child is started with the test-only injector ``inject/sitecustomize.py`` on its PYTHONPATH, which
holds the named function until the test has acted (see that module).

    pytest -m faults --durations=0
"""

from __future__ import annotations

from pathlib import Path

import pytest

from faultkit import EXAMPLE, REFERENCE_STEPS, REPO, run_atpo


@pytest.fixture(scope="session")
def train_args(request, searching_llama_dir, fault_task):
    """``train_args(run_dir, steps, *overrides)``: `atpo train` of the tiny model that writes search calls
    (tests/conftest.py's ``build_searching_llama``, so the retriever is in the loop of every step) with
    TINY_RUN and room for two calls per trajectory, a checkpoint every step, no eval, raw rewards (so the
    update moves the weights and the Adam state matters on resume, as in tests/integration/test_resume.py),
    one shared task folder."""
    tiny_run = request.config.pluginmanager.get_plugin(str(REPO / "tests" / "conftest.py")).TINY_RUN

    def args(run_dir: Path, steps: int, *extra: str) -> list[str]:
        return ["train", str(EXAMPLE), f"model.name_or_path={searching_llama_dir}", f"train.steps={steps}",
                f"logging.run_dir={run_dir}", f"data.embedded_dir={fault_task}", *tiny_run,
                "rollout.max_response_tokens=160", "checkpoint.save_every=1", "logging.eval_every=0",
                "logging.save_tree_pictures=false", "credit.normalize_leaves=false", *extra]

    return args


@pytest.fixture(scope="session")
def fault_task(tmp_path_factory) -> Path:
    """One generated knowledge-base task folder for every fault run (written by the first run)."""
    return tmp_path_factory.mktemp("fault_task") / "task"


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, train_args) -> Path:
    """The uninterrupted run the faulted ones are compared with: REFERENCE_STEPS steps, a checkpoint each."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_atpo(train_args(run_dir, REFERENCE_STEPS), run_dir.parent)
    return run_dir

