"""Unit tests for atpo_megatron.algo.credit: every value_mode x adv_mode on a hand-computed tree."""

import math

import pytest

from atpo_megatron.algo.credit import ADV_MODES, VALUE_MODES, normalize_rewards, turn_advantages

# The tree used throughout:
#   0 root
#   |- 1 (H = 0.5)
#   |  |- 3 (H = 1.0)  leaf, r = 1
#   |  `- 4 (H = 0.0)  leaf, r = 0
#   `- 2 (H = 1.5)     leaf, r = -1
PARENTS = [-1, 0, 0, 1, 1]
ENTROPY = [0.0, 0.5, 1.5, 1.0, 0.0]
REWARDS = {2: -1.0, 3: 1.0, 4: 0.0}
E = math.e

# Node values with raw rewards (normalize_leaves=False), V2 = -1, V3 = 1, V4 = 0:
#   child_softmax: V1 = (e^1 * 1 + e^0 * 0) / (e^1 + e^0) = e / (e + 1)
#                  V0 = (e^0.5 V1 + e^1.5 * -1) / (e^0.5 + e^1.5) = (V1 - e) / (1 + e)
#   child_linear:  V1 = (1.0 * 1 + 0.0 * 0) / 1.0 = 1;  V0 = (0.5 * 1 + 1.5 * -1) / 2.0 = -0.5
#   child_mean:    V1 = (1 + 0) / 2 = 0.5;              V0 = (0.5 - 1) / 2 = -0.25
#   leaf_mean:     V1 = (1 + 0) / 2 = 0.5;              V0 = (1 + 0 - 1) / 3 = 0
_V1_SOFT = E / (E + 1)
VALUES = {
    "child_softmax": [(_V1_SOFT - E) / (1 + E), _V1_SOFT, -1.0, 1.0, 0.0],
    "child_linear": [-0.5, 1.0, -1.0, 1.0, 0.0],
    "child_mean": [-0.25, 0.5, -1.0, 1.0, 0.0],
    "leaf_mean": [0.0, 0.5, -1.0, 1.0, 0.0],
}


def _expected_advantages(v: list[float], adv_mode: str) -> list[float]:
    # parent of 1, 2 is 0; parent of 3, 4 is 1
    parent_v = [0.0, v[0], v[0], v[1], v[1]]
    out = []
    for i in range(1, 5):
        local, glob = v[i] - parent_v[i], v[i] - v[0]
        out.append({"node_value": v[i], "diff_parent": local, "diff_root": glob, "diff_both": local + glob}[adv_mode])
    return [0.0] + out


def test_hand_values_are_distinct():
    # guards the table itself: each mode gives a different root value
    assert len({round(v[0], 6) for v in VALUES.values()}) == 4
    assert VALUES["child_softmax"][0] == pytest.approx(-0.534447, abs=1e-6)


@pytest.mark.parametrize("value_mode", VALUE_MODES)
@pytest.mark.parametrize("adv_mode", ADV_MODES)
def test_every_mode_by_hand(value_mode, adv_mode):
    adv = turn_advantages(
        PARENTS, ENTROPY, REWARDS, value_mode=value_mode, adv_mode=adv_mode, normalize_leaves=False
    )
    assert adv == pytest.approx(_expected_advantages(VALUES[value_mode], adv_mode), abs=1e-12)
    assert adv[0] == 0.0


def test_spot_values_written_out():
    # child_linear diff_parent: node 3 = V3 - V1 = 1 - 1 = 0; node 2 = V2 - V0 = -1 - (-0.5) = -0.5
    adv = turn_advantages(PARENTS, ENTROPY, REWARDS, value_mode="child_linear", adv_mode="diff_parent",
                          normalize_leaves=False)
    assert adv == pytest.approx([0.0, 1.5, -0.5, 0.0, -1.0])
    # leaf_mean diff_both: node 1 = (0.5 - 0) + (0.5 - 0) = 1; node 3 = (1 - 0.5) + (1 - 0) = 1.5;
    # node 4 = (0 - 0.5) + (0 - 0) = -0.5
    adv = turn_advantages(PARENTS, ENTROPY, REWARDS, value_mode="leaf_mean", adv_mode="diff_both",
                          normalize_leaves=False)
    assert adv == pytest.approx([0.0, 1.0, -2.0, 1.5, -0.5])


