"""Turn-level tree rollouts (spec §3.3), and the chain rollouts of the GRPO/GSPO baselines.

    rollout = TreeRollout.from_config(engine, search_client, cfg)
    sampled = rollout.sample(examples, seed=step)   # SampledTrees: trees with their leaves sampled

Tree mode, per batch of prompts (every phase batched over all trees of the batch):

1. M = ``tree.initial_chains`` empty children of every root, generated to their leaves together;
2. L = ``tree.expansion_iterations`` rounds: per tree, ``select_expansion_nodes`` picks K =
   ``tree.top_k`` non-leaf nodes; each gets one new branch (``TurnTree.fork``: a sibling that re-samples
   the node's turn from the same observation); all new branches of all trees run to their leaves together;
3. leaves that ended in a failed tool call are dropped (unless ``rollout.train_on_tool_errors``), then
   ``sample_leaves(tree.leaves_per_tree)``.

Chain mode (``rollout.mode=chain``) is the same code with M = ``rollout.chains`` and L = 0.
Greedy evaluation is M = 1, L = 0, temperature 0 (:meth:`RolloutPlan.greedy`). Rewards
(``env.reward.score_leaves``) and credit (``algo.advantages.assign_credit``: turn-wise for trees, the
GRPO outcome advantage for chains, as ``RolloutPlan.advantage`` says) are the next stages
(``experience.make_experience``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from atpo_megatron.algo.advantages import AdvantageKind
from atpo_megatron.algo.expansion import select_expansion_nodes
from atpo_megatron.algo.tree import TurnTree
from atpo_megatron.rollout.agent_loop import AgentLoop, LoopLimits, LoopStats, encode_prompt, sampling_from_config
from atpo_megatron.rollout.engine import Engine
from atpo_megatron.rollout.statistics import produced_leaf_stats

if TYPE_CHECKING:
    from atpo_megatron.config import Config, RolloutConfig
    from atpo_megatron.env.data import QAExample

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
class SampledTrees:
    """What sampling one prompt batch gives: trees whose leaves are the sampled ones, not yet scored."""

    trees: list[TurnTree]
    produced: dict[str, Any]
    """Leaf counts, turns, tool calls, finish reasons before leaf sampling (``produced_leaf_stats``)."""
    loop: LoopStats
    """The agent loop's counters of this batch alone."""
    dropped_tool_error_leaves: int = 0
    seconds: float = 0.0


class TreeRollout:
    """Samples the turn trees of a prompt batch with an engine and a search client (the agent loop).

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
        *,
        greedy: bool = False,
        limits: LoopLimits | None = None,
    ):
        self.engine = engine
        self.tok = engine.tokenizer
        self.plan = plan
        self.limits = limits or LoopLimits.from_config(rollout)
        self.drop_tool_errors = plan.advantage != "none" and not rollout.train_on_tool_errors
        self.loop = AgentLoop(engine, search_client, self.limits, sampling_from_config(rollout, greedy))
        self.prefix_ids = self.loop.encode(rollout.assistant_prefix) if rollout.assistant_prefix else []

    @classmethod
    def from_config(cls, engine: Engine, search_client: Any, cfg: "Config", **kwargs) -> "TreeRollout":
        return cls(engine, search_client, cfg.rollout, RolloutPlan.from_config(cfg), **kwargs)

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
        """Phases 1-2: the initial chains, then the expansion rounds; returns the grown trees."""
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

    def sample(self, examples: Sequence["QAExample"], seed: int | None = None,
               generator: torch.Generator | None = None) -> SampledTrees:
        """The trees of one batch of prompts, each left with its sampled leaves (phases 1-3).

        ``seed`` fixes the engine's sampling and (without ``generator``) the expansion/leaf-sampling
        draws; None = fresh randomness.
        """
        if not examples:
            raise ValueError("sample() needs at least one example")
        gen = generator if generator is not None else _generator(seed)
        before = LoopStats(**self.loop.stats.as_dict())
        t0 = time.perf_counter()
        trees = self.build_trees(examples, seed, gen)
        produced = produced_leaf_stats(trees)
        dropped = sum(t.drop_leaves("tool_error") for t in trees) if self.drop_tool_errors else 0
        for tree in trees:
            if tree.leaves():  # else every trajectory of this prompt ended in a failed tool call
                tree.sample_leaves(self.plan.leaves_per_tree, gen)
        return SampledTrees(trees, produced, self.loop.stats.since(before), dropped, time.perf_counter() - t0)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
