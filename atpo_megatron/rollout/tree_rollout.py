"""Turn-level tree rollouts (spec §3.3), and the chain rollouts of the GRPO/GSPO baselines.

    rollout = TreeRollout.from_config(engine, search_client, cfg)
    batch = rollout.rollout(examples, seed=step)   # RolloutBatch: trees, sequences, stats
    batch.sequences[0].advantages                   # per response token

Tree mode, per batch of prompts (every phase batched over all trees of the batch):

1. M = ``tree.initial_chains`` empty children of every root, generated to their leaves together;
2. L = ``tree.expansion_iterations`` rounds: per tree, ``select_expansion_nodes`` picks K =
   ``tree.top_k`` non-leaf nodes; each gets one new branch (``TurnTree.fork``: a sibling that re-samples
   the node's turn from the same observation); all new branches of all trees run to their leaves together;
3. ``sample_leaves(tree.leaves_per_tree)``, then the rewards of the leaves (``env.reward.score`` on
   the response decoded with ``skip_special_tokens=True``), turn-wise credit (``TurnTree.advantages``
   with ``credit.*``) and one :class:`LeafSequence` per leaf.

Chain mode (``rollout.mode=chain``) is the same code with M = ``rollout.chains``, L = 0, and the
GRPO outcome advantage ``(r - mean) / (std + 1e-6)`` per prompt group (:func:`grpo_node_advantages`).
Greedy evaluation is M = 1, L = 0, temperature 0 (:meth:`RolloutPlan.greedy`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from atpo_megatron.algo.expansion import select_expansion_nodes
from atpo_megatron.algo.tree import LeafSequence, TurnTree
from atpo_megatron.config import ConfigError
from atpo_megatron.env.reward import score
from atpo_megatron.rollout.agent_loop import (
    AgentLoop,
    LEAF_REASONS,
    LoopLimits,
    LoopStats,
    encode_prompt,
    sampling_from_config,
    split_overlong,
)
from atpo_megatron.rollout.engine import Engine

if TYPE_CHECKING:
    from atpo_megatron.config import Config, CreditConfig, RolloutConfig
    from atpo_megatron.env.data import QAExample

log = logging.getLogger(__name__)

AdvantageKind = Literal["tree", "grpo", "none"]


@dataclass
class RolloutPlan:
    """The shape of one prompt's rollout: M chains, L expansion rounds of K branches, leaves kept."""

    initial_chains: int
    expansion_iterations: int = 0
    top_k: int = 1
    alpha: float = 0.05
    expansion_mode: str = "entropy"
    leaves_per_tree: int = 0
    """0 = M + L*K."""
    advantage: AdvantageKind = "tree"
    """tree: turn-wise credit (spec §4); grpo: outcome z-score per prompt; none: all zero (eval)."""

    def __post_init__(self):
        if self.initial_chains < 1:
            raise ValueError(f"a rollout needs at least one initial chain, got {self.initial_chains}")
        if self.expansion_iterations < 0 or self.top_k < 1:
            raise ValueError("tree.expansion_iterations must be >= 0 and tree.top_k >= 1")
        if self.advantage not in ("tree", "grpo", "none"):
            raise ValueError(f"advantage={self.advantage!r}; choose tree, grpo or none")
        if self.leaves_per_tree == 0:
            self.leaves_per_tree = self.initial_chains + self.expansion_iterations * self.top_k

    @classmethod
    def from_config(cls, cfg: "Config") -> "RolloutPlan":
        """Tree mode from ``tree.*``; chain mode from ``rollout.chains`` (GRPO advantages)."""
        if cfg.rollout.mode == "chain":
            return cls(initial_chains=cfg.rollout.chains, advantage="grpo")
        t = cfg.tree
        return cls(t.initial_chains, t.expansion_iterations, t.top_k, t.alpha, t.expansion_mode,
                   t.leaves_per_tree, "tree")

    @classmethod
    def greedy(cls) -> "RolloutPlan":
        return cls(initial_chains=1, advantage="none")


@dataclass
class RolloutBatch:
    """What one rollout of a prompt batch hands to the trainer."""

    trees: list[TurnTree]
    sequences: list[LeafSequence]
    """One per retained leaf, tree by tree; ``tree_index`` says which prompt."""
    stats: dict[str, float] = field(default_factory=dict)
    """``rollout/...`` scalars (see :func:`rollout_statistics`)."""
    loop: LoopStats = field(default_factory=LoopStats)


