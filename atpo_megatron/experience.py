"""One batch of experience: sampled turn trees -> leaf rewards -> turn-wise credit -> training sequences.

    batch = make_experience(TreeRollout.from_config(engine, search, cfg), examples, cfg.credit, seed=0)
    batch.sequences[0].advantages        # per response token
    batch.stats["rollout/reward_mean"]

Three stages, each owned by its module and timed by the caller's ``stage`` (the trainer's
``StageTimer.stage``): ``rollout`` (``TreeRollout.sample``), ``reward`` (``env.reward.score_leaves``)
and ``credit`` (``algo.advantages.assign_credit``). ``atpo rollout`` writes one batch as JSON and HTML.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch

from atpo_megatron.algo.advantages import assign_credit
from atpo_megatron.algo.tree import LeafSequence, TurnTree
from atpo_megatron.config import Config, ConfigError, CreditConfig, load_config, split_config_args
from atpo_megatron.env.data import QAExample, load_examples
from atpo_megatron.env.environment import search_client
from atpo_megatron.env.reward import score_leaves
from atpo_megatron.model_files import configured_model
from atpo_megatron.rollout.agent_loop import LoopStats, split_overlong
from atpo_megatron.rollout.engine import Engine
from atpo_megatron.rollout.factory import make_engine
from atpo_megatron.rollout.statistics import rollout_statistics
from atpo_megatron.rollout.tree_rollout import TreeRollout
from atpo_megatron.rollout.visualize import write_trees_html, write_trees_json

log = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """What one batch of prompts hands to the actor."""

    trees: list[TurnTree]
    sequences: list[LeafSequence]
    """One per retained leaf, tree by tree; ``tree_index`` says which prompt."""
    stats: dict[str, float] = field(default_factory=dict)
    """``rollout/...`` (``rollout.statistics.rollout_statistics``) and ``credit/...`` scalars."""
    loop: LoopStats = field(default_factory=LoopStats)


def make_experience(rollout: TreeRollout, examples: Sequence[QAExample], credit: CreditConfig | None = None,
                    seed: int | None = None, *, stage: Callable[[str], ContextManager] | None = None,
                    ) -> RolloutBatch:
    """Sample, score and credit one batch of prompts (``credit`` for tree advantages)."""
    stage = stage or (lambda name: contextlib.nullcontext())
    with stage("rollout"):
        sampled = rollout.sample(examples, seed=seed)
    with stage("reward"):
        em = score_leaves(sampled.trees, rollout.tok)
    with stage("credit"):
        sequences, credit_stats = assign_credit(sampled.trees, rollout.plan.advantage, credit)
    stats = rollout_statistics(sampled.trees, sampled.produced, sampled.loop, em)
    stats.update(credit_stats)
    stats["rollout/dropped_tool_error_leaves"] = float(sampled.dropped_tool_error_leaves)
    stats["rollout/total_s"] = sampled.seconds
    return RolloutBatch(sampled.trees, sequences, stats, sampled.loop)


def training_prompts(cfg: Config, tokenizer: Any) -> list[QAExample]:
    """The examples of ``data.train_files`` whose prompt fits ``rollout.max_prompt_tokens``; a ConfigError
    when none does."""
    train, dropped = split_overlong(load_examples(cfg, cfg.data.train_files, "train"), tokenizer,
                                    cfg.rollout.max_prompt_tokens)
    if not train:
        raise ConfigError(
            f"all {len(dropped)} training prompts of data.train_files={cfg.data.train_files} are longer than "
            f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens} tokens, so none is left to train on; "
            f"raise rollout.max_prompt_tokens or use shorter questions")
    return train


@contextlib.contextmanager
def engine_and_search(cfg: Config, engine: Engine | None = None) -> Iterator[tuple[Engine, Any]]:
    """``(engine, search_client)`` for a command outside a training job (``atpo rollout``, ``atpo eval``).

    ``engine``: reuse one (tests); otherwise ``make_engine`` for ``model.name_or_path`` in ``model.dtype``,
    in child processes, closed on exit.
    """
    with search_client(cfg) as client, contextlib.ExitStack() as stack:
        if engine is None:
            engine = make_engine(cfg.rollout, configured_model(cfg), dtype=getattr(torch, cfg.model.dtype))
            stack.callback(engine.close)
        yield engine, client


def add_rollout_arguments(parser) -> None:
    """``atpo rollout [CONFIG] [key.sub=value ...] --out DIR [--prompts N] [--seed S] [--split train|eval]``."""
    parser.add_argument("config", nargs="?", help="YAML config file (omit for the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, e.g. tree.top_k=2")
    parser.add_argument("--out", required=True, help="folder for trees.json, trees.html and stats.json")
    parser.add_argument("--prompts", type=int, default=0, help="prompts in the batch (default train.batch_prompts)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default train.seed)")
    parser.add_argument("--split", choices=("train", "eval"), default="train",
                        help="draw the prompts from data.train_files or data.eval_files")


def rollout_main(args) -> int:
    """Run one rollout batch from a config and write the trees as JSON and as an HTML picture."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per search request otherwise
    cfg = load_config(*split_config_args(args.config, args.overrides))
    seed = cfg.train.seed if args.seed is None else args.seed
    n = args.prompts or cfg.train.batch_prompts
    files = cfg.data.train_files if args.split == "train" else cfg.data.eval_files
    examples = load_examples(cfg, files, "train" if args.split == "train" else "test")
    if cfg.data.shuffle:
        random.Random(seed).shuffle(examples)
    out = Path(args.out)
    with engine_and_search(cfg) as (engine, client):
        examples, _ = split_overlong(examples, engine.tokenizer, cfg.rollout.max_prompt_tokens)
        batch = make_experience(TreeRollout.from_config(engine, client, cfg), examples[:n], cfg.credit, seed=seed)
        write_trees_json(batch.trees, out / "trees.json", engine.tokenizer, batch.stats)
        write_trees_html(batch.trees, out / "trees.html", engine.tokenizer, batch.stats,
                         title=f"AT²PO rollout: {len(batch.trees)} prompts, mode {cfg.rollout.mode}, seed {seed}")
    (out / "stats.json").write_text(json.dumps(batch.stats, indent=1) + "\n")
    for k, v in batch.stats.items():
        print(f"{k:36s} {v:.4g}")
    print(f"wrote {out / 'trees.json'}, {out / 'trees.html'}, {out / 'stats.json'}")
    return 0
