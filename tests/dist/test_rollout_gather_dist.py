"""Rollout statistics gathered from the rollout engines (``rollout_groups.gather_rollouts``), 2 gloo ranks.

Issue 13 defect 2: counts (``rollout/leaves``, generated tokens, tool errors, ...) were averaged over the
DP leaders instead of summed, so they were under-reported by the DP size. Each rank below plays one
rollout engine with hand-written statistics; the merged values are computed by hand.
"""

from __future__ import annotations

import pytest
from launch import run_dist

pytestmark = [pytest.mark.dist]

PARTS = [
    {"rollout/trees": 2.0, "rollout/leaves": 6.0, "rollout/sequences": 6.0, "rollout/leaves_per_tree": 3.0,
     "rollout/turns_per_leaf": 1.5, "rollout/generated_tokens": 300.0, "rollout/chain_tokens": 400.0,
     "rollout/token_saving": 0.25, "rollout/tool_errors": 1.0, "rollout/reward_mean": -1.0,
     "rollout/finish_eos": 0.5, "rollout/uniform_reward_trees": 1.0, "rollout/generate_s": 2.0},
    {"rollout/trees": 2.0, "rollout/leaves": 4.0, "rollout/sequences": 6.0, "rollout/leaves_per_tree": 2.0,
     "rollout/turns_per_leaf": 1.0, "rollout/generated_tokens": 100.0, "rollout/chain_tokens": 100.0,
     "rollout/token_saving": 0.0, "rollout/tool_errors": 0.0, "rollout/reward_mean": 0.5,
     "rollout/finish_eos": 1.0, "rollout/uniform_reward_trees": 0.5, "rollout/generate_s": 3.0},
]


def gather_worker():
    from types import SimpleNamespace

    import torch.distributed as dist

    from atpo_megatron.rollout_groups import gather_rollouts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    local = SimpleNamespace(sequences=[SimpleNamespace(tree_index=i) for i in range(2)], stats=dict(PARTS[rank]))
    ranks = SimpleNamespace(reports=True, group=rank)  # each rank is its own rollout engine
    sequences, stats = gather_rollouts(local, ranks, share=2)
    dist.destroy_process_group()
    return {"tree_index": [s.tree_index for s in sequences], "stats": stats}


def test_counts_are_summed_and_means_weighted_over_leaders():
    results = run_dist(__file__, "gather_worker", nproc=2, timeout=120)
    assert results[0] == results[1]
    assert results[0]["tree_index"] == [0, 1, 2, 3]  # prompts renumbered globally
    stats = results[0]["stats"]
    expected = {
        "rollout/trees": 4.0, "rollout/leaves": 10.0, "rollout/sequences": 12.0,  # counts: sums
        "rollout/generated_tokens": 400.0, "rollout/chain_tokens": 500.0, "rollout/tool_errors": 1.0,
        "rollout/leaves_per_tree": 10 / 4,  # 10 leaves over 4 trees
        "rollout/turns_per_leaf": (1.5 * 6 + 1.0 * 4) / 10,  # per produced leaf
        "rollout/finish_eos": (0.5 * 6 + 1.0 * 4) / 10,
        "rollout/token_saving": 1 - 400 / 500,
        "rollout/reward_mean": (-1.0 * 6 + 0.5 * 6) / 12,  # per retained sequence
        "rollout/uniform_reward_trees": (1.0 * 2 + 0.5 * 2) / 4,  # per tree
        "rollout/generate_s": 3.0,  # the leaders run in parallel: the slowest one's time
    }
    assert stats == pytest.approx(expected)
