"""The multi-turn agent loop, token-in token-out (spec §2.2), shared by trees, chains and evaluation.

Vocabulary. A *branch* is one trajectory being generated; its *open node* is the turn node of a
:class:`~atpo_megatron.algo.tree.TurnTree` that the next generate call extends. One *round* of
:meth:`AgentLoop.step` makes exactly one ``engine.generate`` call for every open branch of every tree
in the batch, then at most one ``search_batch`` call for all the tool calls those completions made.

What a completion does to its branch (``finish_reason`` of the engine → what happens):

* ``"eos"``: the node becomes a leaf (``"eos"``).
* ``"length"``: a leaf (``"length"``) when the response budget is spent; when only the per-call cap
  ``rollout.max_turn_tokens`` cut it, the same node keeps generating next round. A stop string begun
  at the end of one call and completed in the next (which the engine, matching in its own output
  only, cannot see) is found here: the completion is cut after the token completing it, as "stop".
* ``"stop"`` (``</search>``), in this order:
  - the path already executed ``tool_call_limit`` calls: the masked :data:`TOOL_LIMIT_NOTICE` is
    appended and the same node keeps generating (leaf ``"length"`` if the notice does not fit);
  - the node is turn number ``max_turns``: leaf (``"max_turns"``), the call is not executed;
  - the query is empty (nothing but quotes/space, or no ``<search>`` opener): an EOS token (mask 0,
    the policy did not sample it) is appended, leaf (``"empty_call"``);
  - fewer than ``result_room`` + a minimal result's tokens of budget are left: leaf (``"length"``),
    the call is not executed;
  - otherwise the query joins the round's search batch. A failed search makes the node a leaf
    (``"tool_error"``); a result is tokenised (``format_tool_result``, no special tokens), cut so
    that ``result_room`` tokens of budget stay free (the closing ``</result>`` is kept), and becomes
    the observation (mask 0) of a new child node, which generates next round.

Contexts are only ever concatenations of token ids (prompt ids + node tokens); nothing is decoded
and re-encoded ("retokenisation drift", paper App. C). Text is decoded only to read a query.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Sequence

from atpo_megatron.config import RolloutConfig
from atpo_megatron.env.prompts import (
    STOP_STRINGS,
    TOOL_LIMIT_NOTICE,
    build_messages,
    extract_search_query,
    format_tool_result,
)
from atpo_megatron.env.search_tool import clean_query
from atpo_megatron.rollout.engine import Completion, Engine, SamplingParams, segment_entropy

if TYPE_CHECKING:
    from atpo_megatron.algo.tree import TurnTree

log = logging.getLogger(__name__)

LEAF_REASONS = ("eos", "length", "max_turns", "empty_call", "tool_error")
"""``TurnNode.finish_reason`` of a leaf; a node whose tool call succeeded has ``"tool"``."""


class PromptTooLongError(ValueError):
    """A prompt has more tokens than ``rollout.max_prompt_tokens``."""


@dataclass
class LoopLimits:
    """The budgets of one trajectory (spec §2.2); :meth:`from_config` reads them from ``rollout``."""

    max_prompt_tokens: int = RolloutConfig.max_prompt_tokens
    max_response_tokens: int = RolloutConfig.max_response_tokens
    """All response tokens of a trajectory: every turn, tool result and inserted notice."""
    max_turn_tokens: int = RolloutConfig.max_turn_tokens
    """Cap of one generate call; 0 = the remaining response budget (the paper)."""
    max_turns: int = RolloutConfig.max_turns
    """Turn nodes per trajectory (tool calls + the final answer turn)."""
    tool_call_limit: int = RolloutConfig.tool_call_limit
    result_room: int = 100
    """Response tokens that must stay free after a (possibly cut) tool result (reference code)."""

    @classmethod
    def from_config(cls, rollout: RolloutConfig) -> "LoopLimits":
        return cls(
            max_prompt_tokens=rollout.max_prompt_tokens,
            max_response_tokens=rollout.max_response_tokens,
            max_turn_tokens=rollout.max_turn_tokens,
            max_turns=rollout.max_turns,
            tool_call_limit=rollout.tool_call_limit,
        )

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_response_tokens", "max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name}={getattr(self, name)} must be >= 1")


@dataclass
class LoopStats:
    """Counters of everything the loop did; summed over rounds (and over rollout phases)."""

    rounds: int = 0
    generate_calls: int = 0
    search_calls: int = 0
    """``search_batch`` calls (one per round that had queries)."""
    queries: int = 0
    """Search queries executed (each is one tool call)."""
    tool_errors: int = 0
    generated_tokens: int = 0
    """Tokens produced by the engine and kept in the trees (mask 1)."""
    context_tokens: int = 0
    """Tokens of the contexts sent to the engine (its prefill work before any cache)."""
    cached_tokens: int = 0
    """Of those, tokens the engine's prefix cache served."""
    observation_tokens: int = 0
    """Tool-result tokens inserted (mask 0)."""
    limit_notices: int = 0
    truncated_results: int = 0
    cut_completions: int = 0
    """Completions longer than their branch's own budget (the batch's max_tokens is the largest)."""
    generate_s: float = 0.0
    search_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def since(self, before: "LoopStats") -> "LoopStats":
        """What was counted after the snapshot ``before`` (a copy taken with ``LoopStats(**s.as_dict())``)."""
        return LoopStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})


