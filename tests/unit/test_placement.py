"""The rollout placement rule as a pure function: the 70B job (64 ranks) and the paper's 8-GPU node."""

import pytest

from atpo_megatron.config import ConfigError
from atpo_megatron.rollout.placement import RolloutPlacement

LLAMA3_70B_LAYERS = 80


def test_70b_every_gpu_samples_one_engine_per_node():
    p = RolloutPlacement(world_size=64, ranks_per_node=8, rollout_tp=8, actor_tp=4, actor_pp=4)
    assert p.num_groups == 8  # was: one TP8 engine per model-parallel group of 16 GPUs (4 engines)
    assert [p.group_ranks(g) for g in (0, 7)] == [list(range(8)), list(range(56, 64))]
    assert all(p.group_of(r) == r // 8 for r in range(64))
    assert [r for r in range(64) if p.is_group_leader(r)] == list(range(0, 64, 8))
    assert [p.device_index(r) for r in range(64)] == list(range(8)) * 8  # never a shared cuda:0
    assert [p.prompt_slice(g, 64) for g in (0, 3)] == [slice(0, 8), slice(24, 32)]
    covered = sorted(i for g in range(8) for i in range(64)[p.prompt_slice(g, 64)])
    assert covered == list(range(64))


def test_70b_each_rank_gets_every_layer_from_its_pipeline_group():
    p = RolloutPlacement(world_size=64, ranks_per_node=8, rollout_tp=8, actor_tp=4, actor_pp=4)
    assert p.actor_dp == 4
    # Megatron's tp-dp-pp order: rank 45 = tp 1, dp 3, pp 2
    assert p.actor_coords(45) == (1, 3, 2)
    assert [p.pp_stage_of_layer(layer, LLAMA3_70B_LAYERS) for layer in (0, 19, 20, 79)] == [0, 0, 1, 3]
    for rank in range(64):
        tp, dp, _ = p.actor_coords(rank)
        pipeline = {tp + 4 * (dp + 4 * s) for s in range(4)}  # rank's pipeline group
        sources = {p.weight_source(rank, layer, LLAMA3_70B_LAYERS) for layer in range(-1, LLAMA3_70B_LAYERS + 1)}
        assert sources == pipeline  # every stage sends, nobody outside the pipeline group does
        assert p.weight_source(rank, -1, 80) == tp + 4 * dp  # embedding: stage 0
        assert p.weight_source(rank, 80, 80) == tp + 4 * (dp + 4 * 3)  # final norm / lm_head: last stage
    # node 0's engine (ranks 0-7) is fed layers 20-39 by stage 1: ranks 16-23
    assert [p.weight_source(r, 25, 80) for r in range(8)] == list(range(16, 24))


def test_70b_pp8_layout():
    p = RolloutPlacement(world_size=64, ranks_per_node=8, rollout_tp=8, actor_tp=4, actor_pp=8)
    assert p.actor_dp == 2 and p.num_groups == 8
    assert p.pp_stage_of_layer(79, 80) == 7 and p.weight_source(0, 79, 80) == 56


def test_paper_layout_8_gpus_rollout_tp1():
    # the paper: one node of 8 GPUs, vLLM TP=1 (8 engines), actor layout free (here TP2)
    p = RolloutPlacement(world_size=8, ranks_per_node=8, rollout_tp=1, actor_tp=2, actor_pp=1)
    assert p.num_groups == 8 and all(p.is_group_leader(r) and p.group_of(r) == r for r in range(8))
    assert [p.prompt_slice(g, 64) for g in (0, 7)] == [slice(0, 8), slice(56, 64)]
    assert p.weight_source(5, 10, 36) == 5  # PP=1: every rank already holds every layer after the TP gather


def test_impossible_layouts_are_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"rollout.tp_size=3 must divide the 8 ranks of a node"):
        RolloutPlacement(world_size=16, ranks_per_node=8, rollout_tp=3)
    with pytest.raises(ConfigError, match=r"train.batch_prompts=12 must be divisible by the 8 rollout engines"):
        RolloutPlacement(world_size=8, ranks_per_node=8, rollout_tp=1).prompt_slice(0, 12)
    with pytest.raises(ConfigError, match="do not split evenly over parallel.pp=3"):
        RolloutPlacement(world_size=6, ranks_per_node=6, rollout_tp=1, actor_pp=3).pp_stage_of_layer(0, 80)
    with pytest.raises(ValueError, match="outside the world"):
        RolloutPlacement(world_size=8, ranks_per_node=8, rollout_tp=1).group_of(8)
