"""Tree and chain rollouts (rollout/tree_rollout.py), the tree pictures, greedy evaluation and the CLIs,
all on the scripted engine of test_agent_loop.py."""

from __future__ import annotations

import argparse
import json
import math
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from test_agent_loop import EOS_MARK, CharTokenizer, FakeSearch, ScriptedEngine, answer, token_logprob, turns_done

from atpo_megatron.algo.credit import turn_advantages
from atpo_megatron.algo.tree import TurnTree
from atpo_megatron.config import Config, CreditConfig, RolloutConfig, load_config
from atpo_megatron.env.data import QAExample
from atpo_megatron import experience
from atpo_megatron.algo.advantages import credit_statistics, grpo_node_advantages
from atpo_megatron.env.reward import score, score_leaves
from atpo_megatron.evaluate import evaluate, format_report, summarize
from atpo_megatron.experience import make_experience
from atpo_megatron.rollout import statistics as rs
from atpo_megatron.rollout.tree_rollout import RolloutPlan, TreeRollout
from atpo_megatron.rollout.visualize import entropy_colour, reward_colour, trees_html, write_trees_json


def random_policy(ctx, rng):
    """0-2 searches with random-length thoughts, then a right (Paris) or wrong answer; 10% malformed."""
    t = turns_done(ctx)
    if t < 2 and rng.random() < 0.6:
        return f"<think>{'abcde'[: rng.randint(1, 5)]}</think><search>q{t}</search>"
    if rng.random() < 0.1:
        return "no tags at all" + EOS_MARK
    return answer(rng.choice(["Paris", "Rome"]))


def examples(n):
    return [QAExample(id=f"e{i}", question=f"question number {i}?", golden_answers=["Paris"], data_source=f"src{i % 2}")
            for i in range(n)]


def make_rollout(plan, policy=random_policy, assistant_prefix="", **kw):
    engine = ScriptedEngine(policy)
    search = FakeSearch()
    ro = TreeRollout(engine, search, RolloutConfig(assistant_prefix=assistant_prefix), plan, **kw)
    return ro, engine, search


def run(ro, exs, seed, credit=None):
    """Sample, score and credit one batch (the trainer's three data stages)."""
    return make_experience(ro, exs, credit or CreditConfig(), seed=seed)


def record_phases(ro):
    """Wrap loop.run: per phase, (number of branches, index of its first generate call)."""
    phases, run = [], ro.loop.run

    def wrapped(branches, seed=None, tag=0):
        phases.append((len(branches), ro.loop.stats.generate_calls))
        return run(branches, seed, tag)

    ro.loop.run = wrapped
    return phases


def test_tree_shape_and_batching_across_trees():
    plan = RolloutPlan(initial_chains=3, expansion_iterations=2, top_k=2)
    ro, engine, _ = make_rollout(plan)
    phases = record_phases(ro)
    batch = run(ro, examples(4), seed=11)
    assert len(batch.trees) == 4
    for t in batch.trees:
        assert len(t.leaves()) == 3 + 2 * 2
        assert len(t.nodes[0].children) >= 3
    # one phase for the chains, one per expansion round; its first call holds every branch of every tree
    assert [n for n, _ in phases] == [4 * 3, 4 * 2, 4 * 2]
    for n, first in phases:
        prompts = engine.calls[first].prompts
        assert len(prompts) == n
        for t in batch.trees:  # every tree has its branches in the call
            assert sum(p[: len(t.prompt_ids)] == t.prompt_ids for p in prompts) == n // 4
    assert batch.loop.generate_calls == len(engine.calls) == batch.loop.rounds
    assert len(batch.sequences) == 4 * 7
    assert [s.tree_index for s in batch.sequences] == [k for k in range(4) for _ in range(7)]


