"""Unit tests for atpo_megatron.algo.tree: paths, fork, sample_leaves, training rows, serialisation."""

import json

import pytest
import torch

from atpo_megatron.algo.credit import turn_advantages
from atpo_megatron.algo.tree import LeafSequence, TurnNode, TurnTree

PROMPT = [100, 101]


def _small_tree() -> TurnTree:
    """root 0
    |- 1: action [1 2 3] (tool call) -> 3: observation [50 51] + action [4 5] (eos, r = 1)
    `- 2: action [6 7] (eos, r = 0)
    """
    t = TurnTree(list(PROMPT), meta={"question": "q?", "golden_answers": ["a"]})
    n1 = t.add_child(0, [1, 2, 3], [1, 1, 1], [-0.1, -0.2, -0.3], entropy=0.2)
    n2 = t.add_child(0, [6, 7], [1, 1], [-1.0, -2.0], entropy=1.5)
    t.nodes[n1].finish_reason = "tool"
    n3 = t.add_child(n1, [50, 51, 4, 5], [0, 0, 1, 1], [0.0, 0.0, -0.4, -0.5], obs_len=2, entropy=0.45,
                     tool_calls=1)
    t.nodes[n2].finish_reason = t.nodes[n3].finish_reason = "eos"
    t.nodes[n2].reward, t.nodes[n3].reward = 0.0, 1.0
    return t


def test_structure_and_paths():
    t = _small_tree()
    assert t.parents() == [-1, 0, 0, 1]
    assert t.entropies() == [0.0, 0.2, 1.5, 0.45]
    assert t.is_leaf() == [False, False, True, True]
    assert t.leaves() == [2, 3]
    assert t.nodes[0].children == [1, 2] and t.nodes[1].children == [3]
    assert t.path(3) == [0, 1, 3]
    assert t.context_ids(3) == [100, 101, 1, 2, 3, 50, 51, 4, 5]
    assert t.response(3) == ([1, 2, 3, 50, 51, 4, 5], [1, 1, 1, 0, 0, 1, 1], [-0.1, -0.2, -0.3, 0.0, 0.0, -0.4, -0.5])
    assert t.context_ids(0) == PROMPT
    assert t.nodes[2].tool_calls == 0  # defaults to the parent's


def test_fork_keeps_only_the_observation():
    t = _small_tree()
    b = t.fork(3)
    node = t.nodes[b]
    assert b == 4 and node.parent == 1 and t.nodes[1].children == [3, 4]
    assert (node.tokens, node.mask, node.logprobs, node.obs_len) == ([50, 51], [0, 0], [0.0, 0.0], 2)
    assert node.entropy == 0.45 and node.tool_calls == 1  # the fork's context holds the same tool result
    assert node.finish_reason == "" and node.reward is None and node.children == []
    assert t.context_ids(b) == [100, 101, 1, 2, 3, 50, 51]  # the state before node 3's action
    # a first-turn node has no observation: its fork is an empty child of the root
    c = t.fork(1)
    assert t.nodes[c].parent == 0 and t.nodes[c].tokens == [] and t.nodes[c].entropy == 0.2
    assert t.nodes[c].tool_calls == 0
    # the root: a new empty chain
    r = t.fork(0)
    assert t.nodes[r].parent == 0 and t.nodes[r].tokens == [] and t.nodes[0].children == [1, 2, c, r]
    with pytest.raises(ValueError, match="cannot fork node 9"):
        t.fork(9)


def test_training_sequences_spans():
    t = _small_tree()
    a = [0.0, 0.7, -0.3, 1.1]
    rows = t.training_sequences(a)
    assert [r.leaf for r in rows] == [2, 3]
    r2, r3 = rows
    # node 1 owns positions [0, 3) = [len(response(0)), len(response(1))); node 3 owns [3, 7)
    assert len(t.response(1)[0]) == 3 and len(t.response(3)[0]) == 7
    assert r3.advantages == [0.7, 0.7, 0.7, 1.1, 1.1, 1.1, 1.1]
    assert r3.response_ids == [1, 2, 3, 50, 51, 4, 5]
    assert r3.loss_mask == [1, 1, 1, 0, 0, 1, 1]
    assert r3.old_logprobs == [-0.1, -0.2, -0.3, 0.0, 0.0, -0.4, -0.5]
    assert r3.turn_ids == [0, 0, 0, -1, -1, 1, 1]
    assert (r3.prompt_ids, r3.reward, r3.tree_index) == (PROMPT, 1.0, 0)
    assert r2 == LeafSequence(PROMPT, [6, 7], [1, 1], [-0.3, -0.3], [-1.0, -2.0], 0.0, 2)
    with pytest.raises(ValueError, match="3 entries for 4 nodes"):
        t.training_sequences(a[:3])
    t.nodes[2].reward = None
    with pytest.raises(ValueError, match="leaf 2 has no reward"):
        t.training_sequences(a)


