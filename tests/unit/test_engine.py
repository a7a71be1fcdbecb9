"""HFEngine on a tiny random Llama (hidden 16, 2 layers) with the real SmolLM2 tokenizer (vocab 49152).

The lm_head is untied and large (std 1) so greedy continuations vary instead of repeating one token,
which gives the stop-string tests real text to cut. Every expectation is computed independently: a
teacher-forced forward pass without padding, a brute-force full decode for stop strings.
"""

import dataclasses

import pytest
import torch

from atpo_megatron.config import RolloutConfig
from atpo_megatron.model_files import resolve_model
from atpo_megatron.rollout import Completion, Engine, SamplingParams, make_engine, segment_entropy
from atpo_megatron.rollout.hf_engine import HFEngine, _sample

GREEDY = SamplingParams(temperature=0, max_tokens=12)
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hi",
    "Question: who wrote Hamlet? Answer:",
    "<search> capital of France </search>",
    "1 2 3",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def tiny_llama(seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        if not tie:
            model.lm_head.weight.normal_(0.0, 1.0)
    return model.float().eval()


@pytest.fixture(scope="module")
def engine(tokenizer):
    return HFEngine(tiny_llama(), tokenizer, device="cpu", generation_batch_size=64)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]


def teacher_forced_logprobs(model, prompt, completion):
    """log p(completion[t] | prompt + completion[:t]) from one unpadded forward pass."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = logits[len(prompt) - 1 : -1].log_softmax(-1)
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(1), lp


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, Engine)


def test_left_padding_matches_each_prompt_alone(engine, prompts):
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths
    batch = engine.generate(prompts, GREEDY)
    for p, c in zip(prompts, batch):
        [alone] = engine.generate([p], GREEDY)
        assert c.token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
        assert len(c.token_ids) == len(c.logprobs) == GREEDY.max_tokens and c.finish_reason == "length"


def test_chunking_and_order(tokenizer, prompts):
    small = HFEngine(tiny_llama(), tokenizer, device="cpu", generation_batch_size=2)
    big = HFEngine(tiny_llama(), tokenizer, device="cpu", generation_batch_size=64)
    a, b = small.generate(prompts, GREEDY), big.generate(prompts, GREEDY)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert engine_outputs_differ(a)  # the results are per prompt, not one row copied around


def engine_outputs_differ(completions):
    return len({tuple(c.token_ids) for c in completions}) > 1


def test_greedy_logprobs_equal_teacher_forced_and_argmax(engine, prompts):
    for p, c in zip(prompts, engine.generate(prompts, GREEDY)):
        ref, lp = teacher_forced_logprobs(engine.model, p, c.token_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)
        assert lp.argmax(-1).tolist() == c.token_ids


def test_sampled_logprobs_equal_teacher_forced(engine, prompts):
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=7)
    out = engine.generate(prompts, params)
    for p, c in zip(prompts, out):
        ref, _ = teacher_forced_logprobs(engine.model, p, c.token_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)
        assert c.entropy == pytest.approx(-ref.mean().item(), abs=1e-5)


def test_logprobs_are_raw_at_other_temperatures(engine, prompts):
    # documented convention: log_softmax of the raw logits, whatever temperature/top-k/top-p sampled
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=8, seed=3)
    for p, c in zip(prompts, engine.generate(prompts, params)):
        ref, _ = teacher_forced_logprobs(engine.model, p, c.token_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)


def test_seeded_determinism(engine, prompts):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=123)
    a = engine.generate(prompts, params)
    b = engine.generate(prompts, params)
    c = engine.generate(prompts, dataclasses.replace(params, seed=124))
    assert a == b
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # a prompt repeated for n samples gets n different samples within one call
    reps = engine.generate([prompts[0]] * 4, params)
    assert len({tuple(x.token_ids) for x in reps}) == 4


def test_top_k_1_and_tiny_top_p_are_greedy(engine, prompts):
    greedy = engine.generate(prompts, GREEDY)
    for params in (SamplingParams(top_k=1, max_tokens=12, seed=1), SamplingParams(top_p=1e-6, max_tokens=12, seed=1)):
        assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in greedy]


def test_sampler_distribution():
    # p = [.5, .3, .15, .05]; check the empirical frequencies of each filter against the exact target
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    t2 = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()  # temperature 2: p^(1/2), renormalised
    cases = [
        (SamplingParams(), [0.5, 0.3, 0.15, 0.05]),
        (SamplingParams(top_p=0.7), [0.625, 0.375, 0, 0]),  # 0.5 < 0.7 keeps token 1; 0.8 >= 0.7 stops
        (SamplingParams(top_p=0.8), [0.625, 0.375, 0, 0]),  # mass before token 2 is exactly 0.8: dropped
        (SamplingParams(top_k=3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (SamplingParams(temperature=2.0), (t2 / t2.sum()).tolist()),
    ]
    for params, want in cases:
        tok, lp = _sample(logits, params, gen)
        freq = torch.bincount(tok, minlength=4).float() / len(tok)
        assert torch.allclose(freq, torch.tensor(want), atol=0.015), (params, freq)
        assert torch.allclose(lp, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(1))


def first_stop_index(tokenizer, tokens, stop):
    """Brute force: the first t such that the full decode of tokens[:t+1] contains stop."""
    for t in range(len(tokens)):
        if stop in tokenizer.decode(tokens[: t + 1], skip_special_tokens=True):
            return t
    return None


def test_stop_string_ends_at_completing_token_and_others_continue(engine, tokenizer, prompts):
    long = SamplingParams(temperature=0, max_tokens=24)
    free = engine.generate(prompts, long)
    toks = free[0].token_ids
    # a stop string straddling a token boundary: the last 3 chars before token 8 + first char of token 8
    before, upto = (tokenizer.decode(toks[:k], skip_special_tokens=True) for k in (8, 9))
    assert len(upto) > len(before) >= 3
    stop = upto[len(before) - 3 : len(before) + 1]
    want = first_stop_index(tokenizer, toks, stop)
    assert want is not None and want <= 8
    out = engine.generate(prompts, dataclasses.replace(long, stop=(stop, "NEVER-MATCHES-ZZZ")))
    c = out[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == toks[: want + 1] and c.logprobs == pytest.approx(free[0].logprobs[: want + 1], abs=1e-5)
    assert stop in tokenizer.decode(c.token_ids) and stop not in tokenizer.decode(c.token_ids[:-1])
    for f, o in zip(free[1:], out[1:]):  # rows without the stop run on, unchanged
        hit = first_stop_index(tokenizer, f.token_ids, stop)
        if hit is None:
            assert o.token_ids == f.token_ids and o.finish_reason == "length"
        else:
            assert o.token_ids == f.token_ids[: hit + 1] and o.finish_reason == "stop"


def test_stop_string_in_prompt_does_not_stop(engine, tokenizer, prompts):
    p = prompts[3]  # contains "</search>"
    [c] = engine.generate([p], SamplingParams(temperature=0, max_tokens=6, stop=("</search>",)))
    assert "</search>" in tokenizer.decode(p)
    assert c.finish_reason == "length" and len(c.token_ids) == 6


def test_eos_ends_sequence_and_is_included(tokenizer, prompts):
    model = tiny_llama()
    free = HFEngine(model, tokenizer, device="cpu").generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    toks = free[2].token_ids
    eos = toks[5]
    cut = toks.index(eos)
    eng = HFEngine(model, tokenizer, device="cpu", eos_token_ids=[eos])
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    assert out[2].finish_reason == "eos" and out[2].token_ids == toks[: cut + 1]
    assert len(out[2].logprobs) == cut + 1
    for f, o in zip(free, out):  # the others stop at their own first occurrence of that id, if any
        n = f.token_ids.index(eos) + 1 if eos in f.token_ids else len(f.token_ids)
        assert o.token_ids == f.token_ids[:n]


def test_default_eos_ids(engine, tokenizer):
    assert tokenizer.eos_token_id == 2 and 2 in engine.eos_token_ids  # <|im_end|>


def test_max_tokens_gives_length(engine, prompts):
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=3, seed=0))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 3 == len(c.logprobs) for c in out)
    [one] = engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1))
    assert len(one.token_ids) == 1 and one.finish_reason == "length"


def test_static_cache_matches_dynamic(tokenizer, prompts):
    model = tiny_llama()
    dyn = HFEngine(model, tokenizer, device="cpu")
    sta = HFEngine(model, tokenizer, device="cpu", static_cache=True)
    params = SamplingParams(temperature=0, max_tokens=10, stop=("ZZZ",))
    for a, b in zip(dyn.generate(prompts, params), sta.generate(prompts, params)):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_static_cache_with_early_finishers(tokenizer, prompts):
    model = tiny_llama()
    dyn = HFEngine(model, tokenizer, device="cpu")
    free = dyn.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    eos = free[0].token_ids[2]
    params = SamplingParams(temperature=0, max_tokens=10)
    a = HFEngine(model, tokenizer, device="cpu", eos_token_ids=[eos]).generate(prompts, params)
    b = HFEngine(model, tokenizer, device="cpu", eos_token_ids=[eos], static_cache=True).generate(prompts, params)
    assert a[0].finish_reason == "eos"
    assert [(c.token_ids, c.finish_reason) for c in a] == [(c.token_ids, c.finish_reason) for c in b]


def test_load_weights_round_trip(tokenizer, prompts):
    eng = HFEngine(tiny_llama(), tokenizer, device="cpu")
    original = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    before = eng.generate(prompts, GREEDY)
    other = tiny_llama(seed=1)
    eng.load_weights((n, p.detach().clone()) for n, p in other.named_parameters())  # a generator: streamed
    changed = eng.generate(prompts, GREEDY)
    assert [c.token_ids for c in changed] != [c.token_ids for c in before]
    assert changed == HFEngine(other, tokenizer, device="cpu").generate(prompts, GREEDY)
    eng.load_weights(iter(original.items()))
    assert eng.generate(prompts, GREEDY) == before  # exact: same floats, same tokens


def test_load_weights_tied_lm_head_and_errors(tokenizer):
    eng = HFEngine(tiny_llama(tie=True), tokenizer, device="cpu")
    new = torch.randn(49152, 16)
    eng.load_weights([("lm_head.weight", new)])
    assert torch.equal(eng.model.get_input_embeddings().weight, new)
    assert torch.equal(eng.model.get_output_embeddings().weight, new)
    eng.load_weights([("model.rotary_emb.inv_freq", torch.zeros(2))])  # derived buffer: ignored
    with pytest.raises(ValueError, match="no parameter 'decoder.layers.0.self_attention.linear_qkv.weight'"):
        eng.load_weights([("decoder.layers.0.self_attention.linear_qkv.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        eng.load_weights([("model.norm.weight", torch.zeros(17))])


def test_sleep_wake_on_cpu(tokenizer, prompts):
    eng = HFEngine(tiny_llama(), tokenizer, device="cpu")
    before = eng.generate(prompts[:2], GREEDY)
    eng.sleep()
    eng.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="wake"):
        eng.generate(prompts[:2], GREEDY)
    eng.wake()
    assert eng.generate(prompts[:2], GREEDY) == before


def test_input_validation(engine):
    assert engine.generate([], GREEDY) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="tuple of strings"):
        SamplingParams(stop="</search>")
    with pytest.raises(ValueError, match="empty string"):
        SamplingParams(stop=("",))
    assert SamplingParams(stop=["a"]).stop == ("a",)


def test_segment_entropy():
    assert segment_entropy([-1.0, -3.0]) == 2.0
    assert segment_entropy([]) == 0.0
    assert Completion([5, 6], [-0.5, -1.5], "eos").entropy == 1.0


def test_make_engine_from_folder(tmp_path, tokenizer, prompts):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = RolloutConfig(engine="hf", generation_batch_size=2)
    eng = make_engine(cfg, tmp_path, device_index=0)  # this rank's device: cpu without CUDA
    assert isinstance(eng, HFEngine) and eng.generation_batch_size == 2 and eng.model.dtype == torch.float32
    assert eng.device == torch.device("cpu")
    want = HFEngine(model, tokenizer, device="cpu").generate(prompts, GREEDY)
    got = eng.generate(prompts, GREEDY)  # chunks of 2 pad differently: equal to float rounding
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert all(g.logprobs == pytest.approx(w.logprobs, abs=1e-5) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="rollout.engine"):
        make_engine(dataclasses.replace(cfg, engine="sglang"), tmp_path)
    with pytest.raises(ValueError, match="rollout.tp_size=2: the hf engine has no tensor parallelism"):
        make_engine(dataclasses.replace(cfg, tp_size=2), tmp_path)


def test_padded_vocab_rows_are_never_sampled(tokenizer, prompts):
    # Qwen-style: the model's vocab is padded past the tokenizer. Make the padding rows win every argmax.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152 + 64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[49152:] *= 5.0
    eng = HFEngine(model, tokenizer, device="cpu")
    assert eng.sample_vocab == 49152
    for params in (GREEDY, SamplingParams(max_tokens=12, seed=0)):
        for p, c in zip(prompts, eng.generate(prompts, params)):
            assert max(c.token_ids) < 49152
            ref, lp = teacher_forced_logprobs(model, p, c.token_ids)  # full softmax, padding included
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=1e-6)  # values ~ -50
            if params is GREEDY:
                assert lp.argmax(-1).min() >= 49152  # unrestricted argmax would have picked padding


def test_position_ids_count_real_tokens_only(tokenizer, prompts):
    # RoPE only sees position differences, so a wrong constant offset would not change any output;
    # check the positions fed to the model directly instead.
    model = tiny_llama()
    seen = []
    hook = model.model.rotary_emb.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        HFEngine(model, tokenizer, device="cpu").generate(prompts[:2], SamplingParams(temperature=0, max_tokens=3))
    finally:
        hook.remove()
    n0, n1 = len(prompts[0]), len(prompts[1])  # sorted longest first: row 0 unpadded, row 1 left-padded
    assert seen[0][0].tolist() == list(range(n0))
    assert seen[0][1, -n1:].tolist() == list(range(n1))
    assert [s[:, 0].tolist() for s in seen[1:]] == [[n0 + t, n1 + t] for t in range(2)]


def test_prefix_cache_reuses_kept_contexts_and_matches_a_fresh_prefill(tokenizer, prompts):
    model = tiny_llama()
    fresh = HFEngine(model, tokenizer, device="cpu")
    cached = HFEngine(model, tokenizer, device="cpu", prefix_cache_mb=64)
    obs = tokenizer.encode(" <result> Paris is the capital </result>")
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=5, stop=("ZZZ",))
    shared = tokenizer.encode("You are a helpful assistant who answers questions. " * 4)  # > MIN_SHARED tokens
    contexts = [shared + p for p in prompts]
    for turn in range(3):  # the agent loop: each turn re-sends context + completion + observation
        a, b = fresh.generate(contexts, params), cached.generate(contexts, params)
        for ctx, x, y in zip(contexts, a, b):
            assert x.token_ids == y.token_ids
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
            ref, _ = teacher_forced_logprobs(model, ctx, y.token_ids)
            assert torch.allclose(torch.tensor(y.logprobs), ref, atol=1e-5, rtol=0)
            nxt = ctx + y.token_ids + obs
            # everything but the completion's last token (never fed) is kept for the next turn
            assert cached.prefix_cache.match(nxt)[0] == len(ctx) + len(y.token_ids) - 1
        contexts = [ctx + y.token_ids + obs for ctx, y in zip(contexts, b)]
    # a fork re-samples from inside a kept context: the common part is reused
    fork = contexts[0][: len(shared) + 3] + tokenizer.encode(" fork")
    assert cached.prefix_cache.match(fork, max_len=len(fork) - 1)[0] == len(shared) + 3
    assert fresh.generate([fork], params)[0].token_ids == cached.generate([fork], params)[0].token_ids


def test_prefix_cache_is_dropped_with_the_old_weights(tokenizer, prompts):
    eng = HFEngine(tiny_llama(), tokenizer, device="cpu", prefix_cache_mb=64)
    eng.generate(prompts, GREEDY)
    assert eng.prefix_cache.entries
    other = tiny_llama(seed=1)
    eng.load_weights((n, p.detach().clone()) for n, p in other.named_parameters())
    assert not eng.prefix_cache.entries  # stale KV would decode the new weights from the old ones' keys
    assert eng.generate(prompts, GREEDY) == HFEngine(other, tokenizer, device="cpu").generate(prompts, GREEDY)
    eng.sleep()
    eng.wake()
    assert not eng.prefix_cache.entries


def test_prefix_cache_bookkeeping():
    from atpo_megatron.rollout.hf_engine import PrefixCache

    def kv(n):  # [layers, 2, heads, n, dim]: 2 * 25 fp16 values = 100 bytes per token
        return torch.zeros((1, 2, 1, n, 25), dtype=torch.float16)

    cache = PrefixCache(max_bytes=1000)  # 10 tokens
    cache.add([1, 2, 3], kv(3))
    cache.add([1, 2, 3, 4], kv(4))  # covers [1, 2, 3]: that entry is dropped
    assert list(cache.entries) == [(1, 2, 3, 4)] and cache.bytes == 400
    assert cache.match([1, 2, 9])[0] == 2 and cache.match([1, 2, 3, 4, 5], max_len=3)[0] == 3
    assert cache.match([7])[0] == 0 and cache.match([7])[1] is None
    cache.add([5, 6, 7, 8], kv(4))
    cache.match([1, 2])  # [1, 2, 3, 4] is now the most recently used
    cache.add([9, 9, 9], kv(3))  # 1100 bytes > 1000: the least recently used entry goes
    assert list(cache.entries) == [(1, 2, 3, 4), (9, 9, 9)] and cache.bytes == 700
