"""Entropy-guided tree expansion (spec §3.3, paper Alg. 1): which nodes to re-sample next.

Candidates are the non-leaf nodes (root included). Each selected node n gets one new branch: a
re-sample of n's own turn from the state before its action (``TurnTree.fork``).
"""

import math
from collections.abc import Sequence

import torch

from atpo_megatron.algo.credit import children_of

EXPANSION_MODES = ("entropy", "random")


def expansion_scores(parents: Sequence[int], entropy: Sequence[float], alpha: float) -> list[float]:
    """Branching-penalised score of every node (spec §3.3, code form of the paper's s(n)):
    ``s(n) = H(n) - alpha * max(0, |children(parent(n))| - 1)``; the root uses its own children.
    """
    n_children = [len(c) for c in children_of(parents)]
    scores = []
    for i, h in enumerate(entropy):
        siblings = n_children[parents[i]] if i > 0 else n_children[0]
        scores.append(h - alpha * max(0, siblings - 1))
    return scores


def _cycle(ordered: list[int], k: int) -> list[int]:
    return [ordered[i % len(ordered)] for i in range(k)]


def select_expansion_nodes(
    parents: Sequence[int],
    entropy: Sequence[float],
    is_leaf: Sequence[bool],
    k: int,
    *,
    alpha: float = 0.05,
    mode: str = "entropy",
    generator: torch.Generator | None = None,
) -> list[int]:
    """The k nodes to expand this iteration (scores computed once, so picks are distinct unless |C| < k).

    ``entropy`` mode: top-k by ``expansion_scores`` descending, ties to the lower index. ``random``
    mode: k candidates drawn uniformly without replacement with ``generator``. When there are fewer
    than k candidates, the ordered candidates are repeated cyclically to length k.
    """
    if mode not in EXPANSION_MODES:
        raise ValueError(f"unknown expansion mode {mode!r}; choose one of {EXPANSION_MODES}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (nodes to expand per iteration), got {k!r}")
    n = len(parents)
    if len(entropy) != n or len(is_leaf) != n:
        raise ValueError(f"parents, entropy and is_leaf must have one entry per node, got {n}, {len(entropy)}, "
                         f"{len(is_leaf)}")
    children_of(parents)  # validates the tree
    candidates = [i for i in range(n) if not is_leaf[i]]
    if not candidates:
        raise ValueError("no expandable node: every node is a leaf (expansion needs a root with children)")
    if mode == "random":
        order = torch.randperm(len(candidates), generator=generator).tolist()
        return _cycle([candidates[j] for j in order], k)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    bad = [i for i in candidates if not math.isfinite(entropy[i])]
    if bad:
        raise ValueError(f"nodes {bad} have a non-finite entropy; check the sampler log-probs")
    scores = expansion_scores(parents, entropy, alpha)
    ranked = sorted(candidates, key=lambda i: (-scores[i], i))
    return _cycle(ranked, k)
