"""``atpo train``: the AT²PO loop, one SPMD job (``torchrun`` on a machine, ``srun`` + ``torchrun`` on SLURM).

    rollout (trees or chains) -> rewards -> turn-wise credit -> old log-probs -> PPO mini-batches
      -> weight sync -> [greedy evaluation] -> logging -> [checkpoint] -> next step

Who does what. Every rank holds its Megatron shard of the actor and one rollout engine on its own
device (SPMD colocated rollouts, ``rollout/placement.py``): ``rollout.tp_size`` consecutive ranks form
one engine, and each engine samples the trees of its share of the prompts. The sequences of all
engines are then gathered on every rank, because ``actor.train_step`` splits a mini-batch across DP
ranks by tokens itself (and so keeps the loss exactly seq-mean-token-mean over the whole
mini-batch). After the update the actor's weights are gathered layer by layer into Hugging Face
layout on every rank and streamed into its engine (``weights.sync``); engines sleep while the actor
trains.

This module knows every other one, thinly: the algorithm lives in ``algo``, the environment in
``env``, sampling in ``rollout``, the model and its update in ``actor``.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from atpo_megatron.config import Config, ConfigError, UserError, dump_config, load_config
from atpo_megatron.rollout_groups import GroupSearch, RolloutRank, all_gather_checked, gather_rollouts

log = logging.getLogger("atpo.train")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class PromptStream:
    """Deterministic prompt batches: epoch ``e`` is a seeded permutation; resumable from a position."""

    examples: list
    batch_size: int
    seed: int
    shuffle: bool = True
    position: int = 0
    """Prompts consumed so far (the data iterator's state in a checkpoint)."""

    def next_batch(self) -> list:
        batch = [self._at(self.position + i) for i in range(self.batch_size)]
        self.position += self.batch_size
        return batch

    def _at(self, index: int):
        epoch, offset = divmod(index, len(self.examples))
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return self.examples[order[offset]]


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclass
class StepResult:
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Builds the actor, the engine and the environment from a ``Config``; ``fit()`` runs the loop."""

    def __init__(self, cfg: Config):
        from transformers import AutoConfig, AutoTokenizer

        from atpo_megatron import checkpoint
        from atpo_megatron.actor.fp8 import attach_optimizer as attach_fp8_optimizer
        from atpo_megatron.actor.model import build_model
        from atpo_megatron.actor.optimizer import build_optimizer, wrap_ddp
        from atpo_megatron.actor.parallel import init_distributed
        from atpo_megatron.launch.preemption import PreemptionHandler
        from atpo_megatron.metrics import MetricsWriter, Profiler, StageTimer
        from atpo_megatron.rollout.agent_loop import split_overlong
        from atpo_megatron.rollout.tree_rollout import load_examples

        self.cfg = cfg
        init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.ranks = RolloutRank.from_job(cfg)
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = checkpoint.checkpoint_dir(cfg)
        if self.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            except OSError as exc:
                raise ConfigError(f"logging.run_dir={cfg.logging.run_dir} cannot be written "
                                  f"({exc.strerror or exc}); choose a folder this job can write") from exc
        self.retriever = None
        self.search_url = self._start_retriever()
        if self.ranks.reports:
            _check_retriever(self.search_url)
        resume_from = None
        if self._saves() or self.ckpt_dir.is_dir():  # a dir from `atpo convert --from-hf` needs no saving
            resume_from = checkpoint.prepare(self.ckpt_dir, cfg.checkpoint.resume)

        self.model_dir = _resolve_model(cfg) if self.rank == 0 else None
        self.model_dir = Path(_broadcast_object(self.model_dir))
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)  # the data is checked before any model work
        train, dropped = split_overlong(load_examples(cfg, cfg.data.train_files, "train"), tokenizer,
                                        cfg.rollout.max_prompt_tokens)
        if not train:
            raise ConfigError(
                f"all {len(dropped)} training prompts of data.train_files={cfg.data.train_files} are longer than "
                f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens} tokens, so none is left to train on; "
                f"raise rollout.max_prompt_tokens or use shorter questions")
        self.train_data = PromptStream(train, cfg.train.batch_prompts, cfg.train.seed, cfg.data.shuffle)
        self.eval_data = load_examples(cfg, cfg.data.eval_files, "test", cfg.data.eval_limit)
        self.hf_config = AutoConfig.from_pretrained(self.model_dir)
        # the engine first: vLLM sizes its KV cache from the device memory that is free when it starts
        self.engine = self.rollout = self.search = None
        self._build_rollout()
        self.syncs = 0
        models = build_model(self.hf_config, cfg.model, cfg.parallel)
        if resume_from is None and cfg.checkpoint.load_hf_init:
            from atpo_megatron.weights.hf_bridge import load_hf_weights

            load_hf_weights(models, self.model_dir)
        self.models = wrap_ddp(models, use_distributed_optimizer=cfg.optimizer.distributed_optimizer)
        self.updates_per_step = cfg.train.batch_prompts // cfg.train.mini_batch_prompts * cfg.train.ppo_epochs
        self.optimizer, self.scheduler = build_optimizer(
            self.models, cfg.optimizer, total_steps=cfg.train.steps * self.updates_per_step
        )
        attach_fp8_optimizer(self.optimizer, self.models)  # FP8 weights cached per step (no-op without FP8 layers)

        self.start_step = 0
        self.generated_tokens = 0.0
        """Tokens the engines generated since step 1, all engines together (``train.max_generated_tokens``)."""
        self.nonfinite_skips = 0
        """Mini-batches skipped for a NaN/inf loss or gradient so far in this run (resumes included)."""
        self._trained_lengths: list[int] = []
        if resume_from is not None:
            if checkpoint.read_record(resume_from).get("optim_sharding") is None:  # `atpo convert --from-hf`
                checkpoint.load(self.ckpt_dir, self.models, path=resume_from)
                log.info("initial weights from %s (weights only: fresh optimizer, step 0)", resume_from)
            else:
                resumed = checkpoint.load(self.ckpt_dir, self.models, self.optimizer, self.scheduler,
                                          path=resume_from)
                self.start_step = resumed.step
                self.train_data.position = resumed.extra["data_position"]
                self.generated_tokens = resumed.extra.get("generated_tokens", 0.0)
                self.nonfinite_skips = resumed.extra.get("nonfinite_skips", 0)
                log.info("resumed from %s at step %d", resume_from, resumed.step)

        self.sync_weights()  # the engine samples from the actor's exact weights from step one

        self.timer = StageTimer()
        self.writer = MetricsWriter(self.run_dir, rank=self.rank, tensorboard=cfg.logging.tensorboard)
        self.profiler = Profiler(cfg.profile, self.run_dir / "profile", rank=self.rank)
        self.preemption = PreemptionHandler().install()
        if self.preemption.restart_count:
            log.info("SLURM restart %d: resuming at step %d", self.preemption.restart_count, self.start_step)

    # -------------------------------------------------------------- set-up pieces
    def _saves(self) -> bool:
        return self.cfg.checkpoint.save_every > 0 or self.cfg.checkpoint.resume == "required"

    def _save_due(self, step: int, final: bool) -> bool:
        """A periodic save after ``step``: every ``save_every`` steps and after the ``final`` one (the
        last step, or the one that spent ``train.max_generated_tokens``); never with 0."""
        every = self.cfg.checkpoint.save_every
        return every > 0 and (step % every == 0 or final)

    def _start_retriever(self) -> str:
        """The search endpoint: the configured URL, or our BM25 server started on rank 0."""
        from atpo_megatron.env.retriever import RetrieverServer

        cfg = self.cfg
        url = cfg.retriever.url
        if url == "embedded" and self.rank == 0:
            from atpo_megatron.rollout.tree_rollout import embedded_task

            corpus = cfg.retriever.corpus or str(embedded_task(cfg).corpus)
            self.retriever = RetrieverServer(corpus, backend=cfg.retriever.backend, topk=cfg.retriever.topk)
            self.retriever.start()
            atexit.register(self.retriever.stop)  # also when set-up fails before fit()'s cleanup
            url = self.retriever.url
        return _broadcast_object(url)

    def _build_rollout(self) -> None:
        from atpo_megatron.env.search_tool import SearchClient
        from atpo_megatron.rollout.factory import make_engine
        from atpo_megatron.rollout.tree_rollout import TreeRollout

        cfg = self.cfg
        self.search = SearchClient.from_config(cfg.retriever, self.search_url)
        if self.ranks.process_group is not None:
            self.search = GroupSearch(self.search, self.ranks)
        # the engine samples in the actor's dtype (bf16 on a CPU with AMX is several times faster than fp32)
        self.engine = make_engine(cfg.rollout, self.model_dir, dtype=getattr(torch, cfg.model.dtype),
                                  device_index=self.ranks.device_index, in_job=True)
        self.rollout = TreeRollout.from_config(self.engine, self.search, cfg)

    # -------------------------------------------------------------- the loop
    def fit(self) -> dict[str, float]:
        """Run from ``start_step`` to ``train.steps``; returns the last step's metrics."""
        from tqdm import tqdm

        from atpo_megatron import checkpoint
        from atpo_megatron.metrics import StepLog

        cfg, last = self.cfg, {}
        step_line = StepLog()
        bar = tqdm(range(self.start_step, cfg.train.steps), initial=self.start_step, total=cfg.train.steps,
                   desc="atpo train", disable=self.rank != 0, dynamic_ncols=True)
        try:
            if cfg.logging.eval_before_train and self.start_step == 0:
                self._evaluate_initial_weights(step_line)
            for step in bar:
                self.profiler.step(step + 1)  # steps are numbered from 1, as in the logs
                last = self.train_one_step(step)
                self.generated_tokens += last.get("rollout/generated_tokens", 0.0)  # every engine's (merged)
                last["rollout/generated_tokens_total"] = self.generated_tokens
                budget = cfg.train.max_generated_tokens
                final = step + 1 == cfg.train.steps or (budget > 0 and self.generated_tokens >= budget)
                if cfg.logging.eval_every and ((step + 1) % cfg.logging.eval_every == 0 or final):
                    with self.timer.stage("eval"):
                        last.update(self.evaluate())
                last.update(self.timer.pop())
                last.update(self._throughput(last.get("timing/update_s", 0.0)))
                if (step + 1) % cfg.logging.log_every == 0 or final:
                    self.writer.log(step + 1, last)
                if self.rank == 0:
                    bar.set_postfix_str(step_line(last, step=step + 1), refresh=False)
                    log.info(step_line(last, step=step + 1))
                checkpoint.finalize_async_saves()
                stop = self.preemption.should_stop()
                # A stop always saves (even with save_every=0): the requeued job must resume from it.
                if stop or self._save_due(step + 1, final):
                    self.save(step + 1)
                    stop = self.preemption.should_stop()  # a signal during the save: resume from that one
                if final and step + 1 < cfg.train.steps and not stop:
                    log.info("train.max_generated_tokens=%d reached (%d generated): stopping after step %d",
                             budget, self.generated_tokens, step + 1)
                    break
                if stop:
                    checkpoint.finalize_async_saves(blocking=True)
                    log.warning("stop requested: checkpoint of step %d committed", step + 1)
                    if self.preemption.should_requeue:
                        self.preemption.requeue()
                    break
        finally:
            bar.close()
            self.close()
        return last

    def _evaluate_initial_weights(self, step_line) -> None:
        """``logging.eval_before_train``: the greedy evaluation of the weights training starts from, as step 0."""
        with self.timer.stage("eval"):
            metrics = self.evaluate()
        metrics.update(self.timer.pop())
        self.writer.log(0, metrics)
        if self.rank == 0:
            log.info(step_line(metrics, step=0))

    def train_one_step(self, step: int) -> dict[str, float]:
        """One AT²PO step; returns its metrics (identical on every rank)."""
        from atpo_megatron.actor.train_step import compute_logprobs, train_step

        cfg = self.cfg
        metrics: dict[str, float] = {}
        prompts = self.train_data.next_batch()
        mine = self.ranks.my_prompts(prompts)
        with self.timer.stage("rollout"):
            local = error = None
            try:
                self.engine.wake()
                local = self.rollout.rollout(mine, seed=cfg.train.seed * 100_003 + step * 1009 + self.ranks.group)
                self.engine.sleep()
            except Exception as exc:  # e.g. the retriever's outage deadline passed
                error = exc
            sequences, stats = gather_rollouts(local, self.ranks, len(mine), error)
        metrics.update(stats)
        if self.rank == 0 and cfg.logging.save_tree_pictures:
            self._save_trees(step, local)
        if not sequences:  # every leaf ended in a failed tool call and was dropped
            log.warning("step %d: no trajectory is left to train on (see rollout/dropped_tool_error_leaves); "
                        "the update is skipped", step + 1)
            self._trained_lengths = []
            return metrics

        with self.timer.stage("old_logprobs"):
            old, raw = compute_logprobs(self.models, sequences, max_tokens=cfg.train.micro_batch_tokens * 2,
                                        temperature=cfg.rollout.sampling.temperature,
                                        vocab_size=self.hf_config.vocab_size, with_raw=True)
            metrics.update(_mismatch(sequences, raw))
            for seq, lp in zip(sequences, old):
                seq.old_logprobs = lp.tolist()

        with self.timer.stage("update"):
            update = self._update(sequences, train_step)
        metrics.update(update)

        with self.timer.stage("weight_sync"):
            metrics.update(self.sync_weights())
        self._trained_lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
        return metrics

    def _update(self, sequences: list, train_step) -> dict[str, float]:
        """PPO mini-batches of ``mini_batch_prompts`` prompts each, ``ppo_epochs`` passes; mean metrics.
        A mini-batch with a non-finite loss or gradient is skipped, up to ``train.max_nonfinite_skips``."""
        from atpo_megatron.actor.train_step import NonFiniteError

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
                                     temperature=cfg.rollout.sampling.temperature,
                                     vocab_size=self.hf_config.vocab_size)
                except NonFiniteError as exc:  # raised on every rank; weights and optimizer untouched
                    self._skip_nonfinite(exc)
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

    def _skip_nonfinite(self, exc: Exception) -> None:
        """Count a mini-batch skipped for a NaN/inf loss or gradient; past ``train.max_nonfinite_skips`` stop."""
        from atpo_megatron import checkpoint

        self.nonfinite_skips += 1
        limit = self.cfg.train.max_nonfinite_skips
        if self.nonfinite_skips > limit:
            last = checkpoint.read_latest(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
            raise TrainingDivergedError(
                f"{self.nonfinite_skips} mini-batches had a non-finite loss or gradient, more than "
                f"train.max_nonfinite_skips={limit} ({exc}); the run stops "
                f"{f'(the last checkpoint is step {last})' if last is not None else '(no checkpoint was saved)'}; "
                f"resume with a lower optimizer.lr, or allow more skips") from exc
        log.warning("skipped a mini-batch with a non-finite loss or gradient (%d of train.max_nonfinite_skips=%d): %s",
                    self.nonfinite_skips, limit, exc)

    def sync_weights(self) -> dict[str, float]:
        """Stream the actor's weights into every rank's engine (a collective over all ranks); every
        ``rollout.verify_weights_every`` syncs (the first included) the engine fingerprints what it got."""
        from atpo_megatron.weights.hf_bridge import export_hf_weights
        from atpo_megatron.weights.sync import sync_weights

        every = self.cfg.rollout.verify_weights_every
        stats = sync_weights(export_hf_weights(self.models), self.engine,
                             verify=every > 0 and self.syncs % every == 0)
        self.syncs += 1
        return stats.metrics()

    def evaluate(self) -> dict[str, float]:
        """Greedy evaluation on the eval set, split across the rollout engines; EM per source and micro-average."""
        from atpo_megatron.evaluate import evaluate, summarize

        samples, error = [], None
        try:
            self.engine.wake()
            mine = self.ranks.my_eval_examples(self.eval_data)
            if mine:
                samples = evaluate(self.engine, self.search, mine, self.cfg, progress=False)["samples"]
            self.engine.sleep()
        except Exception as exc:
            error = exc
        if not self.ranks.reports:
            samples = []
        report = summarize([s for part in all_gather_checked(samples, error) for s in part])
        out = {"eval/em_avg": report["avg"]["em"], "eval/f1_avg": report["avg"]["f1"],
               "eval/turns_avg": report["avg"]["turns"], "eval/tool_calls_avg": report["avg"]["tool_calls"],
               "eval/distinct_answers": report["avg"]["distinct_answers"]}
        out.update({f"eval/em_{src}": r["em"] for src, r in report["per_source"].items()})
        return out

    def save(self, step: int) -> None:
        from atpo_megatron import checkpoint

        with self.timer.stage("checkpoint"):
            checkpoint.save(self.ckpt_dir, step, self.models, self.optimizer, self.scheduler,
                            extra={"data_position": self.train_data.position,
                                   "generated_tokens": self.generated_tokens,
                                   "nonfinite_skips": self.nonfinite_skips}, config=self.cfg,
                            keep_last=self.cfg.checkpoint.keep_last, async_save=self.cfg.checkpoint.async_save,
                            optim_sharding=self.cfg.checkpoint.optim_sharding)

    def close(self) -> None:
        from atpo_megatron import checkpoint

        checkpoint.finalize_async_saves(blocking=True)
        self.preemption.uninstall()
        self.profiler.close()
        self.writer.close()
        if self.search is not None:
            self.search.close()
        if self.retriever is not None:
            self.retriever.stop()
        if self.engine is not None:
            self.engine.close()  # last: an in-process vLLM engine tears torch.distributed down with it

    # -------------------------------------------------------------- helpers
    def _save_trees(self, step: int, batch) -> None:
        from atpo_megatron.rollout.visualize import write_trees_html, write_trees_json

        out = self.run_dir / "trees"
        write_trees_json(batch.trees, out / f"step_{step + 1:06d}.json", self.engine.tokenizer, batch.stats)
        write_trees_html(batch.trees, out / f"step_{step + 1:06d}.html", self.engine.tokenizer, batch.stats,
                         title=f"AT²PO turn trees, step {step + 1} (rank 0's prompts)")

    def _throughput(self, seconds: float) -> dict[str, float]:
        """Update-stage tokens/s, model TFLOP/s per device and MFU (0 on CPU)."""
        from atpo_megatron.metrics import PERF_PREFIX, detect_peak_tflops, effective_seq_len, model_flops_per_token, throughput

        lengths = self._trained_lengths
        tokens = sum(lengths) * self.cfg.train.ppo_epochs
        peak = self.cfg.logging.peak_tflops or detect_peak_tflops(self.cfg.model.dtype)
        flops = model_flops_per_token(self.hf_config, seq_len=effective_seq_len(lengths))
        perf = throughput(tokens, seconds, flops, dist.get_world_size(), peak) if seconds > 0 else {}
        return {f"{PERF_PREFIX}/{k}": v for k, v in perf.items()}


# ---------------------------------------------------------------------------------------------
# Collective helpers (plain data only)


def _broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class TrainingDivergedError(UserError, RuntimeError):
    """More non-finite mini-batches than ``train.max_nonfinite_skips`` allows."""


def _mismatch(sequences: list, actor_logprobs: list) -> dict[str, float]:
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


def _resolve_model(cfg: Config) -> Path:
    """``model.name_or_path`` as a folder; a missing warm start says how to write it."""
    from atpo_megatron.hub import resolve_model

    try:
        return resolve_model(cfg.model.name_or_path)
    except FileNotFoundError as exc:
        if Path(cfg.model.name_or_path) == Path(cfg.sft.out_dir):
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path} is sft.out_dir and holds no model "
                              "yet: write the warm start first with `atpo sft CONFIG` (same config)") from None
        raise ConfigError(f"model.name_or_path: {exc}") from None


