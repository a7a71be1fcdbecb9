"""When a training run saves, what it resumes from, and the async saves it must commit (after
torchtitan's ``CheckpointManager``); the ``checkpoint`` package does the reading and writing.

    checkpoints = CheckpointManager(cfg)             # start of run: folder writable, resume policy applied
    progress = checkpoints.resume(actor)             # the saved progress dict, or {} on a fresh start
    ...
    checkpoints.finalize()                           # every step: commit finished async writes
    if checkpoints.save_due(step, final, stop):      # the policy, in one place
        checkpoints.save(step, actor, progress)
    checkpoints.close()                              # before exit: commit what is in flight

The policy: a periodic save every ``checkpoint.save_every`` steps and after the ``final`` step (the
last one, or the one that spent ``train.max_generated_tokens``); a stop (preemption) always saves,
even with ``save_every=0``, so that the requeued job resumes from it. The preemption handler decides
"stop"; this object decides "save". Retention (``keep_last``) happens inside each commit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from atpo_megatron import checkpoint
from atpo_megatron.config import Config

log = logging.getLogger("atpo.train")


class CheckpointManager:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir: Path = checkpoint.checkpoint_dir(cfg)
        saves = cfg.checkpoint.save_every > 0 or cfg.checkpoint.resume == "required"
        self.resume_from: Path | None = None
        """The checkpoint folder this run starts from (None = fresh)."""
        if saves or self.dir.is_dir():  # a folder from `atpo convert --from-hf` needs no saving
            self.resume_from = checkpoint.prepare(self.dir, cfg.checkpoint.resume)

    def resume(self, actor: Any) -> dict[str, Any]:
        """Load ``resume_from`` into the actor; returns the saved progress (``step`` included), or {}.

        A folder of initial weights (``atpo convert --from-hf``: no optimizer state) gives the weights
        only: fresh optimizer, step 0."""
        if self.resume_from is None:
            return {}
        if checkpoint.read_record(self.resume_from).get("optim_sharding") is None:
            checkpoint.load(self.dir, actor.models, path=self.resume_from)
            log.info("initial weights from %s (weights only: fresh optimizer, step 0)", self.resume_from)
            return {}
        resumed = checkpoint.load(self.dir, actor.models, actor.optimizer, actor.scheduler, path=self.resume_from)
        log.info("resumed from %s at step %d", self.resume_from, resumed.step)
        return {"step": resumed.step, **resumed.extra}

    def save_due(self, step: int, final: bool, stop: bool) -> bool:
        """Save after ``step``? Every ``save_every`` steps and after the ``final`` one (never with 0),
        and always when the run is about to ``stop``."""
        every = self.cfg.checkpoint.save_every
        return stop or (every > 0 and (step % every == 0 or final))

    def save(self, step: int, actor: Any, progress: dict[str, Any]) -> None:
        """Save the actor and ``progress`` (plain data, identical on every rank) as ``step``."""
        c = self.cfg.checkpoint
        checkpoint.save(self.dir, step, actor.models, actor.optimizer, actor.scheduler, extra=progress,
                        config=self.cfg, keep_last=c.keep_last, async_save=c.async_save,
                        optim_sharding=c.optim_sharding)

    def latest(self) -> int | None:
        """The step ``latest`` names (None before the first save)."""
        return checkpoint.read_latest(self.dir) if self.dir.is_dir() else None

    def finalize(self, blocking: bool = False) -> None:
        """Commit the async saves whose writes finished (collective; ``blocking``: wait for all)."""
        checkpoint.finalize_async_saves(blocking=blocking)

    def close(self) -> None:
        self.finalize(blocking=True)