def test_leaf_normalisation_population_std():
    # rewards (-1, 1, 0): mean 0, population std sqrt((1 + 1 + 0) / 3) = sqrt(2/3)
    s = math.sqrt(2 / 3) + 1e-6
    adv = turn_advantages(PARENTS, ENTROPY, REWARDS, value_mode="child_mean")
    # node_value, child_mean: V1 = (1/s + 0) / 2, V2 = -1/s, V3 = 1/s, V4 = 0
    assert adv == pytest.approx([0.0, 0.5 / s, -1 / s, 1 / s, 0.0], abs=1e-12)
    assert normalize_rewards([0.0, 2.0]) == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6)], abs=1e-15)
    assert normalize_rewards([0.0, 2.0], eps=1.0) == pytest.approx([-0.5, 0.5])


def test_child_linear_zero_entropies_falls_back_to_mean():
    entropy = [0.0, 0.5, 1.5, 0.0, 0.0]  # children of node 1 both have H = 0
    adv = turn_advantages(PARENTS, entropy, REWARDS, value_mode="child_linear", normalize_leaves=False)
    assert adv[1] == pytest.approx(0.5)  # (1 + 0) / 2


@pytest.mark.parametrize("value_mode", VALUE_MODES)
@pytest.mark.parametrize("adv_mode", ADV_MODES)
def test_all_equal_rewards_give_zero_advantages(value_mode, adv_mode):
    rewards = {2: 1.0, 3: 1.0, 4: 1.0}
    adv = turn_advantages(PARENTS, ENTROPY, rewards, value_mode=value_mode, adv_mode=adv_mode)
    assert adv == [0.0] * 5


def test_list_and_dict_reward_formats_agree():
    as_list = [None, None, -1.0, 1.0, 0.0]
    assert turn_advantages(PARENTS, ENTROPY, as_list) == turn_advantages(PARENTS, ENTROPY, REWARDS)


def test_deep_chain_softmax_weights():
    # 0 -> 1 -> {2 (H=0, r=1), 3 (H=ln 3, r=0)}: softmax(0, ln 3) = (1/4, 3/4) -> V1 = 0.25; the chain
    # node 1 is the root's only child, so V0 = V1 and diff_root gives 0 for node 1
    parents = [-1, 0, 1, 1]
    entropy = [0.0, 0.7, 0.0, math.log(3)]
    adv = turn_advantages(parents, entropy, {2: 1.0, 3: 0.0}, normalize_leaves=False)
    assert adv == pytest.approx([0.0, 0.25, 1.0, 0.0])
    adv = turn_advantages(parents, entropy, {2: 1.0, 3: 0.0}, normalize_leaves=False, adv_mode="diff_root")
    assert adv == pytest.approx([0.0, 0.0, 0.75, -0.25])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown value_mode"):
        turn_advantages(PARENTS, ENTROPY, REWARDS, value_mode="softmax")
    with pytest.raises(ValueError, match="unknown adv_mode"):
        turn_advantages(PARENTS, ENTROPY, REWARDS, adv_mode="diff_global")
    with pytest.raises(ValueError, match="node 0 is the root"):
        turn_advantages([0, 0], [0.0, 0.0], {1: 1.0})
    with pytest.raises(ValueError, match="cycle"):
        turn_advantages([-1, 0, 3, 2], [0.0] * 4, {1: 1.0})
    with pytest.raises(ValueError, match="node 2 has parent 7"):
        turn_advantages([-1, 0, 7], [0.0] * 3, {1: 1.0, 2: 0.0})
    with pytest.raises(ValueError, match="entropy has 4 entries"):
        turn_advantages(PARENTS, ENTROPY[:4], REWARDS)
    with pytest.raises(ValueError, match="negative or non-finite entropy"):
        turn_advantages(PARENTS, [0.0, float("nan"), 1.5, 1.0, 0.0], REWARDS)
    with pytest.raises(ValueError, match="one reward per leaf"):
        turn_advantages(PARENTS, ENTROPY, {2: 1.0, 3: 0.0})
    with pytest.raises(ValueError, match="no finite reward"):
        turn_advantages(PARENTS, ENTROPY, {2: 1.0, 3: float("nan"), 4: 0.0})
    with pytest.raises(ValueError, match="no finite reward"):
        turn_advantages(PARENTS, ENTROPY, [None, None, 1.0, None, 0.0])
    with pytest.raises(ValueError, match="have children but a reward"):
        turn_advantages(PARENTS, ENTROPY, [None, 0.5, -1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="align it with the nodes"):
        turn_advantages(PARENTS, ENTROPY, [None, None, 1.0])
    with pytest.raises(ValueError, match="root has no children"):
        turn_advantages([-1], [0.0], {})
