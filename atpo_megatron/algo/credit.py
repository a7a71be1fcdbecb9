"""Turn-wise credit assignment (spec §4): leaf rewards -> node values (Eq. 3) -> node advantages.

A tree is given as flat arrays over its nodes: ``parents[i]`` (``-1`` for the root, node 0) and
``entropy[i]`` (the node's turn entropy H, Eq. 2). Leaves are the nodes without children.
"""

import math
from collections.abc import Mapping, Sequence

VALUE_MODES = ("child_softmax", "child_linear", "child_mean", "leaf_mean")
ADV_MODES = ("node_value", "diff_parent", "diff_root", "diff_both")

LeafRewards = Mapping[int, float] | Sequence[float | None]


def children_of(parents: Sequence[int]) -> list[list[int]]:
    """Children lists of a tree given by ``parents``; raises ValueError unless it is one tree rooted at node 0."""
    n = len(parents)
    if n == 0 or parents[0] != -1:
        raise ValueError("parents[0] must be -1: node 0 is the root")
    children: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        p = parents[i]
        if not 0 <= p < n or p == i:
            raise ValueError(f"node {i} has parent {p}; parents must index another node (only the root has -1)")
        children[p].append(i)
    seen, stack = 1, [0]  # every node must hang below the root (no cycles)
    while stack:
        kids = children[stack.pop()]
        seen += len(kids)
        stack.extend(kids)
    if seen != n:
        raise ValueError("parents contain a cycle: some nodes are not reachable from the root")
    return children


def _post_order(children: list[list[int]]) -> list[int]:
    """Nodes ordered so that every child comes before its parent."""
    order, stack = [], [0]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(children[node])
    return order[::-1]


def _leaf_reward_list(leaf_rewards: LeafRewards, leaves: list[int], n: int) -> list[float]:
    """Rewards of ``leaves`` (in order) from a dict {leaf: r} or a list over all nodes with None at internal nodes."""
    if isinstance(leaf_rewards, Mapping):
        if set(leaf_rewards) != set(leaves):
            raise ValueError(
                f"leaf_rewards has keys {sorted(leaf_rewards)} but the leaves are {leaves}; give one reward per leaf"
            )
        rewards = [leaf_rewards[leaf] for leaf in leaves]
    else:
        if len(leaf_rewards) != n:
            raise ValueError(f"leaf_rewards has {len(leaf_rewards)} entries for {n} nodes; align it with the nodes")
        leaf_set = set(leaves)
        internal = [i for i, r in enumerate(leaf_rewards) if r is not None and i not in leaf_set]
        if internal:
            raise ValueError(f"nodes {internal} have children but a reward; use None for internal nodes")
        rewards = [leaf_rewards[leaf] for leaf in leaves]
    bad = [leaf for leaf, r in zip(leaves, rewards) if r is None or not math.isfinite(r)]
    if bad:
        raise ValueError(f"leaves {bad} have no finite reward; score every leaf before computing advantages")
    return [float(r) for r in rewards]


def normalize_rewards(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """Leaf z-score over one tree (spec §4.1): ``(r - mean) / (std + eps)``, population std (ddof = 0)."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + eps) for r in rewards]


def child_weights(child_entropy: Sequence[float], value_mode: str) -> list[float]:
    """Weights w_c of a node's children in Eq. 3.

    child_softmax (reference code): ``softmax(H)``; child_linear (paper): ``H / sum H``, the plain
    mean if the entropies sum to 0; child_mean: uniform.
    """
    k = len(child_entropy)
    if value_mode == "child_softmax":
        top = max(child_entropy)
        e = [math.exp(h - top) for h in child_entropy]
        return [x / sum(e) for x in e]
    if value_mode == "child_linear":
        total = sum(child_entropy)
        return [h / total for h in child_entropy] if total > 0 else [1.0 / k] * k
    if value_mode == "child_mean":
        return [1.0 / k] * k
    raise ValueError(f"child_weights has no mode {value_mode!r}; use child_softmax, child_linear or child_mean")


def node_values(
    children: list[list[int]], entropy: Sequence[float], leaf_values: Mapping[int, float], value_mode: str
) -> list[float]:
    """V_n for every node, bottom-up (Eq. 3): leaves keep their value; internal nodes combine their children's,
    or, in ``leaf_mean`` mode, average all their descendant leaves. ``children`` is ``children_of(parents)``.
    """
    values = [0.0] * len(children)
    leaf_sum = [0.0] * len(children)
    leaf_count = [0] * len(children)
    for node in _post_order(children):
        kids = children[node]
        if not kids:
            values[node] = leaf_sum[node] = leaf_values[node]
            leaf_count[node] = 1
            continue
        leaf_sum[node] = sum(leaf_sum[c] for c in kids)
        leaf_count[node] = sum(leaf_count[c] for c in kids)
        if value_mode == "leaf_mean":
            values[node] = leaf_sum[node] / leaf_count[node]
        else:
            w = child_weights([entropy[c] for c in kids], value_mode)
            values[node] = sum(wc * values[c] for wc, c in zip(w, kids))
    return values


def turn_advantages(
    parents: Sequence[int],
    entropy: Sequence[float],
    leaf_rewards: LeafRewards,
    *,
    value_mode: str = "child_softmax",
    adv_mode: str = "node_value",
    normalize_leaves: bool = True,
    eps: float = 1e-6,
) -> list[float]:
    """Advantage A_n of every node (spec §4.3); the root's entry is 0.0.

    ``leaf_rewards``: the raw reward of every leaf, either a dict ``{leaf: r}`` with exactly the
    leaves as keys, or a list aligned with the nodes holding None at internal nodes.
    ``adv_mode``: node_value ``V_n``; diff_parent ``V_n - V_parent``; diff_root ``V_n - V_root``;
    diff_both ``(V_n - V_parent) + (V_n - V_root)``.
    """
    if value_mode not in VALUE_MODES:
        raise ValueError(f"unknown value_mode {value_mode!r}; choose one of {VALUE_MODES}")
    if adv_mode not in ADV_MODES:
        raise ValueError(f"unknown adv_mode {adv_mode!r}; choose one of {ADV_MODES}")
    n = len(parents)
    if len(entropy) != n:
        raise ValueError(f"entropy has {len(entropy)} entries for {n} nodes; give one entropy per node")
    bad_h = [i for i, h in enumerate(entropy) if not (math.isfinite(h) and h >= 0)]
    if bad_h:
        raise ValueError(f"nodes {bad_h} have a negative or non-finite entropy; H is a mean NLL (>= 0)")
    children = children_of(parents)
    if not children[0]:
        raise ValueError("the root has no children: a tree needs at least one generated turn")
    leaves = [i for i in range(n) if not children[i]]
    rewards = _leaf_reward_list(leaf_rewards, leaves, n)
    if normalize_leaves:
        rewards = normalize_rewards(rewards, eps)
    values = node_values(children, entropy, dict(zip(leaves, rewards)), value_mode)
    root = values[0]
    advantages = [0.0] * n
    for i in range(1, n):
        v, parent = values[i], values[parents[i]]
        advantages[i] = {
            "node_value": v,
            "diff_parent": v - parent,
            "diff_root": v - root,
            "diff_both": (v - parent) + (v - root),
        }[adv_mode]
    return advantages