@dataclass
class Branch:
    """One trajectory being generated; ``node`` is its open turn node in ``tree``."""

    tree: "TurnTree"
    node: int
    prompt_len: int
    response_len: int
    """Response tokens on the root..node path, the open node's tokens included."""
    tool_calls: int
    """Tool calls executed on the path before the open node's action."""
    depth: int
    """Turn number of the open node (the root's children are 1)."""
    turn_start: int = 0
    """Offset in the node's tokens where the text searched for a query starts (after a notice)."""
    budget: int = 0
    """The response budget (``max_response_tokens``); set by :meth:`AgentLoop.open`."""

    @classmethod
    def at(cls, tree: "TurnTree", node: int) -> "Branch":
        """The state of ``node`` read from the tree alone (a fresh child, a fork, a continuation)."""
        depth, i = 0, node
        while tree.nodes[i].parent >= 0:
            depth, i = depth + 1, tree.nodes[i].parent
        if depth < 1:
            raise ValueError("a branch cannot be opened at the root; add a child of the root first")
        response_len = len(tree.context_ids(node)) - len(tree.prompt_ids)
        # every non-root ancestor of an open node ended in a successful tool call
        return cls(tree, node, len(tree.prompt_ids), response_len, tool_calls=depth - 1, depth=depth)

    @property
    def remaining(self) -> int:
        return self.budget - self.response_len