def grpo_node_advantages(tree: TurnTree, eps: float = 1e-6) -> list[float]:
    """GRPO outcome advantage, ``(r - mean) / (std + eps)`` over the tree's leaves, on every node of a leaf's path.

    verl's ``compute_grpo_outcome_advantage``: unbiased std, and a group of one leaf gets mean 0 and
    std 1 (A = r). Meant for chains (no node shared by two leaves); a node shared by several leaves
    would get the advantage of the highest-numbered one.
    """
    leaves = tree.leaves()
    rewards = [tree.nodes[i].reward for i in leaves]
    if any(r is None for r in rewards):
        raise ValueError("every leaf needs a reward before its GRPO advantage; score the leaves first")
    n = len(rewards)
    if n == 1:
        mean, std = 0.0, 1.0
    else:
        mean = sum(rewards) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    adv = [0.0] * len(tree.nodes)
    for leaf, r in zip(leaves, rewards):
        a = (r - mean) / (std + eps)
        for i in tree.path(leaf)[1:]:
            adv[i] = a
    return adv


def _depth(tree: TurnTree, i: int) -> int:
    return len(tree.path(i)) - 1


def produced_leaf_stats(trees: Sequence[TurnTree]) -> dict[str, Any]:
    """Leaf counts, turns, tool calls, finish reasons and chain-equivalent tokens, before leaf sampling."""
    leaves = [(t, i) for t in trees for i in t.leaves()]
    reasons: dict[str, int] = {}
    for t, i in leaves:
        reasons[t.nodes[i].finish_reason] = reasons.get(t.nodes[i].finish_reason, 0) + 1
    return {
        "leaves": len(leaves),
        "turns": sum(_depth(t, i) for t, i in leaves),
        "tool_calls": sum(t.nodes[i].tool_calls for t, i in leaves),
        # what independent chains reaching the same leaves would have generated (no shared prefix)
        "chain_tokens": sum(sum(t.response(i)[1]) for t, i in leaves),
        "reasons": reasons,
    }


def rollout_statistics(
    trees: Sequence[TurnTree], produced: dict[str, Any], loop: LoopStats, em: Sequence[float]
) -> dict[str, float]:
    """The ``rollout/...`` scalars of one batch; ``em`` = evaluation-style EM of every retained leaf."""
    n_leaves = max(produced["leaves"], 1)
    retained = [(t, i) for t in trees for i in t.leaves()]
    rewards = [t.nodes[i].reward for t, i in retained]
    n = max(len(retained), 1)
    stats = {
        "rollout/trees": float(len(trees)),
        "rollout/leaves": float(produced["leaves"]),
        "rollout/leaves_per_tree": produced["leaves"] / max(len(trees), 1),
        "rollout/sequences": float(len(retained)),
        "rollout/turns_per_leaf": produced["turns"] / n_leaves,
        "rollout/tool_calls_per_leaf": produced["tool_calls"] / n_leaves,
        "rollout/search_queries": float(loop.queries),
        "rollout/tool_errors": float(loop.tool_errors),
        "rollout/limit_notices": float(loop.limit_notices),
        "rollout/truncated_results": float(loop.truncated_results),
        "rollout/generate_calls": float(loop.generate_calls),
        "rollout/generated_tokens": float(loop.generated_tokens),
        "rollout/chain_tokens": float(produced["chain_tokens"]),
        "rollout/token_saving": 1.0 - loop.generated_tokens / produced["chain_tokens"] if produced["chain_tokens"] else 0.0,
        "rollout/response_length": sum(len(t.response(i)[0]) for t, i in retained) / n,
        "rollout/reward_mean": sum(rewards) / n,
        "rollout/format_failure_rate": sum(r == -1.0 for r in rewards) / n,
        "rollout/em": sum(em) / n,
        "rollout/uniform_reward_trees": sum(
            len({t.nodes[i].reward for i in t.leaves()}) == 1 for t in trees) / max(len(trees), 1),
        "rollout/context_tokens": float(loop.context_tokens),
        "rollout/prefix_cache_hit_rate": loop.cached_tokens / loop.context_tokens if loop.context_tokens else 0.0,
        "rollout/generate_s": loop.generate_s,
        "rollout/search_s": loop.search_s,
    }
    for reason in sorted(set(LEAF_REASONS) | set(produced["reasons"])):
        stats[f"rollout/finish_{reason}"] = produced["reasons"].get(reason, 0) / n_leaves
    return stats


