"""Test-only fault injector for the real `atpo train` processes the fault tests launch.

Nothing in atpo_megatron knows about it. A fault test puts this folder first on the child's
PYTHONPATH, so Python's ``site`` imports this module at start-up in every process of the run (the
CLI, torchrun's ranks, the retriever server), and describes the faults in ``ATPO_FAULTS``, a JSON
list of objects:

    {"target": "atpo_megatron.actor.train_step:train_step",   # module:attribute[.attribute]
     "call": 3,               # act on the 3rd call of the target in this process (1-based)
     "action": "hold",        # hold | kill | nan_logprobs
     "rank": 0,               # only on this rank ($RANK, 0 without torchrun); omit = every rank
     "dir": "/tmp/x"}         # hold: where the handshake files go

Actions, taken just before the real target runs:

* ``hold``: write ``<dir>/held`` holding this process's pid, then wait until ``<dir>/release``
  exists (at most 300 s). The test sends its signal, kills the retriever, ... and then releases.
* ``kill``: SIGKILL this process (a rank dies mid-step, as on a node failure).
* ``nan_logprobs``: run the target with the actor's log-probs replaced by NaN (a diverged forward
  pass); the target's own non-finite detection then runs unchanged.

The target is patched right after its module is imported, so the run imports it as usual.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import time
from pathlib import Path

_SPECS = json.loads(os.environ.get("ATPO_FAULTS", "[]"))
_RANK = int(os.environ.get("RANK", "0"))


def _hold(spec: dict, run):
    folder = Path(spec["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "held.tmp").write_text(str(os.getpid()))
    os.replace(folder / "held.tmp", folder / "held")
    deadline = time.monotonic() + 300
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return run()


def _kill(spec: dict, run):
    os.kill(os.getpid(), signal.SIGKILL)


def _nan_logprobs(spec: dict, run):
    import torch

    module = sys.modules[spec["target"].split(":")[0]]
    real = module.vocab_parallel_logprobs_entropy

    def nan_logprobs(*args, **kwargs):
        logp, entropy = real(*args, **kwargs)
        return torch.full_like(logp, float("nan")), entropy

    module.vocab_parallel_logprobs_entropy = nan_logprobs
    try:
        return run()
    finally:
        module.vocab_parallel_logprobs_entropy = real


_ACTIONS = {"hold": _hold, "kill": _kill, "nan_logprobs": _nan_logprobs}


def _wrap(fn, spec: dict):
    calls = 0

    @functools.wraps(fn)
    def faulty(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == spec["call"]:
            return _ACTIONS[spec["action"]](spec, lambda: fn(*args, **kwargs))
        return fn(*args, **kwargs)

    return faulty


def _patch(module, spec: dict) -> None:
    *owners, name = spec["target"].split(":")[1].split(".")
    owner = module
    for attr in owners:
        owner = getattr(owner, attr)
    setattr(owner, name, _wrap(getattr(owner, name), spec))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the targets' modules with the normal path finder and patches them once executed."""

    def __init__(self, specs: list[dict]):
        self.pending: dict[str, list[dict]] = {}
        for spec in specs:
            self.pending.setdefault(spec["target"].split(":")[0], []).append(spec)

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        execute, faults = spec.loader.exec_module, self.pending.pop(name)

        def exec_module(module):
            execute(module)
            for fault in faults:
                _patch(module, fault)

        spec.loader.exec_module = exec_module
        return spec


_mine = [s for s in _SPECS if s.get("rank") in (None, _RANK)]
if _mine:
    sys.meta_path.insert(0, _PatchAfterImport(_mine))
