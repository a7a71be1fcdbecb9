"""The real SmolLM2-135M-Instruct (fp32, CPU) through make_engine: sensible greedy chat answers, and
log-probs equal to a separate teacher-forced forward pass."""

import pytest
import torch

from atpo_megatron.config import RolloutConfig
from atpo_megatron.model_files import resolve_model
from atpo_megatron.rollout import SamplingParams, make_engine

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine():
    return make_engine(RolloutConfig(engine="hf", generation_batch_size=8), resolve_model("smollm2"))


def chat(tokenizer, question):
    msgs = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)


def teacher_forced(model, prompt, completion):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    lp = logits[len(prompt) - 1 : -1].log_softmax(-1)
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(1)


def test_greedy_chat_answers_and_exact_logprobs(engine):
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "How many legs does a spider have? Answer with a number."]
    prompts = [chat(tok, q) for q in questions]
    out = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=40))
    answer = tok.decode(out[0].token_ids, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert out[0].finish_reason == "eos" and out[0].token_ids[-1] == tok.eos_token_id
    for p, c in zip(prompts, out):
        ref = teacher_forced(engine.model, p, c.token_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_stop_string_spanning_tokens_and_sampled_logprobs(engine):
    # the assistant turn is pre-filled with "<search> capital of France"; the model closes the tag
    tok = engine.tokenizer
    q = "To look something up, write <search> your query </search>. Look up the capital of France."
    prompt = chat(tok, q) + tok.encode("<search> capital of France")
    [g] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=32, stop=("</search>",)))
    assert g.finish_reason == "stop"
    assert tok.decode(g.token_ids).endswith("</search>")  # " </" + "search" + ">": cut at the ">" token
    assert "</search>" not in tok.decode(g.token_ids[:-1])
    outs = engine.generate([prompt] * 4, SamplingParams(temperature=1.0, max_tokens=32, seed=0, stop=("</search>",)))
    for c in outs:
        ref = teacher_forced(engine.model, prompt, c.token_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
        text = tok.decode(c.token_ids)
        if c.finish_reason == "stop":
            assert "</search>" in text and "</search>" not in tok.decode(c.token_ids[:-1])
        else:
            assert c.finish_reason in ("eos", "length") and "</search>" not in text