def _check_retriever(url: str) -> None:
    """Fail fast (one try, short timeout), before any model work, when the search endpoint is down."""
    from atpo_megatron.env.search_tool import RetrieverUnavailableError, SearchClient

    with SearchClient(url, retries=0, timeout_s=10.0) as probe:
        try:
            error = probe.search_batch(["health check"])[0].error
        except RetrieverUnavailableError as exc:
            error = str(exc.__cause__)
    if error is not None:
        raise ConfigError(
            f"retriever.url: the retriever at {url} does not answer ({error}); start it with "
            f"`atpo retriever serve --corpus CORPUS --port PORT` or set retriever.url=embedded"
        )


# ---------------------------------------------------------------------------------------------
# CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--nproc-per-node", type=int, default=0,
                        help="launch this many ranks with torchrun (default: run in this process, or "
                             "as the rank torchrun/srun started)")


def train_main(args: argparse.Namespace) -> int:
    """Entry of ``atpo train``: relaunch under torchrun if asked, else train as this rank."""
    cfg = load_config(args.config, args.overrides)  # fail fast on a bad config, before any launch
    if args.nproc_per_node and "RANK" not in os.environ:
        import subprocess

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc_per_node}", "-m", "atpo_megatron.cli", "train",
               args.config, *args.overrides]
        return subprocess.call(cmd)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("megatron", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    trainer = Trainer(cfg)
    trainer.fit()
    from atpo_megatron.actor.parallel import destroy_distributed

    destroy_distributed()
    return 0