def credit_statistics(trees: Sequence[TurnTree], node_advantages: Sequence[Sequence[float]]) -> dict[str, float]:
    """The ``credit/...`` scalars: how the advantages of one batch are spread over its leaves' turns.

    Every (leaf, turn) pair counts once, as the loss sees it (a shared turn once per leaf below it):
    ``adv_abs_mean`` = mean |A|; ``adv_std`` = population std of A; ``turn_spread`` = mean over
    leaves of max - min of A along the leaf's turns (0 when every turn of a trajectory gets the same
    advantage, as GRPO's outcome advantage does; > 0 when turn-wise credit tells turns apart);
    ``zero_adv_leaves`` = fraction of leaves whose turns all have A = 0 (no gradient from them).
    """
    values, spreads, zero = [], [], 0
    for tree, adv in zip(trees, node_advantages, strict=True):
        for leaf in tree.leaves():
            turns = [adv[i] for i in tree.path(leaf)[1:]]
            values += turns
            spreads.append(max(turns) - min(turns))
            zero += all(a == 0.0 for a in turns)
    if not values:
        return {}
    mean = sum(values) / len(values)
    return {
        "credit/adv_abs_mean": sum(abs(a) for a in values) / len(values),
        "credit/adv_std": math.sqrt(sum((a - mean) ** 2 for a in values) / len(values)),
        "credit/turn_spread": sum(spreads) / len(spreads),
        "credit/zero_adv_leaves": zero / len(spreads),
    }


# What each rollout/... mean averages over: its weight when the engines' statistics are merged.
_MEAN_OVER = {
    "rollout/leaves_per_tree": "rollout/trees",
    "rollout/uniform_reward_trees": "rollout/trees",
    "rollout/turns_per_leaf": "rollout/leaves",
    "rollout/tool_calls_per_leaf": "rollout/leaves",
    "rollout/response_length": "rollout/sequences",
    "rollout/reward_mean": "rollout/sequences",
    "rollout/format_failure_rate": "rollout/sequences",
    "rollout/em": "rollout/sequences",
    "rollout/token_saving": "rollout/chain_tokens",  # 1 - generated / chain tokens
    "rollout/prefix_cache_hit_rate": "rollout/context_tokens",
    "credit/adv_abs_mean": "rollout/leaves",  # per (leaf, turn) in credit_statistics; leaves weigh the engines
    "credit/adv_std": "rollout/leaves",  # the engines' stds averaged, not the pooled std
    "credit/turn_spread": "rollout/leaves",
    "credit/zero_adv_leaves": "rollout/leaves",
}