def test_forks_resample_from_the_same_observation():
    plan = RolloutPlan(initial_chains=2, expansion_iterations=3, top_k=3)
    ro, _, _ = make_rollout(plan)
    batch = run(ro, examples(3), seed=5)
    forked = 0
    for t in batch.trees:
        for p, node in enumerate(t.nodes):
            kids = node.children
            if p == 0 or len(kids) < 2:
                continue
            forked += len(kids) - 1
            obs = {tuple(t.nodes[c].tokens[: t.nodes[c].obs_len]) for c in kids}
            assert len(obs) == 1  # siblings below a turn re-sample the turn after the same result
            for c in kids:
                n = t.nodes[c]
                assert t.context_ids(c)[: len(t.context_ids(p)) + n.obs_len] == t.context_ids(p) + n.tokens[: n.obs_len]
                assert n.tool_calls == len(t.path(c)) - 2
    assert forked > 0


def test_rewards_equal_direct_recomputation_and_advantages_follow_credit():
    plan = RolloutPlan(initial_chains=3, expansion_iterations=1, top_k=2)
    credit = CreditConfig(value_mode="child_linear", adv_mode="diff_parent")
    ro, _, _ = make_rollout(plan)
    batch = run(ro, examples(3), seed=3, credit=credit)
    tok = CharTokenizer()
    for s in batch.sequences:
        text = tok.decode(s.response_ids, skip_special_tokens=True)
        assert s.reward == score(text, ["Paris"], training=True)
        t = batch.trees[s.tree_index]
        adv = turn_advantages(t.parents(), t.entropies(), {i: t.nodes[i].reward for i in t.leaves()},
                              value_mode="child_linear", adv_mode="diff_parent")
        want = [adv[i] for i in t.path(s.leaf)[1:] for _ in t.nodes[i].tokens]
        assert s.advantages == pytest.approx(want)
        assert len(s.loss_mask) == len(s.response_ids) == len(s.old_logprobs) == len(s.advantages)
        assert all(lp == token_logprob(i) for i, lp, m in zip(s.response_ids, s.old_logprobs, s.loss_mask) if m)
    assert {s.reward for s in batch.sequences} <= {-1.0, 0.0, 1.0}


def test_statistics_arithmetic():
    plan = RolloutPlan(initial_chains=4, expansion_iterations=2, top_k=3)
    ro, _, search = make_rollout(plan)
    batch = run(ro, examples(3), seed=21)
    trees, st = batch.trees, batch.stats
    leaves = [(t, i) for t in trees for i in t.leaves()]
    assert st["rollout/leaves"] == len(leaves) == 3 * 10  # no pruning happened
    generated = sum(sum(n.mask) for t in trees for n in t.nodes)
    chain = sum(sum(t.response(i)[1]) for t, i in leaves)
    assert st["rollout/generated_tokens"] == generated
    assert st["rollout/chain_tokens"] == chain
    assert st["rollout/token_saving"] == pytest.approx(1 - generated / chain)
    assert chain > generated  # forks share their prefix
    assert st["rollout/turns_per_leaf"] == pytest.approx(sum(len(t.path(i)) - 1 for t, i in leaves) / 30)
    assert st["rollout/tool_calls_per_leaf"] == pytest.approx(sum(len(t.path(i)) - 2 for t, i in leaves) / 30)
    assert st["rollout/search_queries"] == sum(len(c) for c in search.calls)
    rewards = [s.reward for s in batch.sequences]
    assert st["rollout/reward_mean"] == pytest.approx(sum(rewards) / 30)
    assert st["rollout/format_failure_rate"] == pytest.approx(rewards.count(-1.0) / 30)
    tok = CharTokenizer()
    em = [score(tok.decode(s.response_ids, skip_special_tokens=True), ["Paris"], training=False) for s in batch.sequences]
    assert st["rollout/em"] == pytest.approx(sum(em) / 30)
    assert sum(v for k, v in st.items() if k.startswith("rollout/finish_")) == pytest.approx(1.0)


