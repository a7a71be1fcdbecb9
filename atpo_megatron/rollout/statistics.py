"""The ``rollout/*`` statistics of a batch of turn trees, and their merge over several rollout engines.

    produced = produced_leaf_stats(trees)                    # before leaf sampling
    stats = rollout_statistics(trees, produced, loop, em)    # after the leaves are scored
    merged = merge_rollout_stats([stats_of_engine_0, stats_of_engine_1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from atpo_megatron.algo.tree import TurnTree
from atpo_megatron.rollout.agent_loop import LEAF_REASONS, LoopStats


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
