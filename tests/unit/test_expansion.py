"""Unit tests for atpo_megatron.algo.expansion: scores, ties, cycling, random determinism, errors."""

import pytest
import torch

from atpo_megatron.algo.expansion import expansion_scores, select_expansion_nodes

# 0 root
# |- 1 (H 0.9) - 4 (H 0.86) - 5 leaf
# |- 2 (H 2.0) leaf
# `- 3 (H 0.8) - 6 leaf
PARENTS = [-1, 0, 0, 0, 1, 4, 3]
ENTROPY = [0.0, 0.9, 2.0, 0.8, 0.86, 5.0, 5.0]
IS_LEAF = [False, False, True, False, False, True, True]


def test_scores_by_hand():
    # root has 3 children -> its children and the root itself pay 0.05 * (3 - 1) = 0.1; node 4 is an only child
    # root: 0 - 0.1; 1: 0.9 - 0.1; 2: 2.0 - 0.1; 3: 0.8 - 0.1; 4: 0.86 - 0; 5: 5 - 0; 6: 5 - 0
    assert expansion_scores(PARENTS, ENTROPY, 0.05) == pytest.approx([-0.1, 0.8, 1.9, 0.7, 0.86, 5.0, 5.0])


def test_penalty_changes_the_ranking():
    # leaves 2, 5, 6 are never candidates despite their high entropy
    # with alpha = 0.05: 4 (0.86) > 1 (0.8) > 3 (0.7) > 0 (-0.1)
    assert select_expansion_nodes(PARENTS, ENTROPY, IS_LEAF, 4) == [4, 1, 3, 0]
    # without the penalty: 1 (0.9) > 4 (0.86) > 3 (0.8) > 0 (0.0)
    assert select_expansion_nodes(PARENTS, ENTROPY, IS_LEAF, 2, alpha=0.0) == [1, 4]


def test_fewer_candidates_than_k_cycles_the_sorted_list():
    assert select_expansion_nodes(PARENTS, ENTROPY, IS_LEAF, 6) == [4, 1, 3, 0, 4, 1]


def test_ties_go_to_the_lower_index():
    parents = [-1, 0, 0, 1, 2, 3, 4]
    entropy = [0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0]
    is_leaf = [False, False, False, False, False, True, True]
    # root has 2 children: root, 1, 2 score 0.5 - 0.05 = 0.45; 3 and 4 are only children: 0.5
    assert select_expansion_nodes(parents, entropy, is_leaf, 5) == [3, 4, 0, 1, 2]


def test_root_only_child_has_no_penalty():
    # a single chain: root with one child -> max(0, 1 - 1) = 0 for the root and for node 1
    assert expansion_scores([-1, 0, 1], [0.3, 0.4, 0.0], 0.05) == pytest.approx([0.3, 0.4, 0.0])
    assert select_expansion_nodes([-1, 0, 1], [0.3, 0.4, 0.0], [False, False, True], 3) == [1, 0, 1]


def test_random_mode_is_deterministic_and_uniform_over_candidates():
    def pick(seed: int, k: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return select_expansion_nodes(PARENTS, ENTROPY, IS_LEAF, k, mode="random", generator=g)

    assert pick(0, 3) == pick(0, 3)
    draws = [pick(seed, 3) for seed in range(40)]
    for d in draws:
        assert len(set(d)) == 3 and set(d) <= {0, 1, 3, 4}
    assert len({tuple(d) for d in draws}) > 5  # really random across seeds
    counts = {c: sum(c in d for d in draws) for c in (0, 1, 3, 4)}
    assert all(c > 0 for c in counts.values())  # leaves-only entropy does not matter here
    cycled = pick(1, 10)
    assert sorted(cycled[:4]) == [0, 1, 3, 4] and cycled[4:] == cycled[:4] + cycled[:2]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="k must be a positive int"):
        select_expansion_nodes(PARENTS, ENTROPY, IS_LEAF, 0)
    with pytest.raises(ValueError, match="unknown expansion mode"):
        select_expansion_nodes(PARENTS, ENTROPY, IS_LEAF, 2, mode="ucb")
    with pytest.raises(ValueError, match="no expandable node"):
        select_expansion_nodes([-1, 0], [0.0, 1.0], [True, True], 2)
    with pytest.raises(ValueError, match="one entry per node"):
        select_expansion_nodes(PARENTS, ENTROPY[:-1], IS_LEAF, 2)
    with pytest.raises(ValueError, match="non-finite entropy"):
        select_expansion_nodes(PARENTS, [float("nan")] + ENTROPY[1:], IS_LEAF, 2)
    with pytest.raises(ValueError, match="node 0 is the root"):
        select_expansion_nodes([0, 0], [0.0, 0.0], [False, True], 1)