def test_credit_statistics_hand_computed():
    # root -> a -> {b, c}; root -> d. Leaves b, c, d; a is shared by b and c.
    t = TurnTree([1, 2])
    a = t.add_child(0, [5], [1], [-0.1])
    b, c = t.add_child(a, [6], [1], [-0.1]), t.add_child(a, [7], [1], [-0.1])
    d = t.add_child(0, [8], [1], [-0.1])
    zero = TurnTree([1])
    zero.add_child(zero.add_child(0, [5], [1], [-0.1]), [6], [1], [-0.1])
    adv = [0.0] * 5
    adv[a], adv[b], adv[c], adv[d] = 0.5, 1.0, 0.0, -1.0
    st = credit_statistics([t, zero], [adv, [0.0, 0.0, 0.0]])
    # (leaf, turn) values: b: 0.5, 1; c: 0.5, 0; d: -1; zero's leaf: 0, 0 -> 7 values, sum 1
    values = [0.5, 1.0, 0.5, 0.0, -1.0, 0.0, 0.0]
    mean = sum(values) / 7
    assert st["credit/adv_abs_mean"] == pytest.approx(3.0 / 7)
    assert st["credit/adv_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 7))
    assert st["credit/turn_spread"] == pytest.approx((0.5 + 0.5 + 0.0 + 0.0) / 4)  # per leaf max - min
    assert st["credit/zero_adv_leaves"] == pytest.approx(1 / 4)


def _one_leaders_statistics(ro, exs, seed):
    """What one DP leader computes for its share of the prompts (before leaf sampling, so that the same
    trees can also be scored all together)."""
    from atpo_megatron.rollout.agent_loop import LoopStats

    before = LoopStats(**ro.loop.stats.as_dict())
    trees = ro.build_trees(exs, seed)
    em = score_leaves(trees, ro.tok)
    return trees, ro.loop.stats.since(before), em


def test_leader_statistics_merge_as_if_one_leader_rolled_out_everything():
    """merge_rollout_stats of every DP leader's statistics equals the statistics of all their trees taken
    together: counts add up, means are weighted by what they average over (issue 13 defect 2)."""
    from atpo_megatron.rollout.agent_loop import LoopStats

    ro, _, _ = make_rollout(RolloutPlan(initial_chains=3, expansion_iterations=1, top_k=2))
    parts = [_one_leaders_statistics(ro, examples(4)[:1], 1), _one_leaders_statistics(ro, examples(4)[1:], 2)]
    per_leader = [rs.rollout_statistics(t, rs.produced_leaf_stats(t), loop, em) for t, loop, em in parts]
    assert per_leader[0]["rollout/trees"] == 1 and per_leader[1]["rollout/trees"] == 3  # unequal shares
    trees = [t for p in parts for t in p[0]]
    loop = LoopStats(**{k: v + parts[1][1].as_dict()[k] for k, v in parts[0][1].as_dict().items()})
    together = rs.rollout_statistics(trees, rs.produced_leaf_stats(trees), loop, parts[0][2] + parts[1][2])

    merged = rs.merge_rollout_stats(per_leader)
    times = {k for k in together if k.endswith("_s")}  # the leaders run in parallel: the slowest one
    assert {k: v for k, v in merged.items() if k not in times} == pytest.approx(
        {k: v for k, v in together.items() if k not in times})
    assert {k: merged[k] for k in times} == {k: max(s[k] for s in per_leader) for k in times}


def _sometimes_refused(ctx, rng):
    """Question 0 always searches a query the retriever refuses; the others search FAIL half the time."""
    if turns_done(ctx):
        return answer("Paris")
    if "number 0?" in ctx or rng.random() < 0.5:
        return "<search>FAIL</search>"
    return "<search>fine</search>"


@pytest.mark.parametrize("train_on_tool_errors", [False, True])
def test_tool_error_leaves_are_not_trained_on_unless_asked(train_on_tool_errors):
    """Issue 13 defect 3: a failed search's leaf (``tool_error``) was scored (the format penalty) and trained
    on. By default it is dropped before leaf sampling, with its ancestors that lead to no other leaf."""
    ro, _, search = make_rollout(RolloutPlan(initial_chains=4, expansion_iterations=1, top_k=2),
                                 policy=_sometimes_refused)
    ro.drop_tool_errors = not train_on_tool_errors  # what RolloutConfig.train_on_tool_errors sets
    batch = run(ro, examples(3), seed=5)
    produced = round(batch.stats["rollout/finish_tool_error"] * batch.stats["rollout/leaves"])
    assert produced == batch.stats["rollout/tool_errors"] > 0
    kept = [(t.nodes[i].finish_reason, k) for k, t in enumerate(batch.trees) for i in t.leaves()]
    if train_on_tool_errors:
        assert any(reason == "tool_error" for reason, _ in kept)
        assert batch.stats["rollout/dropped_tool_error_leaves"] == 0
        return
    assert all(reason != "tool_error" for reason, _ in kept)
    assert batch.stats["rollout/dropped_tool_error_leaves"] == produced
    assert not batch.trees[0].leaves() and 0 not in {s.tree_index for s in batch.sequences}  # nothing left of it
    assert {s.tree_index for s in batch.sequences} == {1, 2}
    assert all(s.reward == 1.0 for s in batch.sequences)  # only the answered trajectories remain


def test_rollout_config_decides_whether_tool_errors_train():
    plan = RolloutPlan(initial_chains=1)
    assert make_rollout(plan)[0].drop_tool_errors
    engine = ScriptedEngine(random_policy)
    kept = TreeRollout(engine, FakeSearch(), RolloutConfig(train_on_tool_errors=True), plan)
    assert not kept.drop_tool_errors
    greedy = TreeRollout(engine, FakeSearch(), RolloutConfig(), RolloutPlan.greedy())
    assert not greedy.drop_tool_errors  # evaluation scores every trajectory


def test_chain_mode_uses_grpo_outcome_advantages():
    cfg = load_config(None, ["rollout.mode=chain", "rollout.chains=5"])
    plan = RolloutPlan.from_config(cfg)
    assert (plan.initial_chains, plan.expansion_iterations, plan.advantage) == (5, 0, "grpo")
    ro, _, _ = make_rollout(plan)
    batch = run(ro, examples(2), seed=8)
    for k, t in enumerate(batch.trees):
        assert len(t.nodes[0].children) == 5 and len(t.leaves()) == 5
        rows = [s for s in batch.sequences if s.tree_index == k]
        r = [s.reward for s in rows]
        mean = sum(r) / 5
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)  # unbiased, as verl's torch.std
        for s in rows:
            assert s.advantages == pytest.approx([(s.reward - mean) / (std + 1e-6)] * len(s.response_ids))
    assert batch.stats["rollout/token_saving"] == 0.0
    assert batch.stats["credit/turn_spread"] == 0.0  # one outcome advantage on every turn of a chain


