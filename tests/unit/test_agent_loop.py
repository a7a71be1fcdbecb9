"""The multi-turn agent loop (rollout/agent_loop.py) against a scripted engine and search client.

The fake tokenizer is character level (id = ord(c) + 3; 0 pad, 1 bos, 2 eos) with a twist: ids
from ALIAS_BASE on decode to the same characters as the plain ids. The fake engine emits some
aliases, so a loop that decoded and re-encoded its contexts would hand the engine different ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from atpo_megatron.algo.tree import TurnTree
from atpo_megatron.env.prompts import TOOL_LIMIT_NOTICE, format_tool_result
from atpo_megatron.env.search_tool import SearchResult
from atpo_megatron.rollout.agent_loop import (
    AgentLoop,
    LoopLimits,
    PromptTooLongError,
    encode_prompt,
    split_overlong,
)
from atpo_megatron.rollout.engine import Completion, SamplingParams, segment_entropy

EOS = 2
ALIAS_BASE = 200_000
EOS_MARK = "<EOS>"


class CharTokenizer:
    eos_token_id = EOS
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return ([1] if add_special_tokens else []) + [ord(c) + 3 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        out = []
        for i in ids:
            if i < 3:
                if not skip_special_tokens:
                    out.append(["<pad>", "<bos>", EOS_MARK][i])
            else:
                out.append(chr((i - ALIAS_BASE if i >= ALIAS_BASE else i) - 3))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages) + ("[assistant]" if add_generation_prompt else "")
        return [1] + self.encode(text)


def token_logprob(tok: int) -> float:
    return -((tok % 5) + 1) / 10.0


@dataclass
class Call:
    prompts: list[list[int]]
    params: SamplingParams


class ScriptedEngine:
    """``policy(context_text, rng) -> str`` writes each completion; ``EOS_MARK`` at its end samples EOS.

    Stop strings end a completion at their last character ("stop"), then EOS, then max_tokens
    ("length"), as the real engines do; a text with neither stop nor EOS repeats up to max_tokens.
    Every third character is emitted as its alias id. ``rng`` is seeded by (params.seed, row).
    """

    def __init__(self, policy):
        self.tokenizer = CharTokenizer()
        self.policy = policy
        self.calls: list[Call] = []

    def generate(self, prompts, params):
        self.calls.append(Call([list(p) for p in prompts], params))
        out = []
        for row, p in enumerate(prompts):
            rng = random.Random(f"{params.seed}-{row}")
            text = self.policy(self.tokenizer.decode(p), rng)
            eos = text.endswith(EOS_MARK)
            text = text[: -len(EOS_MARK)] if eos else text
            reason = "eos" if eos else "length"
            hits = [text.find(s) + len(s) for s in params.stop if s in text]
            if hits:
                text, reason = text[: min(hits)], "stop"
            elif not eos:  # no stop, no EOS: the model rambles on (the text repeated) to max_tokens
                text = (text * (params.max_tokens // max(len(text), 1) + 1))[: params.max_tokens]
            ids = [ord(c) + 3 + (ALIAS_BASE if k % 3 == 2 else 0) for k, c in enumerate(text)]
            if reason == "eos":
                ids.append(EOS)
            if len(ids) > params.max_tokens:
                ids, reason = ids[: params.max_tokens], "length"
            out.append(Completion(ids, [token_logprob(t) for t in ids], reason))
        return out

    def load_weights(self, weights):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


@dataclass
class FakeSearch:
    """Answers ``"R(<query>)"``; queries containing "FAIL" fail."""

    result: callable = None
    calls: list[list[str]] = field(default_factory=list)

    def search_batch(self, queries):
        self.calls.append(list(queries))
        out = []
        for q in queries:
            if "FAIL" in q:
                out.append(SearchResult(ok=False, text="", error="boom"))
            else:
                out.append(SearchResult(ok=True, text=self.result(q) if self.result else f"R({q})"))
        return out


def response_text(context: str) -> str:
    return context.split("[assistant]", 1)[1]


def turns_done(context: str) -> int:
    return response_text(context).count("<result>")


def answer(text="x") -> str:
    return f"<think>done</think><answer> The final answer is \\[ \\boxed{{{text}}} \\] </answer>{EOS_MARK}"


def searching_policy(n_searches: int):
    """Search ``n_searches`` times ("q<turn>"), then answer."""
    def policy(ctx, rng):
        t = turns_done(ctx)
        return f"<think>t{t}</think><search>q{t}</search> junk" if t < n_searches else answer()
    return policy


def make_loop(policy, limits=None, search=None, **kw):
    engine = ScriptedEngine(policy)
    search = search or FakeSearch()
    loop = AgentLoop(engine, search, limits or LoopLimits(), SamplingParams(temperature=1.0), **kw)
    return loop, engine, search


def new_tree(loop, question="q?"):
    return TurnTree(encode_prompt(loop.tok, question))


def open_chains(loop, trees, m):
    return [loop.open(t, t.add_child(0)) for t in trees for _ in range(m)]


def enc(text):
    return CharTokenizer().encode(text)


# ---------------------------------------------------------------------------------------------- tests

def test_masks_observations_and_one_call_per_round():
    loop, engine, search = make_loop(searching_policy(2))
    trees = [new_tree(loop, "first?"), new_tree(loop, "second?")]
    stats = loop.run(open_chains(loop, trees, 2), seed=7)

    # 3 rounds (search, search, answer); each round one generate call over all 4 branches of both trees
    assert [len(c.prompts) for c in engine.calls] == [4, 4, 4]
    assert search.calls == [["q0"] * 4, ["q1"] * 4]
    assert (stats.generate_calls, stats.search_calls, stats.queries) == (3, 2, 8)

    turn = [enc("<think>t0</think><search>q0</search>"), enc("<think>t1</think><search>q1</search>"), enc(answer())]
    turn[2] = turn[2][: -len(EOS_MARK)] + [EOS]
    obs = [enc(format_tool_result("R(q0)")), enc(format_tool_result("R(q1)"))]
    for t in trees:
        assert len(t.leaves()) == 2
        for leaf in t.leaves():
            ids, mask, lps = t.response(leaf)
            want_mask = [1] * len(turn[0]) + [0] * len(obs[0]) + [1] * len(turn[1]) + [0] * len(obs[1]) + [1] * len(turn[2])
            assert mask == want_mask
            assert CharTokenizer().decode(ids) == CharTokenizer().decode(turn[0] + obs[0] + turn[1] + obs[1] + turn[2])
            assert [lp for lp, m in zip(lps, mask) if m == 0] == [0.0] * mask.count(0)
            assert all(lp == token_logprob(i) for i, lp, m in zip(ids, lps, mask) if m)
            assert t.nodes[leaf].finish_reason == "eos" and t.nodes[leaf].tool_calls == 2
            path = t.path(leaf)
            assert [t.nodes[i].finish_reason for i in path[1:]] == ["tool", "tool", "eos"]
            assert [t.nodes[i].obs_len for i in path[1:]] == [0, len(obs[0]), len(obs[1])]
            # a child's context is its parent's context plus the observation, token for token
            for parent, child in zip(path[1:], path[2:]):
                c = t.nodes[child]
                assert t.context_ids(child)[: len(t.context_ids(parent)) + c.obs_len] == t.context_ids(parent) + c.tokens[: c.obs_len]
    assert stats.generated_tokens == sum(sum(n.mask) for t in trees for n in t.nodes)
    assert stats.observation_tokens == 4 * (len(obs[0]) + len(obs[1]))


def test_contexts_are_concatenated_ids_never_retokenised():
    loop, engine, _ = make_loop(searching_policy(1))
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1), seed=1)
    first, second = engine.calls[0].prompts[0], engine.calls[1].prompts[0]
    child = tree.nodes[1].children[0]
    assert second == first + tree.nodes[1].tokens + tree.nodes[child].tokens[: tree.nodes[child].obs_len]
    assert any(i >= ALIAS_BASE for i in second)  # the engine's own (alias) ids came back unchanged


def test_tool_call_limit_notice_continues_in_same_node():
    def policy(ctx, rng):
        if TOOL_LIMIT_NOTICE in response_text(ctx):
            return answer()
        return f"<think>a</think><search>q{turns_done(ctx)}</search>"

    loop, engine, search = make_loop(policy, LoopLimits(tool_call_limit=1))
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1), seed=0)
    assert search.calls == [["q0"]]  # the second call is not executed
    assert len(tree.nodes) == 3
    node = tree.nodes[2]
    call, notice = enc("<think>a</think><search>q1</search>"), enc(TOOL_LIMIT_NOTICE)
    ans = enc(answer())[: -len(EOS_MARK)] + [EOS]
    n_obs = node.obs_len
    assert CharTokenizer().decode(node.tokens[n_obs:]) == CharTokenizer().decode(call + notice + ans)
    assert node.mask[n_obs:] == [1] * len(call) + [0] * len(notice) + [1] * len(ans)
    assert node.finish_reason == "eos" and node.tool_calls == 1
    assert node.entropy == pytest.approx(segment_entropy([token_logprob(t) for t in node.tokens[-len(ans):]]))
    assert loop.stats.limit_notices == 1
    assert len(engine.calls) == 3


def test_notice_repeats_until_budget_when_model_keeps_calling():
    loop, _, search = make_loop(lambda ctx, rng: "<search>again</search>",
                                LoopLimits(tool_call_limit=0, max_response_tokens=600))
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1))
    assert search.calls == []
    node, call, notice = tree.nodes[1], len("<search>again</search>"), len(TOOL_LIMIT_NOTICE)
    # call, notice, call, notice, call, notice, call: then the next notice no longer fits in 600
    assert 4 * call + 3 * notice <= 600 < 4 * call + 4 * notice
    assert node.finish_reason == "length" and len(node.tokens) == 4 * call + 3 * notice
    assert loop.stats.limit_notices == 3


@pytest.mark.parametrize("turn", ["<think>a</think><search>  </search>", "<search>\"\"</search>", "no opener</search>"])
def test_empty_query_appends_eos_and_ends(turn):
    loop, engine, search = make_loop(lambda ctx, rng: turn)
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1))
    node = tree.nodes[1]
    assert node.finish_reason == "empty_call"
    assert node.tokens[-1] == EOS and node.mask[-1] == 0 and node.logprobs[-1] == 0.0
    assert sum(node.mask) == len(turn) and search.calls == [] and len(engine.calls) == 1


def test_tool_failure_makes_a_leaf_others_continue():
    def policy(ctx, rng):
        if turns_done(ctx):
            return answer()
        return "<search>FAIL</search>" if "bad?" in ctx else "<search>fine</search>"

    loop, _, search = make_loop(policy)
    good, bad = new_tree(loop, "good?"), new_tree(loop, "bad?")
    loop.run(open_chains(loop, [good, bad], 1))
    assert search.calls == [["fine", "FAIL"]]
    assert bad.nodes[1].finish_reason == "tool_error" and bad.leaves() == [1]
    assert [good.nodes[i].finish_reason for i in good.path(good.leaves()[0])[1:]] == ["tool", "eos"]
    assert loop.stats.tool_errors == 1


def test_response_budget_cuts_to_length_leaf():
    loop, engine, _ = make_loop(lambda ctx, rng: "y" * 500, LoopLimits(max_response_tokens=64))
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1))
    assert engine.calls[0].params.max_tokens == 64
    assert len(tree.nodes[1].tokens) == 64 and tree.nodes[1].finish_reason == "length"


def test_one_call_uses_the_largest_budget_and_cuts_the_others():
    # the "long?" tree gets a 400-character result, so its second turn has less budget left
    def policy(ctx, rng):
        if turns_done(ctx):
            return "z" * 5000
        return "<search>long</search>" if "long?" in ctx else "<search>tiny</search>"

    search = FakeSearch(result=lambda q: "w" * 400 if q == "long" else "s")
    loop, engine, _ = make_loop(policy, LoopLimits(max_response_tokens=1000), search)
    long_tree, short_tree = new_tree(loop, "long?"), new_tree(loop, "tiny?")
    loop.run(open_chains(loop, [long_tree, short_tree], 1))
    short_used = len("<search>tiny</search>") + len(format_tool_result("s"))
    assert [c.params.max_tokens for c in engine.calls] == [1000, 1000 - short_used]
    for t in (long_tree, short_tree):
        leaf = t.leaves()[0]
        assert len(t.response(leaf)[0]) == 1000 and t.nodes[leaf].finish_reason == "length"
    assert loop.stats.cut_completions == 1


def test_long_result_is_cut_to_leave_room_and_keeps_closing_tag():
    budget, call = 400, "<search>q</search>"
    search = FakeSearch(result=lambda q: "v" * 1000)
    loop, engine, _ = make_loop(lambda ctx, rng: call if not turns_done(ctx) else answer(), LoopLimits(max_response_tokens=budget), search)
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1))
    child = tree.nodes[tree.nodes[1].children[0]]
    assert child.obs_len == budget - len(call) - 100
    text = CharTokenizer().decode(child.tokens[: child.obs_len])
    assert text.startswith(" <result>\nvvv") and text.endswith("v\n</result>")
    assert engine.calls[1].params.max_tokens == 100
    assert loop.stats.truncated_results == 1


def test_no_room_for_a_result_ends_without_searching():
    call = "<search>q</search>"
    room = 100 + len(enc(format_tool_result("")))
    loop, _, search = make_loop(lambda ctx, rng: call, LoopLimits(max_response_tokens=len(call) + room - 1))
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1))
    assert search.calls == [] and tree.nodes[1].finish_reason == "length"


def test_turn_cap_continues_the_same_node_and_entropy_is_last_segment():
    text = "abcdefghijkl"

    def policy(ctx, rng):  # continues where the node stopped
        return text[len(response_text(ctx)):] + EOS_MARK

    loop, engine, _ = make_loop(policy, LoopLimits(max_turn_tokens=5))
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1))
    node = tree.nodes[1]
    assert [c.params.max_tokens for c in engine.calls] == [5, 5, 5]
    assert len(tree.nodes) == 2 and node.finish_reason == "eos"
    assert CharTokenizer().decode(node.tokens) == text + EOS_MARK and node.mask == [1] * 13
    assert node.entropy == pytest.approx(segment_entropy([token_logprob(t) for t in node.tokens[-3:]]))


def test_max_turns_ends_a_tool_call_without_running_it():
    loop, _, search = make_loop(lambda ctx, rng: f"<search>q{turns_done(ctx)}</search>", LoopLimits(max_turns=2))
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1))
    assert search.calls == [["q0"]]
    leaf = tree.leaves()[0]
    assert tree.nodes[leaf].finish_reason == "max_turns" and tree.path(leaf) == [0, 1, 2]


def test_prompt_budget_rejects_and_split_overlong_filters():
    tok = CharTokenizer()
    n = len(encode_prompt(tok, "short?"))
    assert encode_prompt(tok, "short", n) == encode_prompt(tok, "short?")  # "?" appended by the prompt
    with pytest.raises(PromptTooLongError, match="max_prompt_tokens"):
        encode_prompt(tok, "a much longer question?", n)

    @dataclass
    class Ex:
        question: str

    kept, dropped = split_overlong([Ex("short?"), Ex("a much longer question?")], tok, n)
    assert [e.question for e in kept] == ["short?"] and len(dropped) == 1


def test_engine_contract_violations_are_reported():
    class Broken(ScriptedEngine):
        def generate(self, prompts, params):
            return super().generate(prompts, params)[:-1]

    loop = AgentLoop(Broken(searching_policy(0)), FakeSearch(), LoopLimits())
    tree = TurnTree(encode_prompt(loop.tok, "q"))
    with pytest.raises(RuntimeError, match="one completion per prompt"):
        loop.run([loop.open(tree, tree.add_child(0)), loop.open(tree, tree.add_child(0))])


@pytest.mark.slow
def test_real_retriever_server_results_are_inserted_verbatim(tmp_path):
    import json

    from atpo_megatron.env.retriever import RetrieverServer
    from atpo_megatron.env.search_tool import SearchClient

    corpus = tmp_path / "corpus.jsonl"
    docs = ["Varlo Bridge\nThe Varlo Bridge was built by Orvane Industries.",
            "Orvane Industries\nOrvane Industries was founded by Mira Tollen.",
            "Kestrel City\nKestrel City is a port."]
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": d}) + "\n" for i, d in enumerate(docs)))

    def policy(ctx, rng):
        t = turns_done(ctx)
        return ["<search>Varlo Bridge built by</search>", "<search>Orvane Industries founded</search>"][t] if t < 2 else answer("Mira Tollen")

    with RetrieverServer(corpus, cache_dir=tmp_path / "cache") as server, SearchClient(server.url) as client:
        loop, _, _ = make_loop(policy, search=client)
        tree = new_tree(loop)
        loop.run(open_chains(loop, [tree], 1))
        direct = [client.search("Varlo Bridge built by").text, client.search("Orvane Industries founded").text]
    assert "Page 1: Varlo Bridge" in direct[0] and "Page 1: Orvane Industries" in direct[1]
    path = tree.path(tree.leaves()[0])
    obs = [tree.nodes[i].tokens[: tree.nodes[i].obs_len] for i in path[2:]]
    assert [CharTokenizer().decode(o) for o in obs] == [format_tool_result(d) for d in direct]
    assert loop.stats.queries == 2 and loop.stats.tool_errors == 0


@pytest.mark.parametrize("first_call", [len("<think>a</think><search>who</"), len("<think>a</think><search>who</searc")])
def test_stop_string_split_across_two_generate_calls_is_a_tool_call(first_call):
    """Issue 13 defect 6: with a per-call cap (rollout.max_turn_tokens), "</search>" may begin at the end of
    one generate call and end in the next; the engine matches stop strings in its own output only, so the
    loop must see it, cut the completion right after it and run the call (not keep the model's made-up result)."""
    turn = "<think>a</think><search>who</search>"
    full = turn + " <result> made up </result> <answer> no </answer>" + EOS_MARK

    def policy(ctx, rng):  # continues the turn where the previous call stopped
        text = response_text(ctx)
        if "<result>\nR(who)" not in text:
            return full[len(text):]
        return answer()[len(text.split("</result>", 1)[1]):]

    loop, engine, search = make_loop(policy, LoopLimits(max_turn_tokens=first_call))
    tree = new_tree(loop)
    loop.run(open_chains(loop, [tree], 1))
    node = tree.nodes[1]
    assert engine.calls[0].params.max_tokens == first_call
    assert CharTokenizer().decode(node.tokens) == turn and node.mask == [1] * len(turn)
    assert node.finish_reason == "tool" and search.calls == [["who"]]
    assert loop.stats.generated_tokens == len(turn) + len(answer()) - len(EOS_MARK) + 1  # + the answer turn, EOS id
