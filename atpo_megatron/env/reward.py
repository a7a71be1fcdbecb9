"""Rule-based reward for search-agent responses (spec 2.3; paper Eq. 16, code `deep_research_em.py`).

The response is the decoded text after the prompt, tool results included:

    <think> ... </think> <search> q </search> <result> ... </result> <think> ... </think>
    <answer> The final answer is \\[ \\boxed{Paris} \\] </answer>

Training reward: -1 for a malformed response (or one without a parsable answer), otherwise exact
match (1.0 / 0.0) of the last ``\\boxed{}`` of the answer block. Evaluation skips the format check.
:func:`score_leaves` sets the training reward of every leaf of a batch of turn trees.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = "\\boxed{"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces balanced), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(_BOXED) - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(_BOXED) : i]
    return None  # the braces never close


def extract_answer(response: str) -> str | None:
    """The last ``\\boxed{...}`` inside the last complete ``<answer>...</answer>`` block, or None."""
    blocks = _ANSWER_BLOCK.findall(response)
    if not blocks:
        return None
    return _last_boxed(blocks[-1])


def _searches_have_results(response: str) -> bool:
    """Every ``<search>...</search>`` is followed, before the next ``<search>``, by ``<result>...</result>``."""
    starts = [m.start() for m in re.finditer(re.escape("<search>"), response)]
    for i, start in enumerate(starts):
        next_search = starts[i + 1] if i + 1 < len(starts) else len(response)
        search_end = response.find("</search>", start)
        result = response.find("<result>", search_end) if search_end >= 0 else -1
        result_end = response.find("</result>", result) if result >= 0 else -1
        if result_end < 0 or result_end > next_search:
            return False
    return True


def format_ok(response: str) -> bool:
    """The training-time format check (spec 2.3).

    - as many ``<think>`` as ``</think>``, and at least one;
    - exactly one ``<answer>`` and one ``</answer>``, in that order;
    - every ``<search>...</search>`` followed in order by ``<result>...</result>``;
    - the answer block contains ``\\boxed{``.
    """
    n_think = response.count("<think>")
    if n_think < 1 or n_think != response.count("</think>"):
        return False
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return False
    start, end = response.find("<answer>"), response.find("</answer>")
    if end < start or _BOXED not in response[start:end]:
        return False
    return _searches_have_results(response)


def _exact_match(prediction: str, golden_answers: list[str] | str) -> bool:
    if isinstance(golden_answers, str):
        golden_answers = [golden_answers]
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(golden) for golden in golden_answers)


def score(response: str, golden_answers: list[str] | str, *, training: bool = True) -> float:
    """Leaf reward.

    training=True: -1.0 if ``format_ok`` fails or no answer can be extracted, else 1.0 on an exact
    match with any golden answer, else 0.0. training=False (evaluation): no format check; 1.0 on an
    exact match, 0.0 otherwise (also without an answer).
    """
    if training and not format_ok(response):
        return -1.0
    answer = extract_answer(response)
    if answer is None:
        return -1.0 if training else 0.0
    return 1.0 if _exact_match(answer, golden_answers) else 0.0


def response_text(tree: Any, leaf: int, tokenizer: Any) -> str:
    """What the reward reads: the response of ``leaf`` (tool results included) decoded with
    ``skip_special_tokens=True``."""
    return tokenizer.decode(tree.response(leaf)[0], skip_special_tokens=True)


def score_leaves(trees: Sequence[Any], tokenizer: Any) -> list[float]:
    """Set the training reward of every leaf of ``trees`` (``TurnTree``s) from its response decoded with
    ``skip_special_tokens=True``; return the evaluation EM (no format check) of each leaf, in order."""
    em = []
    for tree in trees:
        golden = tree.meta["golden_answers"]
        for i in tree.leaves():
            text = response_text(tree, i, tokenizer)
            tree.nodes[i].reward = score(text, golden, training=True)
            em.append(score(text, golden, training=False))
    return em


def f1_score(prediction: str, golden_answers: list[str] | str) -> float:
    """SQuAD token-level F1 of ``prediction``, the maximum over ``golden_answers`` (for logging)."""
    if isinstance(golden_answers, str):
        golden_answers = [golden_answers]
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for golden in golden_answers:
        expected = normalize_answer(golden).split()
        common = sum((Counter(predicted) & Counter(expected)).values())
        if common == 0:
            continue
        precision, recall = common / len(predicted), common / len(expected)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best