def test_grpo_single_leaf_group_gets_its_reward():
    t = TurnTree([1, 2])
    t.add_child(0, [5], [1], [-0.1])
    t.nodes[1].reward = 1.0
    assert grpo_node_advantages(t) == pytest.approx([0.0, 1.0 / (1.0 + 1e-6)])  # verl: mean 0, std 1


def test_leaf_sampling_prunes_to_leaves_per_tree():
    ro, _, _ = make_rollout(RolloutPlan(initial_chains=5, leaves_per_tree=3))
    batch = run(ro, examples(2), seed=2)
    assert batch.stats["rollout/leaves"] == 10 and batch.stats["rollout/sequences"] == 6
    assert all(len(t.leaves()) == 3 for t in batch.trees)


def test_same_seed_same_trees():
    plan = RolloutPlan(initial_chains=3, expansion_iterations=1, top_k=2, expansion_mode="random")
    a = run(make_rollout(plan)[0], examples(2), seed=4)
    b = run(make_rollout(plan)[0], examples(2), seed=4)
    c = run(make_rollout(plan)[0], examples(2), seed=5)
    assert [t.to_dict() for t in a.trees] == [t.to_dict() for t in b.trees]
    assert [t.to_dict() for t in a.trees] != [t.to_dict() for t in c.trees]


