"""The actor of a run: the Megatron policy (model chunks, optimizer, LR schedule) and the three things
the loop asks of it: old log-probs, the PPO update, and its weights in Hugging Face layout.

    actor = Actor(cfg, hf_config, model_dir, load_hf=True)
    metrics = actor.old_logprobs(sequences)      # sets seq.old_logprobs; the engine-actor mismatch
    metrics |= actor.update(sequences)           # mini-batches of train.mini_batch_prompts, ppo_epochs
    engine.load_weights(actor.hf_weights())      # a collective generator (weights.sync)

Every method is collective over the actor's ranks; every rank passes the same full list of sequences
(``actor/train_step.py`` splits it over DP by tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from atpo_megatron.actor.fp8 import attach_optimizer as attach_fp8_optimizer
from atpo_megatron.actor.model import build_model
from atpo_megatron.actor.optimizer import build_optimizer, wrap_ddp
from atpo_megatron.actor.train_step import NonFiniteError, compute_logprobs, train_step
from atpo_megatron.config import Config, UserError
from atpo_megatron.weights.hf_bridge import export_hf_weights, load_hf_weights

log = logging.getLogger("atpo.train")


class TrainingDivergedError(UserError, RuntimeError):
    """More non-finite mini-batches than ``train.max_nonfinite_skips`` allows."""


class Actor:
    def __init__(self, cfg: Config, hf_config: Any, model_dir: Path, *, load_hf: bool):
        self.cfg = cfg
        self.vocab_size = hf_config.vocab_size
        models = build_model(hf_config, cfg.model, cfg.parallel)
        if load_hf:
            load_hf_weights(models, model_dir)
        self.models = wrap_ddp(models, use_distributed_optimizer=cfg.optimizer.distributed_optimizer)
        updates_per_step = cfg.train.batch_prompts // cfg.train.mini_batch_prompts * cfg.train.ppo_epochs
        self.optimizer, self.scheduler = build_optimizer(self.models, cfg.optimizer,
                                                         total_steps=cfg.train.steps * updates_per_step)
        attach_fp8_optimizer(self.optimizer, self.models)  # FP8 weights cached per step (no-op without FP8 layers)
        self.nonfinite_skips = 0
        """Mini-batches skipped for a NaN/inf loss or gradient so far in this run (resumes included)."""

    def old_logprobs(self, sequences: Sequence) -> dict[str, float]:
        """Set every sequence's ``old_logprobs`` (the actor's, at the sampling temperature); return the
        engine-actor log-prob mismatch (``rollout/logprob_diff_*``)."""
        old, raw = compute_logprobs(self.models, sequences, max_tokens=self.cfg.train.micro_batch_tokens * 2,
                                    temperature=self.cfg.rollout.sampling.temperature,
                                    vocab_size=self.vocab_size, with_raw=True)
        mismatch = logprob_mismatch(sequences, raw)
        for seq, lp in zip(sequences, old):
            seq.old_logprobs = lp.tolist()
        return mismatch

    def update(self, sequences: Sequence, last_checkpoint: Callable[[], int | None]) -> dict[str, float]:
        """PPO mini-batches of ``mini_batch_prompts`` prompts each, ``ppo_epochs`` passes; mean metrics.
        A mini-batch with a non-finite loss or gradient is skipped, up to ``train.max_nonfinite_skips``
        (``last_checkpoint`` names where a stop leaves the run)."""
        cfg = self.cfg
        by_prompt: dict[int, list] = {}
        for seq in sequences:
            by_prompt.setdefault(seq.tree_index, []).append(seq)
        prompt_ids = sorted(by_prompt)
        sums: dict[str, float] = {}
        n = skipped = 0
        for _ in range(cfg.train.ppo_epochs):
            for start in range(0, len(prompt_ids), cfg.train.mini_batch_prompts):
                mini = [s for p in prompt_ids[start:start + cfg.train.mini_batch_prompts] for s in by_prompt[p]]
                try:
                    out = train_step(self.models, self.optimizer, mini, cfg.loss.name, cfg.loss.clip_kwargs(),
                                     max_tokens=cfg.train.micro_batch_tokens,
                                     temperature=cfg.rollout.sampling.temperature, vocab_size=self.vocab_size)
                except NonFiniteError as exc:  # raised on every rank; weights and optimizer untouched
                    self._skip_nonfinite(exc, last_checkpoint)
                    skipped += 1
                    continue
                self.scheduler.step(1)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        result = {k: v / n for k, v in sums.items()}
        result["actor/loss"] = result.get("actor/pg_loss", float("nan"))
        result["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        result["actor/updates"] = float(n)
        result["actor/nonfinite_skipped"] = float(skipped)
        return result

    def _skip_nonfinite(self, exc: Exception, last_checkpoint: Callable[[], int | None]) -> None:
        self.nonfinite_skips += 1
        limit = self.cfg.train.max_nonfinite_skips
        if self.nonfinite_skips > limit:
            last = last_checkpoint()
            raise TrainingDivergedError(
                f"{self.nonfinite_skips} mini-batches had a non-finite loss or gradient, more than "
                f"train.max_nonfinite_skips={limit} ({exc}); the run stops "
                f"{f'(the last checkpoint is step {last})' if last is not None else '(no checkpoint was saved)'}; "
                f"resume with a lower optimizer.lr, or allow more skips") from exc
        log.warning("skipped a mini-batch with a non-finite loss or gradient (%d of train.max_nonfinite_skips=%d): %s",
                    self.nonfinite_skips, limit, exc)

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every full tensor in Hugging Face names and layout, layer by layer (collective generator)."""
        return export_hf_weights(self.models)


def logprob_mismatch(sequences: Sequence, actor_logprobs: Sequence[torch.Tensor]) -> dict[str, float]:
    """Train–inference log-prob mismatch over loss tokens: the engine's log-probs (raw, temperature 1,
    rollout/engine.py) against the actor's recomputed ones at temperature 1 (``with_raw``), so at any
    sampling temperature it measures only the engines' numerical difference."""
    diffs = []
    for seq, lp in zip(sequences, actor_logprobs):
        mask = torch.tensor(seq.loss_mask, dtype=torch.bool)
        if mask.any():
            diffs.append((lp.float() - torch.tensor(seq.old_logprobs, dtype=torch.float32))[mask].abs())
    if not diffs:
        return {}
    d = torch.cat(diffs)
    return {"rollout/logprob_diff_mean": d.mean().item(), "rollout/logprob_diff_max": d.max().item()}