def merge_rollout_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The statistics of several rollout engines' batches as if one engine had rolled out all their prompts.

    Means are weighted by what they average over (``_MEAN_OVER``; ``rollout/finish_*`` are fractions of
    the produced leaves), stage times (``*_s``) are the slowest engine's (the engines run in parallel),
    and every other key is a count, summed.
    """
    merged = {}
    for key in sorted(set().union(*parts)):
        values = [p.get(key, 0.0) for p in parts]
        weight = "rollout/leaves" if key.startswith("rollout/finish_") else _MEAN_OVER.get(key)
        if key.endswith("_s"):
            merged[key] = max(values)
        elif weight is None:
            merged[key] = sum(values)
        else:
            weights = [p.get(weight, 0.0) for p in parts]
            total = sum(weights)
            merged[key] = sum(v * w for v, w in zip(values, weights)) / total if total else 0.0
    return merged


class TreeRollout:
    """Builds the turn trees of a prompt batch and turns them into training sequences.

    ``rollout.assistant_prefix``: text inserted (mask 0) at the start of every trajectory's first
    turn, the first node's observation; empty by default (the paper has none). Tests use "<search>"
    to make a small model search.
    """

    def __init__(
        self,
        engine: Engine,
        search_client: Any,
        rollout: "RolloutConfig",
        plan: RolloutPlan,
        credit: "CreditConfig | None" = None,
        *,
        greedy: bool = False,
        limits: LoopLimits | None = None,
    ):
        if plan.advantage == "tree" and credit is None:
            raise ValueError("tree advantages need a CreditConfig (credit=cfg.credit)")
        self.engine = engine
        self.tok = engine.tokenizer
        self.plan = plan
        self.credit = credit
        self.limits = limits or LoopLimits.from_config(rollout)
        self.drop_tool_errors = plan.advantage != "none" and not rollout.train_on_tool_errors
        self.loop = AgentLoop(engine, search_client, self.limits, sampling_from_config(rollout, greedy))
        self.prefix_ids = self.loop.encode(rollout.assistant_prefix) if rollout.assistant_prefix else []

    @classmethod
    def from_config(cls, engine: Engine, search_client: Any, cfg: "Config", **kwargs) -> "TreeRollout":
        return cls(engine, search_client, cfg.rollout, RolloutPlan.from_config(cfg), cfg.credit, **kwargs)

    # ------------------------------------------------------------------ phases
    def _new_chain(self, tree: TurnTree):
        n = len(self.prefix_ids)
        node = tree.add_child(0, self.prefix_ids, [0] * n, [0.0] * n, obs_len=n)
        return self.loop.open(tree, node)

    def _fork(self, tree: TurnTree, node: int):
        if node == 0:  # a fresh chain, with the same first observation as the others
            return self._new_chain(tree)
        return self.loop.open(tree, tree.fork(node))

    def build_trees(self, examples: Sequence["QAExample"], seed: int | None = None,
                    generator: torch.Generator | None = None) -> list[TurnTree]:
        """Phases 1–3: the initial chains, then the expansion rounds; returns the grown trees."""
        gen = generator if generator is not None else _generator(seed)
        trees = [
            TurnTree(encode_prompt(self.tok, ex.question, self.limits.max_prompt_tokens),
                     meta={"id": ex.id, "question": ex.question, "golden_answers": list(ex.golden_answers),
                           "data_source": ex.data_source})
            for ex in examples
        ]
        p = self.plan
        self.loop.run([self._new_chain(t) for t in trees for _ in range(p.initial_chains)], seed, tag="init")
        for it in range(p.expansion_iterations):
            branches = []
            for t in trees:
                picks = select_expansion_nodes(t.parents(), t.entropies(), t.is_leaf(), p.top_k,
                                               alpha=p.alpha, mode=p.expansion_mode, generator=gen)
                branches += [self._fork(t, n) for n in picks]
            self.loop.run(branches, seed, tag=("expand", it))
        return trees

    def score_leaves(self, tree: TurnTree) -> list[float]:
        """Set every leaf's training reward; return its evaluation EM (no format check), leaf by leaf."""
        golden = tree.meta["golden_answers"]
        em = []
        for i in tree.leaves():
            text = self.decode_response(tree, i)
            tree.nodes[i].reward = score(text, golden, training=True)
            em.append(score(text, golden, training=False))
        return em

    def decode_response(self, tree: TurnTree, leaf: int) -> str:
        return self.tok.decode(tree.response(leaf)[0], skip_special_tokens=True)

    def node_advantages(self, tree: TurnTree) -> list[float]:
        if self.plan.advantage == "tree":
            c = self.credit
            return tree.advantages(value_mode=c.value_mode, adv_mode=c.adv_mode, normalize_leaves=c.normalize_leaves)
        if self.plan.advantage == "grpo":
            return grpo_node_advantages(tree)
        return [0.0] * len(tree.nodes)

    def rollout(self, examples: Sequence["QAExample"], seed: int | None = None,
                generator: torch.Generator | None = None) -> RolloutBatch:
        """Trees, training sequences and statistics for one batch of prompts.

        ``seed`` fixes the engine's sampling and (without ``generator``) the expansion/leaf-sampling
        draws; None = fresh randomness.
        """
        if not examples:
            raise ValueError("rollout() needs at least one example")
        gen = generator if generator is not None else _generator(seed)
        before = LoopStats(**self.loop.stats.as_dict())
        t0 = time.perf_counter()
        trees = self.build_trees(examples, seed, gen)
        produced = produced_leaf_stats(trees)
        dropped = sum(t.drop_leaves("tool_error") for t in trees) if self.drop_tool_errors else 0
        sequences, em, advantages = [], [], []
        for k, tree in enumerate(trees):
            if not tree.leaves():  # every trajectory of this prompt ended in a failed tool call
                continue
            tree.sample_leaves(self.plan.leaves_per_tree, gen)
            em += self.score_leaves(tree)
            advantages.append((tree, self.node_advantages(tree)))
            for row in tree.training_sequences(advantages[-1][1]):
                row.tree_index = k
                sequences.append(row)
        loop = self.loop.stats.since(before)
        stats = rollout_statistics(trees, produced, loop, em)
        stats.update(credit_statistics(*zip(*advantages)) if advantages else {})
        stats["rollout/dropped_tool_error_leaves"] = float(dropped)
        stats["rollout/total_s"] = time.perf_counter() - t0
        return RolloutBatch(trees, sequences, stats, loop)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