def test_assistant_prefix_is_the_first_observation():
    def policy(ctx, rng):
        return " cue</search>" if not turns_done(ctx) else answer()

    ro, _, search = make_rollout(RolloutPlan(initial_chains=2, expansion_iterations=1, top_k=1),
                                 policy=policy, assistant_prefix="<search>")
    batch = run(ro, examples(1), seed=0)
    t = batch.trees[0]
    for c in t.nodes[0].children:
        assert CharTokenizer().decode(t.nodes[c].tokens[: t.nodes[c].obs_len]) == "<search>"
        assert t.nodes[c].mask[: t.nodes[c].obs_len] == [0] * len("<search>")
    assert search.calls[0] == ["cue", "cue"]


# ------------------------------------------------------------------------------------ pictures

class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_visualize_json_and_html(tmp_path):
    ro, _, _ = make_rollout(RolloutPlan(initial_chains=3, expansion_iterations=1, top_k=2))
    batch = run(ro, examples(2), seed=9)
    tok = CharTokenizer()
    path = write_trees_json(batch.trees, tmp_path / "t.json", tok, batch.stats)
    doc = json.loads(path.read_text())
    assert doc["stats"]["rollout/leaves"] == 10
    back = TurnTree.from_dict({k: doc["trees"][0][k] for k in ("prompt_ids", "meta")} |
                              {"nodes": [{k: v for k, v in n.items() if k not in ("index", "depth", "is_leaf",
                                         "observation_text", "action_text")} for n in doc["trees"][0]["nodes"]]})
    assert back.to_dict() == batch.trees[0].to_dict()
    leaf = batch.trees[0].leaves()[0]
    node = doc["trees"][0]["nodes"][leaf]
    assert node["is_leaf"] and node["action_text"] == tok.decode(batch.trees[0].nodes[leaf].tokens[node["obs_len"]:])

    page = trees_html(batch.trees, tok, batch.stats)
    parser = _Collect()
    parser.feed(page)
    assert parser.tags.count("svg") == 3  # legend + one per tree
    svgs = page.split("<svg")[1:]
    for s in svgs:
        ET.fromstring("<svg" + s.split("</svg>")[0] + "</svg>")  # well-formed XML
    tree_svg = ET.fromstring("<svg" + svgs[1].split("</svg>")[0] + "</svg>")
    ns = "{http://www.w3.org/2000/svg}"
    t0 = batch.trees[0]
    assert len(tree_svg.findall(f"{ns}line")) == len(t0.nodes) - 1
    assert len(tree_svg.findall(f".//{ns}rect")) == len(t0.leaves())
    titles = [g.find(f"{ns}title").text for g in tree_svg.findall(f"{ns}g")]
    assert len(titles) == len(t0.nodes) and "question number 0?" in titles[0]
    assert tok.decode(t0.nodes[leaf].tokens[t0.nodes[leaf].obs_len:]) in titles[leaf]


def test_colour_scales():
    assert reward_colour(-1) == "#d62728" and reward_colour(1) == "#2ca02c" and reward_colour(0) == "#9e9e9e"
    assert reward_colour(None) == "#ffffff"
    assert entropy_colour(0, 2) == "#440154" and entropy_colour(2, 2) == "#fde725" and entropy_colour(5, 0) == "#440154"


# ------------------------------------------------------------------------------------ evaluation

def eval_policy(ctx, rng):
    """Answers Paris for even question numbers and Rome for odd ones, after one search."""
    if not turns_done(ctx):
        return "<think>x</think><search>q</search>"
    number = int(ctx.split("question number ")[1].split("?")[0])
    return answer("Paris" if number % 2 == 0 else "Rome").replace("<think>done</think>", "")


