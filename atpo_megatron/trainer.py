"""The AT²PO training loop, one SPMD job (``torchrun`` on a machine, ``srun`` + ``torchrun`` on SLURM).

    rollout -> reward -> credit -> old log-probs -> update -> weight sync -> [eval] -> log -> [checkpoint]

Every rank holds its Megatron shard of the actor (``actor.policy``) and one rollout engine on its own
device (``rollout/placement.py``): ``rollout.tp_size`` consecutive ranks form one engine, and each
engine samples, scores and credits the trees of its share of the prompts (``experience``). The
sequences of all engines are then gathered on every rank (``rollout_groups``), because the actor
splits a mini-batch over DP ranks by tokens itself. After the update the actor's weights stream into
every engine (``weights.sync``). Saving is the checkpoint manager's decision, stopping the
preemption handler's.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from atpo_megatron.actor.parallel import init_distributed
from atpo_megatron.actor.policy import Actor
from atpo_megatron.checkpoint_manager import CheckpointManager
from atpo_megatron.config import Config, dump_config
from atpo_megatron.distributed import broadcast_object
from atpo_megatron.env.data import PromptStream, load_examples
from atpo_megatron.env.environment import search_client
from atpo_megatron.evaluate import evaluate_in_job
from atpo_megatron.experience import make_experience, training_prompts
from atpo_megatron.launch.preemption import PreemptionHandler
from atpo_megatron.metrics import MetricsWriter, Profiler, StageTimer, StepLog, open_run_dir, update_throughput
from atpo_megatron.model_files import configured_model
from atpo_megatron.rollout.factory import make_engine
from atpo_megatron.rollout.tree_rollout import TreeRollout
from atpo_megatron.rollout.visualize import write_step_trees
from atpo_megatron.rollout_groups import GroupSearch, RolloutRank, gather_rollouts
from atpo_megatron.weights.sync import sync_weights

log = logging.getLogger("atpo.train")


class Trainer:
    """Builds the run from a ``Config`` (checks first, then the engine, then the actor); ``fit()`` loops."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.ranks = RolloutRank.from_job(cfg)
        self.run_dir = open_run_dir(cfg, dump_config(cfg), self.rank)
        self.closing = contextlib.ExitStack()  # closed by close(), or here when set-up fails
        with self.closing as stack:
            search = stack.enter_context(search_client(cfg, serve=self.rank == 0, share=broadcast_object,
                                                       check=self.ranks.reports))  # before any model work
            self.search = GroupSearch(search, self.ranks) if self.ranks.process_group is not None else search
            self.checkpoints = CheckpointManager(cfg)
            model_dir = broadcast_object(configured_model(cfg) if self.rank == 0 else None)
            train = training_prompts(cfg, AutoTokenizer.from_pretrained(model_dir))  # checked before any model work
            self.train_data = PromptStream(train, cfg.train.batch_prompts, cfg.train.seed, cfg.data.shuffle)
            self.eval_data = load_examples(cfg, cfg.data.eval_files, "test", cfg.data.eval_limit)
            self.hf_config = AutoConfig.from_pretrained(model_dir)
            # the engine before the actor: vLLM sizes its KV cache from the device memory free when it starts;
            # it samples in the actor's dtype and closes last (an in-process vLLM takes torch.distributed down)
            self.engine = make_engine(cfg.rollout, model_dir, dtype=getattr(torch, cfg.model.dtype),
                                      device_index=self.ranks.device_index, in_job=True)
            stack.callback(self.engine.close)
            self.rollout = TreeRollout.from_config(self.engine, self.search, cfg)
            self.actor = Actor(cfg, self.hf_config, model_dir,
                               load_hf=self.checkpoints.resume_from is None and cfg.checkpoint.load_hf_init)
            progress = self.checkpoints.resume(self.actor)
            self.start_step = progress.get("step", 0)
            self.train_data.position = progress.get("data_position", 0)
            self.generated_tokens = progress.get("generated_tokens", 0.0)  # all engines' since step 1
            self.actor.nonfinite_skips = progress.get("nonfinite_skips", 0)
            self.syncs = 0
            self.sync_weights()  # the engine samples from the actor's exact weights from step one
            self.timer = StageTimer()
            self.writer = stack.enter_context(MetricsWriter(self.run_dir, rank=self.rank,
                                                            tensorboard=cfg.logging.tensorboard))
            self.profiler = stack.enter_context(Profiler(cfg.profile, self.run_dir / "profile", rank=self.rank))
            self.preemption = stack.enter_context(PreemptionHandler())
            stack.callback(self.checkpoints.close)  # first: the last async save commits while the engine lives
            if self.preemption.restart_count:
                log.info("SLURM restart %d: resuming at step %d", self.preemption.restart_count, self.start_step)
            self.closing = stack.pop_all()

    def fit(self) -> dict[str, float]:
        """Run from ``start_step`` to ``train.steps`` (or the token budget, or a stop); returns the last metrics."""
        cfg, last = self.cfg, {}
        self.bar = tqdm(initial=self.start_step, total=cfg.train.steps, desc="atpo train", disable=self.rank != 0,
                        dynamic_ncols=True)
        with self.closing, contextlib.closing(self.bar):
            if cfg.logging.eval_before_train and self.start_step == 0:
                self.log(0, self.evaluate() | self.timer.pop())
            for step in range(self.start_step + 1, cfg.train.steps + 1):  # numbered from 1, as in the logs
                self.profiler.step(step)
                last = self.train_one_step(step)
                self.generated_tokens += last.get("rollout/generated_tokens", 0.0)  # every engine's (merged)
                last["rollout/generated_tokens_total"] = self.generated_tokens
                budget = cfg.train.max_generated_tokens
                final = step == cfg.train.steps or (budget > 0 and self.generated_tokens >= budget)
                if cfg.logging.eval_every and (step % cfg.logging.eval_every == 0 or final):
                    last.update(self.evaluate())
                last.update(self.timer.pop())
                last.update(update_throughput(self.trained_lengths, last.get("timing/update_s", 0.0),
                                              cfg, self.hf_config, dist.get_world_size()))
                self.log(step, last, write=step % cfg.logging.log_every == 0 or final)
                self.bar.update()
                self.checkpoints.finalize()
                stop = self.preemption.should_stop()
                if self.checkpoints.save_due(step, final, stop):
                    with self.timer.stage("checkpoint"):
                        self.checkpoints.save(step, self.actor, self.progress())
                    stop = self.preemption.should_stop()  # a signal during the save: resume from that one
                if stop:
                    self.checkpoints.finalize(blocking=True)
                    log.warning("stop requested: checkpoint of step %d committed", step)
                    if self.preemption.should_requeue:
                        self.preemption.requeue()
                    break
                if final and step < cfg.train.steps:
                    log.info("train.max_generated_tokens=%d reached (%d generated): stopping after step %d",
                             budget, self.generated_tokens, step)
                    break
        return last

    def train_one_step(self, step: int) -> dict[str, float]:
        """One AT²PO step; returns its metrics (identical on every rank)."""
        mine = self.ranks.my_prompts(self.train_data.next_batch())
        local = error = None
        try:  # an error on one rank (e.g. the retriever's outage deadline) stops every rank in the gather
            self.engine.wake()
            local = make_experience(self.rollout, mine, self.cfg.credit, stage=self.timer.stage,
                                    seed=self.cfg.train.seed * 100_003 + (step - 1) * 1009 + self.ranks.group)
            self.engine.sleep()
        except Exception as exc:
            error = exc
        with self.timer.stage("rollout"):
            sequences, metrics = gather_rollouts(local, self.ranks, len(mine), error)
        if self.rank == 0 and self.cfg.logging.save_tree_pictures:
            write_step_trees(self.run_dir / "trees", step, local.trees, self.engine.tokenizer, local.stats)
        self.trained_lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
        if not sequences:  # every leaf ended in a failed tool call and was dropped
            log.warning("step %d: no trajectory is left to train on (see rollout/dropped_tool_error_leaves); "
                        "the update is skipped", step)
            return metrics
        with self.timer.stage("old_logprobs"):
            metrics.update(self.actor.old_logprobs(sequences))
        with self.timer.stage("update"):
            metrics.update(self.actor.update(sequences, last_checkpoint=self.checkpoints.latest))
        with self.timer.stage("weight_sync"):
            metrics.update(self.sync_weights())
        return metrics

    def sync_weights(self) -> dict[str, float]:
        """Stream the actor's weights into every rank's engine (collective); every
        ``rollout.verify_weights_every`` syncs (the first included) the engine fingerprints what it got."""
        every = self.cfg.rollout.verify_weights_every
        stats = sync_weights(self.actor.hf_weights(), self.engine, verify=every > 0 and self.syncs % every == 0)
        self.syncs += 1
        return stats.metrics()

    def evaluate(self) -> dict[str, float]:
        with self.timer.stage("eval"):
            return evaluate_in_job(self.engine, self.search, self.ranks, self.eval_data, self.cfg)

    def log(self, step: int, metrics: dict[str, float], write: bool = True) -> None:
        """Write a step's metrics (TensorBoard, metrics.jsonl) and show its line (step 0: the evaluation
        before training)."""
        if write:
            self.writer.log(step, metrics)
        if self.rank == 0:
            line = StepLog()(metrics, step=step)
            self.bar.set_postfix_str(line, refresh=False)
            log.info(line)

    def progress(self) -> dict[str, float]:
        """What a checkpoint keeps besides the model and optimizer (plain data, the same on every rank)."""
        return {"data_position": self.train_data.position, "generated_tokens": self.generated_tokens,
                "nonfinite_skips": self.actor.nonfinite_skips}

    def close(self) -> None:
        self.closing.close()
