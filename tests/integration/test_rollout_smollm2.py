"""A real tree rollout: SmolLM2-135M-Instruct on the hf engine, the embedded BM25 retriever server
over the generated knowledge-base corpus, 2 questions, M=2, L=1, K=1, short budgets.

SmolLM2-135M does not follow the search protocol on its own (it rambles, and never writes
``<search>`` in our tries). The test therefore starts every trajectory's first turn with the masked
cue ``<search>`` (``rollout.assistant_prefix``, an observation of the first node, never
trained on): about half of the sampled first turns then close it with ``</search>`` within a few
dozen tokens, so 6 first turns make a real search call all but certain (and the seed fixes it).

    pytest -m integration tests/integration/test_rollout_smollm2.py -s   # -s prints the statistics
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from atpo_megatron.config import load_config
from atpo_megatron.env.prompts import format_tool_result
from atpo_megatron.env.reward import score
from atpo_megatron.env.data import load_examples
from atpo_megatron.experience import engine_and_search, make_experience
from atpo_megatron.rollout.tree_rollout import TreeRollout
from atpo_megatron.rollout.visualize import trees_html, write_trees_json

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 torch threads waiting on each other made
    SmolLM2 decoding 7x slower (57 s vs 8 s for 4 x 24 tokens at load ~7); idle, 1 thread costs ~1.5x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingClient:
    """The real SearchClient, with every query and result kept."""

    def __init__(self, client):
        self.client, self.log = client, []

    def search_batch(self, queries):
        results = self.client.search_batch(queries)
        self.log += list(zip(queries, results))
        return results


def test_tree_rollout_smollm2_real_retriever(tmp_path, one_thread):
    cfg = load_config(None, [
        f"data.embedded_dir={tmp_path / 'task'}", "tree.initial_chains=2", "tree.expansion_iterations=1",
        "tree.top_k=1", "tree.leaves_per_tree=3", "rollout.max_response_tokens=160", "rollout.max_turns=3",
        "retriever.topk=1", "retriever.max_passage_chars=200", "rollout.assistant_prefix=<search>",
    ])
    examples = load_examples(cfg, ["embedded"], "train")[:2]
    with engine_and_search(cfg) as (engine, client):
        search = RecordingClient(client)
        rollout = TreeRollout.from_config(engine, search, cfg)
        batch = make_experience(rollout, examples, cfg.credit, seed=0)
    tok = engine.tokenizer
    print({k: round(v, 4) for k, v in batch.stats.items()})

    # shape: M + L*K leaves per tree, one training row each
    assert [len(t.leaves()) for t in batch.trees] == [3, 3]
    assert batch.stats["rollout/leaves"] == 6 and len(batch.sequences) == 6

    # at least one real search, and its result went in as the child's observation, token for token
    assert search.log, "no search call was made; see the module docstring"
    assert all(r.ok for _, r in search.log)
    results = {format_tool_result(r.text) for _, r in search.log}
    tail = tok.encode("\n</result>", add_special_tokens=False)
    prefix = tok.encode("<search>", add_special_tokens=False)
    for t in batch.trees:
        for i, node in enumerate(t.nodes[1:], start=1):
            obs, action_mask = node.tokens[: node.obs_len], node.mask[node.obs_len :]
            assert node.mask[: node.obs_len] == [0] * node.obs_len
            assert node.logprobs[: node.obs_len] == [0.0] * node.obs_len
            if node.parent == 0:
                assert obs == prefix
            else:  # a tool result: the formatted text, or its head + the closing tag when cut
                full = {tuple(tok.encode(r, add_special_tokens=False)) for r in results}
                assert tuple(obs) in full or any(tuple(f[: len(obs) - len(tail)]) + tuple(tail) == tuple(obs) for f in full)
                assert t.nodes[node.parent].finish_reason == "tool"
            # the action is all generated, except the EOS an empty tool call appends
            inserted = [k for k, m in enumerate(action_mask) if m == 0]
            if node.finish_reason == "empty_call":
                assert inserted == [len(action_mask) - 1] and node.tokens[-1] == tok.eos_token_id
            else:
                assert inserted == []
            assert all(lp <= 0.0 for lp, m in zip(node.logprobs, node.mask) if m)

    # rewards are what the reward function says about the decoded responses
    for s in batch.sequences:
        t = batch.trees[s.tree_index]
        text = tok.decode(s.response_ids, skip_special_tokens=True)
        assert s.reward == score(text, t.meta["golden_answers"], training=True) == t.nodes[s.leaf].reward
        assert s.loss_mask == t.response(s.leaf)[1] and s.old_logprobs == t.response(s.leaf)[2]
        assert len(s.response_ids) <= 160

    # the pictures
    write_trees_json(batch.trees, tmp_path / "trees.json", tok, batch.stats)
    page = trees_html(batch.trees, tok, batch.stats)
    for svg in page.split("<svg")[1:]:
        ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")