def test_evaluate_em_per_source_and_micro_average():
    engine, search = ScriptedEngine(eval_policy), FakeSearch()
    exs = [QAExample(f"e{i}", f"question number {i}?", ["Paris"], "a" if i < 6 else "b") for i in range(8)]
    # source a: questions 0-5 -> 3 of 6 right; source b: 6, 7 -> 1 of 2 right
    report = evaluate(engine, search, exs, Config(), batch_size=3, progress=False)
    assert report["per_source"]["a"]["em"] == pytest.approx(0.5) and report["per_source"]["a"]["n"] == 6
    assert report["per_source"]["b"]["em"] == pytest.approx(0.5) and report["per_source"]["b"]["n"] == 2
    assert report["avg"]["em"] == pytest.approx(4 / 8) and report["avg"]["f1"] == pytest.approx(4 / 8)
    assert report["avg"]["distinct_answers"] == 2 and report["per_source"]["b"]["distinct_answers"] == 2
    assert all(c.params.temperature == 0.0 for c in engine.calls)
    assert [len(c.prompts) for c in engine.calls] == [3, 3, 3, 3, 2, 2]  # 3 batches x (search, answer)
    assert all(s["turns"] == 2 and s["tool_calls"] == 1 for s in report["samples"])
    assert "Avg." in format_report(report)


def test_evaluate_uses_the_configured_assistant_prefix():
    engine, search = ScriptedEngine(eval_policy), FakeSearch()
    cfg = load_config(None, ["rollout.assistant_prefix=<search>"])
    evaluate(engine, search, [QAExample("e0", "question number 0?", ["Paris"], "a")], cfg, progress=False)
    first_context = engine.calls[0].prompts[0]
    assert CharTokenizer().decode(first_context).endswith("<search>")  # generation continues after the cue


def test_micro_average_weights_by_size():
    samples = [{"data_source": "big", "em": 1.0, "f1": 1.0, "turns": 1, "tool_calls": 0}] * 9 + \
              [{"data_source": "small", "em": 0.0, "f1": 0.0, "turns": 1, "tool_calls": 0}]
    s = summarize(samples)
    assert s["avg"]["em"] == pytest.approx(0.9)  # the macro mean would be 0.5
    assert s["per_source"]["small"]["em"] == 0.0


# ------------------------------------------------------------------------------------ command lines

@pytest.mark.slow
def test_rollout_and_eval_commands(tmp_path, monkeypatch):
    """`atpo rollout` / `atpo eval` end to end on the generated task and the embedded retriever,
    with the scripted engine standing in for the model."""
    from atpo_megatron import evaluate as ev

    real_env = experience.engine_and_search
    for module in (experience, ev):
        monkeypatch.setattr(module, "engine_and_search",
                            lambda cfg, engine=None: real_env(cfg, engine=ScriptedEngine(random_policy)))
    overrides = [f"data.embedded_dir={tmp_path / 'task'}", "tree.initial_chains=2", "tree.expansion_iterations=1",
                 "tree.top_k=1", "tree.leaves_per_tree=3", "rollout.max_response_tokens=600"]
    parser = argparse.ArgumentParser()
    experience.add_rollout_arguments(parser)
    args = parser.parse_args([*overrides, "--out", str(tmp_path / "out"), "--prompts", "2", "--seed", "1"])
    assert experience.rollout_main(args) == 0
    doc = json.loads((tmp_path / "out" / "trees.json").read_text())
    assert len(doc["trees"]) == 2 and doc["stats"]["rollout/leaves"] == 6
    assert doc["stats"]["rollout/search_queries"] > 0
    assert "<svg" in (tmp_path / "out" / "trees.html").read_text()

    parser = argparse.ArgumentParser()
    ev.add_eval_arguments(parser)
    args = parser.parse_args([*overrides, "--data", "embedded", "--limit", "5", "--out", str(tmp_path / "r.json"),
                              "--no-progress"])
    assert ev.eval_main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["avg"]["n"] == 5 and sum(r["n"] for r in report["per_source"].values()) == 5
