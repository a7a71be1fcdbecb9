"""atpo sft: the demonstrations' exact layout (tokens and loss mask) and the NLL it trains."""

import json

import pytest
import torch

from atpo_megatron.config import load_config
from atpo_megatron.env.prompts import format_tool_result
from atpo_megatron.model_files import resolve_model
from atpo_megatron.rollout.agent_loop import encode_prompt
from atpo_megatron.sft import THINK, DemonstrationError, demonstration, draw_questions, nll, reference_rows, spec_of

ROW = {"question": "Who founded the company that built the Varlo Bridge?", "golden_answers": ["Krigri Tesh"],
       "metadata": {"hops": [{"query": "Varlo Bridge built by"}, {"query": "Orvane Works founded by"}]}}
RESULTS = ["Page 1: The Varlo Bridge was built by Orvane Works.", "Page 1: Orvane Works was founded by Krigri Tesh."]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def _spans(mask):
    """(start, end) of the runs of 1s."""
    out, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_demonstration_is_the_agent_loops_context_with_turns_trained(tok):
    ids, mask = demonstration(tok, ROW, RESULTS, prefix="<think>")
    prompt = encode_prompt(tok, ROW["question"])
    assert ids[:len(prompt)] == prompt and len(ids) == len(mask)
    turns = [tok.decode(ids[a:b]) for a, b in _spans(mask)]
    assert turns == [f"{THINK} <search> Varlo Bridge built by </search>", " <search> Orvane Works founded by </search>",
                     " <answer> \\boxed{Krigri Tesh} </answer><|im_end|>"]
    assert ids[-1] == tok.eos_token_id
    # everything untrained, in order: prompt, the prefix, each result exactly as the agent loop inserts it
    untrained = [t for t, m in zip(ids, mask) if not m]
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert untrained == prompt + enc("<think>") + enc(format_tool_result(RESULTS[0])) + enc(format_tool_result(RESULTS[1]))


def test_reference_rows_need_hop_chains(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(ROW) + "\n" + json.dumps({"question": "q", "golden_answers": ["a"]}) + "\n")
    assert reference_rows(good) == [ROW]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "golden_answers": ["a"]}) + "\n")
    with pytest.raises(DemonstrationError, match="metadata.hops"):
        reference_rows(bad)


def test_nll_is_the_mean_over_trained_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    a, b = ([3, 4, 5, 6, 7], [0, 0, 1, 1, 0]), ([8, 9, 10], [0, 1, 1])
    with torch.no_grad():
        got = nll(model, [a, b], pad_id=0, autocast=False)
        terms = []
        for ids, mask in (a, b):
            lp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            terms += [-lp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]]
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)  # 4 tokens, padding ignored


def test_spec_changes_with_what_the_demonstrations_depend_on():
    base = spec_of(load_config(None, []))
    assert spec_of(load_config(None, ["sft.steps=7"])) != base
    assert spec_of(load_config(None, ["retriever.topk=2"])) != base
    assert spec_of(load_config(None, ["rollout.assistant_prefix=<think>"])) != base
    assert spec_of(load_config(None, ["optimizer.lr=0.5"])) == base  # RL's lr does not matter here


def test_questions_are_drawn_in_turn_from_each_source():
    rows = [{"data_source": "a"}] * 8 + [{"data_source": "b"}] * 3 + [{"data_source": "c"}]
    picks = draw_questions(rows, steps=4, batch_size=3, seed=0)
    assert [len(b) for b in picks] == [3, 3, 3, 3]
    assert [[rows[i]["data_source"] for i in b] for b in picks] == [["a", "b", "c"]] * 4
    assert picks == draw_questions(rows, steps=4, batch_size=3, seed=0)  # seeded