def test_advantages_convenience_matches_credit():
    t = _small_tree()
    direct = turn_advantages([-1, 0, 0, 1], [0.0, 0.2, 1.5, 0.45], {2: 0.0, 3: 1.0}, value_mode="child_linear",
                             adv_mode="diff_root")
    assert t.advantages(value_mode="child_linear", adv_mode="diff_root") == direct
    # by hand, raw rewards, child_mean: V3 = 1, V1 = 1, V2 = 0, V0 = (1 + 0) / 2; diff_parent of node 3 = 0
    assert t.advantages(value_mode="child_mean", adv_mode="diff_parent", normalize_leaves=False) == pytest.approx(
        [0.0, 0.5, -0.5, 0.0])


def test_sample_leaves_duplicates_the_last_leaf():
    t = _small_tree()
    t.sample_leaves(4)
    assert t.leaves() == [2, 3, 4, 5]
    assert t.nodes[1].children == [3, 4, 5]  # copies are siblings of leaf 3
    rows = t.training_sequences(t.advantages())
    assert rows[1].response_ids == rows[2].response_ids == rows[3].response_ids
    assert rows[2].reward == rows[3].reward == 1.0
    t.validate()


def _wide_tree() -> TurnTree:
    """root -> 1 -> 3 (leaf); root -> 2 (leaf); root -> 4 -> {5, 6} (leaves); 4 -> 7 -> 8 (leaf)."""
    t = TurnTree([9])
    for parent in (0, 0, 1, 0, 4, 4, 4, 7):
        i = t.add_child(parent, [len(t.nodes)], [1], [-0.5])
        t.nodes[i].reward = float(i)
    return t


def test_sample_leaves_prunes_upward():
    leaves_before = _wide_tree().leaves()
    assert leaves_before == [2, 3, 5, 6, 8]
    kept_sets = set()
    for seed in range(30):
        t = _wide_tree()
        t.sample_leaves(1, torch.Generator().manual_seed(seed))
        t.validate()
        (leaf,) = t.leaves()
        assert len(t.nodes) == len(t.path(leaf))  # a single chain: every other branch is gone
        kept_sets.add(tuple(t.response(leaf)[0]))
    # the token of a node is its original index: each kept chain is an original trajectory
    assert kept_sets == {(2,), (1, 3), (4, 5), (4, 6), (4, 7, 8)}


def test_sample_leaves_prune_is_deterministic_and_renumbers():
    a, b = _wide_tree(), _wide_tree()
    a.sample_leaves(3, torch.Generator().manual_seed(5))
    b.sample_leaves(3, torch.Generator().manual_seed(5))
    assert a == b and len(a.leaves()) == 3
    # every surviving node lies on the path of a kept leaf, and rewards follow their nodes
    on_paths = {i for leaf in a.leaves() for i in a.path(leaf)}
    assert on_paths == set(range(len(a.nodes)))
    assert all(a.nodes[i].reward == float(a.nodes[i].tokens[0]) for i in range(1, len(a.nodes)))
    c = _wide_tree()
    c.sample_leaves(5, torch.Generator().manual_seed(0))
    assert c == _wide_tree()  # exactly n leaves already: nothing changes


def test_to_dict_round_trip_through_json():
    t = _small_tree()
    t.fork(3)
    d = json.loads(json.dumps(t.to_dict()))
    assert TurnTree.from_dict(d) == t


def test_bad_inputs_raise_clear_errors():
    t = _small_tree()
    with pytest.raises(ValueError, match="same length"):
        t.add_child(0, [1, 2], [1], [0.0, 0.0])
    with pytest.raises(ValueError, match="observation tokens"):
        t.add_child(0, [1, 2], [1, 1], [0.0, 0.0], obs_len=1)
    with pytest.raises(ValueError, match="parent 7 is not a node"):
        t.add_child(7)
    with pytest.raises(ValueError, match="logprobs must be finite"):
        t.add_child(0, [1], [1], [float("nan")])
    with pytest.raises(ValueError, match="n >= 1"):
        t.sample_leaves(0)
    with pytest.raises(ValueError, match="no leaves"):
        TurnTree([1]).sample_leaves(2)
    d = t.to_dict()
    d["nodes"][1]["children"] = []
    with pytest.raises(ValueError, match="lists children"):
        TurnTree.from_dict(d)
    with pytest.raises(ValueError, match="must be the root"):
        TurnTree([1], [TurnNode(parent=-1, tokens=[5], mask=[1], logprobs=[0.0])])
    with pytest.raises(ValueError, match="must come before its child"):
        TurnTree([1], [TurnNode(parent=-1, children=[1]), TurnNode(parent=1)])