def encode_prompt(tokenizer: Any, question: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of the paper's prompt: its single system message, chat template, generation prompt.

    A prompt over ``max_prompt_tokens`` raises :class:`PromptTooLongError`. verl, which the reference
    runs on, rejects such prompts too (``truncation="error"``; ``filter_overlong_prompts`` drops them
    from the data up front, see :func:`split_overlong`). Cutting either end would remove the
    instructions or the question and the generation prompt, so we never truncate a prompt.
    """
    ids = tokenizer.apply_chat_template(
        build_messages(question), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = list(ids)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise PromptTooLongError(
            f"the prompt has {len(ids)} tokens, more than rollout.max_prompt_tokens={max_prompt_tokens} "
            f"(question starts {question[:60]!r}); drop it from the data (split_overlong) or raise the budget"
        )
    return ids


def split_overlong(examples: Sequence[Any], tokenizer: Any, max_prompt_tokens: int) -> tuple[list, list]:
    """(examples whose prompt fits, examples whose prompt does not): verl's ``filter_overlong_prompts``."""
    kept, dropped = [], []
    for ex in examples:
        try:
            encode_prompt(tokenizer, ex.question, max_prompt_tokens)
            kept.append(ex)
        except PromptTooLongError:
            dropped.append(ex)
    if dropped:
        log.warning("dropped %d of %d examples whose prompt exceeds %d tokens", len(dropped), len(examples),
                    max_prompt_tokens)
    return kept, dropped


def round_seed(seed: int | None, *keys: Any) -> int | None:
    """A 31-bit seed for one generate call, derived from ``seed`` and the call's position."""
    if seed is None:
        return None
    digest = hashlib.blake2b(repr((seed,) + keys).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class AgentLoop:
    """Runs branches to their leaves, one batched generate call (and one search call) per round.

    ``search_client`` has ``search_batch(queries) -> [SearchResult(ok, text, error)]``.
    ``sampling`` gives temperature/top_p/top_k; stop strings and max_tokens are set per round.
    """

    def __init__(
        self,
        engine: Engine,
        search_client: Any,
        limits: LoopLimits,
        sampling: SamplingParams | None = None,
        tokenizer: Any = None,
    ):
        self.engine = engine
        self.search = search_client
        self.limits = limits
        self.sampling = sampling or SamplingParams()
        self.tok = tokenizer if tokenizer is not None else engine.tokenizer
        if self.tok.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; the loop needs one to end an empty tool call")
        self.eos_id = int(self.tok.eos_token_id)
        self.notice_ids = self.encode(TOOL_LIMIT_NOTICE)
        self.result_tail_ids = self.encode("\n</result>")
        # the smallest observation worth inserting: an empty result block
        self.min_result = len(self.encode(format_tool_result("")))
        self._stop_window = 4 * max(map(len, STOP_STRINGS))  # tokens holding any begun stop string
        self.stats = LoopStats()

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def open(self, tree: "TurnTree", node: int) -> Branch:
        b = Branch.at(tree, node)
        b.budget = self.limits.max_response_tokens
        if b.remaining < 1:
            raise ValueError(
                f"node {node} already uses {b.response_len} response tokens of the "
                f"{b.budget} budget (rollout.max_response_tokens); nothing is left to generate"
            )
        return b

    def run(self, branches: list[Branch], seed: int | None = None, tag: Any = 0) -> LoopStats:
        """Generate until every branch (and every child it spawns) has ended in a leaf."""
        before = LoopStats(**self.stats.as_dict())
        active, r = list(branches), 0
        while active:
            active = self.step(active, seed=round_seed(seed, tag, r))
            r += 1
        return self.stats.since(before)

    # ---------------------------------------------------------------- one round
    def step(self, branches: list[Branch], seed: int | None = None) -> list[Branch]:
        """One generate call for all ``branches``, then their tool calls; returns the open branches."""
        if not branches:
            return []
        caps = [self._cap(b) for b in branches]
        params = SamplingParams(
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            top_k=self.sampling.top_k,
            max_tokens=max(caps),  # one call for all: the largest budget; longer outputs are cut below
            stop=tuple(STOP_STRINGS),
            seed=seed,
        )
        contexts = [b.tree.context_ids(b.node) for b in branches]
        t0 = time.perf_counter()
        completions = self.engine.generate(contexts, params)
        self.stats.generate_s += time.perf_counter() - t0
        self.stats.rounds += 1
        self.stats.generate_calls += 1
        if len(completions) != len(branches):
            raise RuntimeError(
                f"engine.generate returned {len(completions)} completions for {len(branches)} prompts; "
                "an Engine must return exactly one completion per prompt, in order"
            )
        self.stats.context_tokens += sum(map(len, contexts))
        self.stats.cached_tokens += sum(c.cached_tokens for c in completions)
        still_open: list[Branch] = []
        calls: list[tuple[Branch, str]] = []
        for b, c, cap in zip(branches, completions, caps):
            outcome = self._absorb(b, c, cap)
            if outcome == "open":
                still_open.append(b)
            elif isinstance(outcome, tuple):
                calls.append((b, outcome[1]))
        if calls:
            still_open.extend(self._run_tools(calls))
        log.debug("round %d: %d contexts, max_tokens %d, %d tool calls, %d still open (%.2fs generate)",
                  self.stats.rounds, len(branches), params.max_tokens, len(calls), len(still_open),
                  time.perf_counter() - t0)
        return still_open

    def _cap(self, b: Branch) -> int:
        cap = b.remaining
        if self.limits.max_turn_tokens > 0:
            cap = min(cap, self.limits.max_turn_tokens)
        return cap

    def _absorb(self, b: Branch, c: Completion, cap: int):
        """Append one completion to its node; returns "open", "leaf" or ("call", query)."""
        ids, lps, reason = list(c.token_ids), list(c.logprobs), c.finish_reason
        if len(ids) != len(lps):
            raise RuntimeError(f"completion has {len(ids)} tokens but {len(lps)} log-probs; the engine is broken")
        if reason not in ("stop", "eos", "length"):
            raise RuntimeError(f"unknown finish_reason {reason!r}; an Engine returns 'stop', 'eos' or 'length'")
        node = b.tree.nodes[b.node]
        if node.mask and node.mask[-1] == 1:  # the node's previous call was cut by the per-call cap
            end = self._stop_across_calls(node.tokens, ids)
            if end:
                ids, lps, reason = ids[:end], lps[:end], "stop"
        if len(ids) > cap:
            ids, lps, reason = ids[:cap], lps[:cap], "length"
            self.stats.cut_completions += 1
        node.tokens.extend(ids)
        node.mask.extend([1] * len(ids))
        node.logprobs.extend(lps)
        node.entropy = segment_entropy(lps)  # spec §3.2: the node's last generated segment
        b.response_len += len(ids)
        self.stats.generated_tokens += len(ids)

        if reason == "eos":
            return self._leaf(b, "eos")
        if reason == "length":
            return self._leaf(b, "length") if b.remaining < 1 else "open"
        # a tool call
        if b.tool_calls >= self.limits.tool_call_limit:
            return self._notice(b)
        if b.depth >= self.limits.max_turns:
            return self._leaf(b, "max_turns")
        query = extract_search_query(self.tok.decode(node.tokens[b.turn_start:]))
        if not query or not clean_query(query):  # None: "</search>" without an opener
            self._insert(b, [self.eos_id])
            return self._leaf(b, "empty_call")
        if b.remaining - self.limits.result_room < self.min_result:
            return self._leaf(b, "length")
        return ("call", query)

    def _stop_across_calls(self, before: list[int], ids: list[int]) -> int:
        """How many of ``ids`` end a stop string whose first characters end ``before`` (0: none)."""
        tail = self.tok.decode(before[-self._stop_window:])
        for stop in STOP_STRINGS:
            for k in range(len(stop) - 1, 0, -1):  # the longest begun part completes first
                if not tail.endswith(stop[:k]):
                    continue
                rest = stop[k:]
                for j in range(1, len(ids) + 1):
                    text = self.tok.decode(ids[:j])
                    if len(text) >= len(rest):
                        if text.startswith(rest):
                            return j
                        break
        return 0

    def _notice(self, b: Branch):
        if len(self.notice_ids) >= b.remaining:
            return self._leaf(b, "length")
        self._insert(b, self.notice_ids)
        b.turn_start = len(b.tree.nodes[b.node].tokens)
        self.stats.limit_notices += 1
        return "open"

    def _insert(self, b: Branch, ids: list[int]) -> None:
        """Append tokens the policy did not generate (mask 0, log-prob 0) to the open node."""
        node = b.tree.nodes[b.node]
        node.tokens.extend(ids)
        node.mask.extend([0] * len(ids))
        node.logprobs.extend([0.0] * len(ids))
        b.response_len += len(ids)

    def _leaf(self, b: Branch, reason: str) -> str:
        b.tree.nodes[b.node].finish_reason = reason
        return "leaf"

    def _run_tools(self, calls: list[tuple[Branch, str]]) -> list[Branch]:
        t0 = time.perf_counter()
        results = self.search.search_batch([q for _, q in calls])
        self.stats.search_s += time.perf_counter() - t0
        self.stats.search_calls += 1
        self.stats.queries += len(calls)
        if len(results) != len(calls):
            raise RuntimeError(f"search_batch returned {len(results)} results for {len(calls)} queries")
        children = []
        for (b, _), res in zip(calls, results):
            if not res.ok:
                self.stats.tool_errors += 1
                log.warning("search failed (%s); node %d becomes a leaf", res.error, b.node)
                self._leaf(b, "tool_error")
                continue
            obs = self._observation(res.text, b.remaining - self.limits.result_room)
            b.tree.nodes[b.node].finish_reason = "tool"
            child = b.tree.add_child(
                b.node,
                tokens=obs,
                mask=[0] * len(obs),
                logprobs=[0.0] * len(obs),
                obs_len=len(obs),
                entropy=b.tree.nodes[b.node].entropy,  # inherited until it generates (spec §3.2)
                tool_calls=b.tool_calls + 1,
            )
            self.stats.observation_tokens += len(obs)
            nb = Branch(b.tree, child, b.prompt_len, b.response_len + len(obs), b.tool_calls + 1,
                        b.depth + 1, budget=b.budget)
            children.append(nb)
        return children

    def _observation(self, text: str, room: int) -> list[int]:
        """``format_tool_result(text)`` as ids, cut to ``room`` tokens keeping the closing tag."""
        ids = self.encode(format_tool_result(text))
        if len(ids) <= room:
            return ids
        self.stats.truncated_results += 1
        tail = self.result_tail_ids
        return ids[: max(0, room - len(tail))] + tail


def sampling_from_config(rollout: RolloutConfig, greedy: bool = False) -> SamplingParams:
    """The rollout's temperature/top_p/top_k (greedy: temperature 0, as the reference validates)."""
    s = rollout.sampling
    if greedy:
        return SamplingParams(temperature=0.0, top_p=1.0, top_k=-1)
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