# ---------------------------------------------------------------------------------------------------
# Running it from a config: the engine, the search server, the data (shared by `atpo rollout` and
# `atpo eval`; the trainer can use them too)

@contextlib.contextmanager
def search_environment(cfg: "Config"):
    """Yield a ``SearchClient`` for ``cfg.retriever``; starts/stops the embedded retriever.

    ``retriever.url == "embedded"`` starts ``env.retriever.RetrieverServer`` on a free loopback port
    over ``retriever.corpus`` (empty = the generated task's corpus, written if needed).
    """
    from atpo_megatron.env.search_tool import SearchClient

    with contextlib.ExitStack() as stack:
        url = cfg.retriever.url
        if url == "embedded":
            from atpo_megatron.env.retriever import RetrieverServer

            corpus = cfg.retriever.corpus or str(embedded_task(cfg).corpus)
            server = stack.enter_context(RetrieverServer(corpus, backend=cfg.retriever.backend, topk=cfg.retriever.topk))
            url = server.url
            log.info("embedded retriever (%s over %s) at %s", cfg.retriever.backend, corpus, url)
        yield stack.enter_context(SearchClient.from_config(cfg.retriever, url))


@contextlib.contextmanager
def rollout_environment(cfg: "Config", engine: Engine | None = None):
    """Yield ``(engine, search_client)`` for ``cfg`` (see :func:`search_environment`).

    ``engine``: reuse one (tests); otherwise ``make_engine`` for ``model.name_or_path`` in ``model.dtype``,
    closed on exit.
    """
    with search_environment(cfg) as client, contextlib.ExitStack() as stack:
        if engine is None:
            from atpo_megatron.hub import resolve_model
            from atpo_megatron.rollout.factory import make_engine

            engine = make_engine(cfg.rollout, resolve_model(cfg.model.name_or_path),
                                 dtype=getattr(torch, cfg.model.dtype))
            stack.callback(engine.close)
        yield engine, client


def embedded_task(cfg: "Config"):
    """The generated knowledge-base task of ``data.embedded_dir`` / ``data.embedded_seed`` (written once)."""
    from atpo_megatron.env.data import generate_task

    return generate_task(cfg.data.embedded_dir, seed=cfg.data.embedded_seed)


def load_examples(cfg: "Config", files: Sequence[str], split: str, limit: int = 0) -> list["QAExample"]:
    """Examples of ``files`` ("embedded" = the generated task's ``split``: train or test), at most
    ``limit`` per file (0 = all)."""
    from atpo_megatron.env.data import load_dataset

    out: list = []
    for f in files:
        path = getattr(embedded_task(cfg), split) if f == "embedded" else f
        rows = load_dataset(path)
        out += rows[:limit] if limit > 0 else rows
    if not out:
        raise ConfigError(f"no examples in {list(files)}; check data.train_files / data.eval_files / --data")
    return out


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
    from atpo_megatron.config import load_config, split_config_args
    from atpo_megatron.rollout.visualize import write_trees_html, write_trees_json

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
    with rollout_environment(cfg) as (engine, client):
        examples, _ = split_overlong(examples, engine.tokenizer, cfg.rollout.max_prompt_tokens)
        batch = TreeRollout.from_config(engine, client, cfg).rollout(
            examples[:n], seed=seed)
        write_trees_json(batch.trees, out / "trees.json", engine.tokenizer, batch.stats)
        write_trees_html(batch.trees, out / "trees.html", engine.tokenizer, batch.stats,
                         title=f"AT²PO rollout: {len(batch.trees)} prompts, mode {cfg.rollout.mode}, seed {seed}")
    (out / "stats.json").write_text(json.dumps(batch.stats, indent=1) + "\n")
    for k, v in batch.stats.items():
        print(f"{k:36s} {v:.4g}")
    print(f"wrote {out / 'trees.json'}, {out / 'trees.html'}, {out / 'stats.json'}")
    return 0
