"""Preemption: a SLURM signal becomes "save, requeue, exit" at the next step boundary.

    handler = PreemptionHandler().install()        # every rank, before training
    log.info("SLURM restart count %d", handler.restart_count)
    for step in ...:
        train_one_step()
        if handler.should_stop():                  # collective: every rank gets the same answer
            checkpoint.save(...)
            if handler.should_requeue:             # USR1 / stop file = "your time is nearly up"
                handler.requeue()                  # every rank; rank 0 runs `scontrol requeue $SLURM_JOB_ID`
            break

Signals. The sbatch script asks SLURM for ``--signal=B:USR1@<seconds>`` before the time limit. The
batch shell traps it and touches ``$ATPO_STOP_FILE`` (shared file system), which every rank checks
in ``should_stop()``; the signal is not relayed to the ranks, because a job-step signal reaches
every process of the step and kills helper processes (the checkpoint writer's manager, loader and
inference workers) whose default USR1 action is to exit. A USR1 or SIGTERM sent to a rank directly
is handled too. USR1 and the stop file mean "time is nearly up": save and requeue. SIGTERM
(scancel, or SLURM's own preemption, which requeues by itself) means "stop": save if there is
time, never requeue.

The handler itself only stores the signal number: Python runs it between bytecodes of the main
thread, and anything more (logging, I/O, collectives) could deadlock inside a lock the interrupted
code holds. The agreement across ranks happens later, in ``should_stop()``, where a rank that saw
the signal tells the others through one tiny all-reduce.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import torch

from atpo_megatron import distributed

log = logging.getLogger(__name__)

STOP_FILE_ENV = "ATPO_STOP_FILE"
# What should_stop() all-reduces (MAX): nothing, a stop request, a requeue request.
_NONE, _STOP, _REQUEUE = 0, 1, 2


class PreemptionHandler:
    """Turns SIGUSR1/SIGTERM (and the job script's stop file) into an agreed stop at a step boundary."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM),
                 stop_file: str | Path | None = None):
        self.signals = tuple(signals)
        self.stop_file = Path(stop_file) if stop_file else (
            Path(os.environ[STOP_FILE_ENV]) if os.environ.get(STOP_FILE_ENV) else None)
        self.received: int | None = None
        """The last signal number received (set by the handler, nothing else)."""
        self._decision = _NONE
        self._previous: dict[int, object] = {}

    # ----------------------------------------------------------------------------------- install
    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only); returns self."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Async-signal context: only record the fact.
        self.received = signum

    # ------------------------------------------------------------------------------------- query
    def _local_request(self) -> int:
        if self.received == signal.SIGUSR1:
            return _REQUEUE
        if self.received is not None:
            return _STOP
        if self.stop_file is not None and self.stop_file.exists():
            return _REQUEUE  # the job script touches it when it receives USR1
        return _NONE

    def should_stop(self) -> bool:
        """True on every rank if any rank received a stop signal; collective when distributed.

        Call it on every rank at the same point of every step (after the optimizer step). Once
        True it stays True.
        """
        local = max(self._local_request(), self._decision)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([local], dtype=torch.int32, device=distributed.device())
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            local = int(t.item())
        if local > self._decision:
            self._decision = local
            if _rank() == 0:
                what = "save and requeue" if local == _REQUEUE else "save and stop"
                log.warning("preemption: a rank got %s; %s at this step",
                            _signal_name(self.received) if self.received else "the stop file", what)
        return self._decision != _NONE

    @property
    def should_requeue(self) -> bool:
        """Whether the agreed stop asks to requeue (USR1 / stop file), not just stop (SIGTERM)."""
        return self._decision == _REQUEUE

    # ----------------------------------------------------------------------------------- requeue
    @property
    def job_id(self) -> str | None:
        return os.environ.get("SLURM_JOB_ID")

    @property
    def restart_count(self) -> int:
        """How many times SLURM has restarted this job (``SLURM_RESTART_COUNT``; 0 on the first run)."""
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)

    def requeue(self) -> bool:
        """Rank 0 asks SLURM to requeue this job (it is then killed and queued again).

        Call it on every rank, after the checkpoint save. It first commits an async checkpoint
        that is still being written (collective), because the requeue kills the job and an
        uncommitted checkpoint would be ignored on restart. Returns True if a requeue was
        requested; False outside SLURM (nothing to requeue: the caller just exits).
        """
        ckpt = sys.modules.get("atpo_megatron.checkpoint")
        if ckpt is not None and ckpt.pending_async_saves():  # same answer on every rank
            ckpt.finalize_async_saves(blocking=True)
        if _rank() != 0:
            return self.job_id is not None
        if self.job_id is None:
            log.warning("preemption: not running under SLURM (no SLURM_JOB_ID); not requeueing")
            return False
        cmd = ["scontrol", "requeue", self.job_id]
        log.warning("preemption: %s (restart %d -> %d)", " ".join(cmd), self.restart_count,
                    self.restart_count + 1)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}; the "
                f"checkpoint is saved, so resubmit the job (sbatch the same script) to resume. "
                f"Jobs need --requeue and a partition that allows requeueing.")
        return True


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
