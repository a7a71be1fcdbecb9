"""Reward to credit for a batch of scored trees: node advantages, the training sequences, ``credit/*``.

    sequences, stats = assign_credit(trees, "tree", cfg.credit)   # after env.reward.score_leaves

Three kinds (``RolloutPlan.advantage``): ``tree``, AT²PO's turn-wise credit (spec §4, Eqs. 3-5:
``TurnTree.advantages`` with ``credit.*``); ``grpo``, the outcome z-score per prompt of the chain
baselines; ``none``, all zero (greedy evaluation). Every leaf must hold its reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from atpo_megatron.algo.tree import LeafSequence, TurnTree

AdvantageKind = Literal["tree", "grpo", "none"]


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


def node_advantages(tree: TurnTree, kind: AdvantageKind, credit: Any = None) -> list[float]:
    """The advantage of every node of a scored tree; ``credit`` (a ``CreditConfig``) for ``tree``."""
    if kind == "tree":
        if credit is None:
            raise ValueError("tree advantages need a CreditConfig (credit=cfg.credit)")
        return tree.advantages(value_mode=credit.value_mode, adv_mode=credit.adv_mode,
                               normalize_leaves=credit.normalize_leaves)
    if kind == "grpo":
        return grpo_node_advantages(tree)
    if kind == "none":
        return [0.0] * len(tree.nodes)
    raise ValueError(f"advantage kind {kind!r}; choose tree, grpo or none")


def assign_credit(trees: Sequence[TurnTree], kind: AdvantageKind, credit: Any = None,
                  ) -> tuple[list[LeafSequence], dict[str, float]]:
    """One ``LeafSequence`` per leaf (``tree_index`` = the tree's position in ``trees``) and the
    ``credit/*`` statistics. Trees left without leaves (every trajectory ended in a dropped tool
    error) contribute nothing."""
    sequences, scored, advantages = [], [], []
    for k, tree in enumerate(trees):
        if not tree.leaves():
            continue
        adv = node_advantages(tree, kind, credit)
        scored.append(tree)
        advantages.append(adv)
        for row in tree.training_sequences(adv):
            row.tree_index = k
            sequences.append(row)
    return sequences, credit_statistics(scored, advantages)


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
