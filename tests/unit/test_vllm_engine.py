"""VLLMEngine against a fake ``vllm`` (tests/unit/fake_vllm.py) that mirrors vLLM 0.33's offline API.

What is checked: the arguments crossing into vLLM (constructor, SamplingParams, TokensPrompt, sleep
tags, RPC), and the conversion of vLLM's outputs back into Completions. What vLLM does on a GPU is not.
"""

import json
import shutil
import sys

import pytest
import torch

import fake_vllm
from atpo_megatron.config import RolloutConfig
from atpo_megatron.hub import resolve_model
from atpo_megatron.rollout import SamplingParams, make_engine
from atpo_megatron.rollout.vllm_engine import VLLMEngine, _to_completion

_TOKENIZERS = {}


@pytest.fixture
def vllm(monkeypatch):
    import transformers

    real = transformers.AutoTokenizer.from_pretrained

    def cached(path, *a, **k):  # 1 s per load otherwise; engines here are built a dozen times
        key = str(path)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = real(path, *a, **k)
        return _TOKENIZERS[key]

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", cached)
    return fake_vllm.install(monkeypatch)


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("smollm2-135m-instruct")  # tied embeddings, vocab 49152 == tokenizer


@pytest.fixture(scope="module")
def padded_untied(tmp_path_factory, smollm2):
    """A Qwen-like folder: lm_head untied, vocab padded 64 rows past the tokenizer."""
    d = tmp_path_factory.mktemp("padded")
    cfg = json.loads((smollm2 / "config.json").read_text())
    cfg.update(tie_word_embeddings=False, vocab_size=49216, num_hidden_layers=2)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in smollm2.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, d / f.name)
    return d


def cfg(**kw):
    return RolloutConfig(engine="vllm", **kw)


def last_llm():
    return fake_vllm.LLM.instances[-1]


def calls(llm, method):
    return [d for m, d in llm.log if m == method]


def test_missing_vllm_names_the_fix(monkeypatch, smollm2):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"pip install atpo_megatron\[vllm\] on a CUDA machine"):
        make_engine(cfg(), smollm2)


def test_constructor_arguments(vllm, smollm2):
    c = cfg(tp_size=2, gpu_memory_utilization=0.5, enable_sleep=True, max_prompt_tokens=2000, max_response_tokens=6192)
    eng = make_engine(c, smollm2, dtype=torch.bfloat16)
    assert isinstance(eng, VLLMEngine)
    kw = last_llm().init_kwargs
    assert kw["model"] == str(smollm2)
    assert kw["enable_prefix_caching"] is True
    assert kw["tensor_parallel_size"] == 2 and kw["gpu_memory_utilization"] == 0.5
    assert kw["enable_sleep_mode"] is True and kw["max_model_len"] == 8192
    assert kw["dtype"] == "bfloat16" and kw["logprobs_mode"] == "raw_logprobs"
    assert kw["worker_extension_cls"] == "atpo_megatron.rollout.vllm_engine.AtpoWorkerExtension"
    assert eng.tokenizer.eos_token_id == 2
    make_engine(cfg(enable_sleep=False), smollm2)
    assert last_llm().init_kwargs["dtype"] == "auto" and last_llm().init_kwargs["enable_sleep_mode"] is False
    with pytest.raises(ValueError, match="device"):
        make_engine(cfg(), smollm2, device="cuda:1")


def test_unknown_engine_kwarg_is_rejected_like_vllm(vllm, smollm2):
    with pytest.raises(TypeError, match="unexpected keyword"):
        VLLMEngine(smollm2, enable_prefix_cache=True)
    VLLMEngine(smollm2, enforce_eager=True, distributed_executor_backend="external_launcher")
    assert last_llm().init_kwargs["enforce_eager"] is True


def test_generate_arguments_with_seed_and_stop(vllm, smollm2):
    eng = make_engine(cfg(), smollm2)
    prompts = [[1, 2, 3], [1, 9], [4, 5, 6, 7]]
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=7, stop=("</search>",), seed=5)
    out = eng.generate(prompts, params)
    [g] = calls(last_llm(), "generate")
    assert g["use_tqdm"] is False
    assert g["prompts"] == [{"prompt_token_ids": p} for p in prompts]  # TokensPrompt is a plain dict
    sps = g["sampling_params"]
    assert [sp.seed for sp in sps] == [5, 6, 7]  # one seed per request, or repeats would be identical
    for sp in sps:
        assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (1, 0.8, 0.9, 20, 7)
        assert sp.stop == ["</search>"] and sp.include_stop_str_in_output is True and sp.detokenize is True
        assert sp.logprobs == 0 and sp.allowed_token_ids is None
    assert [len(c.token_ids) for c in out] == [7, 7, 7] and all(c.finish_reason == "length" for c in out)


def test_generate_arguments_without_seed_or_stop(vllm, smollm2):
    eng = make_engine(cfg(), smollm2)
    eng.generate([[1, 2], [1, 2]], SamplingParams(max_tokens=3))
    [g] = calls(last_llm(), "generate")
    sp = g["sampling_params"][0]
    assert all(s is sp for s in g["sampling_params"])  # one shared object: the engine's RNG draws
    assert sp.seed is None and sp.stop == [] and sp.detokenize is False and sp.top_k == -1
    assert eng.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        eng.generate([[]], SamplingParams())


def test_greedy_is_passed_through_and_accepted(vllm, smollm2):
    eng = make_engine(cfg(), smollm2)
    eng.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=2))
    [g] = calls(last_llm(), "generate")
    assert g["sampling_params"][0].temperature == 0


def test_padded_vocab_restricts_sampling(vllm, padded_untied):
    eng = make_engine(cfg(), padded_untied)
    eng.generate([[1, 2]], SamplingParams(max_tokens=4))
    [g] = calls(last_llm(), "generate")
    assert g["sampling_params"][0].allowed_token_ids == list(range(49152))


def test_output_conversion_and_finish_reasons(vllm, smollm2):
    eng = make_engine(cfg(), smollm2)
    llm = last_llm()
    scripted = {
        (1,): ([40, 41, 42], "length", None),
        (2,): ([50, 51], "stop", "</search>"),  # stop string
        (3,): ([60, 2], "stop", None),  # the tokenizer's EOS
        (4,): ([70, 71, 5], "stop", 5),  # an extra EOS id from generation_config.json
    }
    llm.script = lambda ids, sp, seed: scripted[tuple(ids)]
    out = eng.generate([[1], [2], [3], [4]], SamplingParams(max_tokens=3, stop=("</search>",)))
    assert [c.finish_reason for c in out] == ["length", "stop", "eos", "eos"]
    assert [c.token_ids for c in out] == [v[0] for v in scripted.values()]
    for c in out:  # the fake's log-prob rule: -((t*7 + i) % 50)/10 - 0.01
        assert c.logprobs == [-((t * 7 + i) % 50) / 10.0 - 0.01 for i, t in enumerate(c.token_ids)]
    llm.script = lambda ids, sp, seed: ([1], "abort", None)
    with pytest.raises(RuntimeError, match="'abort'"):
        eng.generate([[1]], SamplingParams())


def test_logprob_is_read_by_token_id_not_position():
    # with logprobs=k>0 vLLM puts the sampled token first, but we must not rely on dict order
    L = fake_vllm.Logprob
    comp = fake_vllm.CompletionOutput(
        0, "", [7, 8], -3.0, [{3: L(-0.1, 1), 7: L(-1.0, 4)}, {8: L(-2.0, 1)}], finish_reason="length"
    )
    c = _to_completion(fake_vllm.RequestOutput("0", None, [1], None, [comp], True))
    assert c.token_ids == [7, 8] and c.logprobs == [-1.0, -2.0] and c.finish_reason == "length"
    comp.logprobs = None
    with pytest.raises(RuntimeError, match="logprobs=0"):
        _to_completion(fake_vllm.RequestOutput("0", None, [1], None, [comp], True))


def hf_weights(n_layers, tie):
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight", p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight",
                  p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
    names += ["model.norm.weight", "lm_head.weight"]
    return [(n, torch.full((4, 8), float(i))) for i, n in enumerate(names)]


def test_load_weights_streams_buckets_to_the_worker_model(vllm, smollm2):
    eng = VLLMEngine(smollm2, weight_bucket_bytes=3 * 4 * 8 * 4)  # 3 fp32 [4, 8] tensors per bucket
    llm = last_llm()
    weights = hf_weights(30, tie=True)
    yielded = []
    sent_after = []

    def stream():
        for item in weights:
            yielded.append(item[0])
            yield item

    real_send = eng._send
    eng._send = lambda bucket: (sent_after.append(len(yielded)), real_send(bucket))
    eng.load_weights(stream())
    rpcs = calls(llm, "collective_rpc")
    assert all(r["method"] == "atpo_load_weights" for r in rpcs)
    assert sent_after[0] == 3 < len(weights)  # streamed: the first bucket left before the rest was read
    assert [len(r["args"][0]) for r in rpcs] == [3] * 90 + [2]  # 1 + 30*9 + 1 names without lm_head
    # tied: lm_head.weight is not sent (vLLM would skip it, or fail without embed_tokens in that call)
    expect = {n: t for n, t in weights if n != "lm_head.weight"}
    assert set(llm.model.weights) == set(expect)
    assert all(torch.equal(llm.model.weights[n], t) for n, t in expect.items())
    assert calls(llm, "reset_prefix_cache")  # awake: cached KV blocks are stale now
    assert [m for m, _ in llm.log][-1] == "reset_prefix_cache"


def test_load_weights_untied_sends_lm_head_and_rejects_unknown(vllm, padded_untied):
    eng = make_engine(cfg(), padded_untied)
    llm = last_llm()
    eng.load_weights(hf_weights(2, tie=False))
    assert "lm_head.weight" in llm.model.weights
    with pytest.raises(ValueError, match="no module or parameter named 'decoder.final_layernorm.weight'"):
        eng.load_weights([("decoder.final_layernorm.weight", torch.zeros(2))])


def test_in_process_engine_keeps_tensors_where_they_are(vllm, padded_untied):
    # external_launcher runs the engine core in-process: no msgpack, no copy to CPU. A meta tensor
    # cannot be copied to CPU, so this fails if the engine tried.
    eng = VLLMEngine(padded_untied, distributed_executor_backend="external_launcher")
    eng.load_weights([("model.norm.weight", torch.empty(576, device="meta"))])
    assert last_llm().model.weights["model.norm.weight"].is_meta
    eng2 = VLLMEngine(padded_untied)  # default multiprocess: arguments must be CPU tensors in lists
    eng2.load_weights([("model.norm.weight", torch.ones(3))])
    [rpc] = calls(last_llm(), "collective_rpc")
    assert isinstance(rpc["args"][0], list) and rpc["args"][0][0][1].device.type == "cpu"


def test_sleep_load_wake_sequence(vllm, smollm2):
    eng = make_engine(cfg(enable_sleep=True), smollm2)
    llm = last_llm()
    eng.sleep()
    eng.sleep()  # idempotent: one vLLM call
    assert calls(llm, "sleep") == [dict(level=1, mode="abort")]
    with pytest.raises(RuntimeError, match="wake"):
        eng.generate([[1, 2]], SamplingParams(max_tokens=2))
    llm.log.clear()
    eng.load_weights(hf_weights(30, tie=True)[:3])
    eng.wake()
    steps = [(m, d.get("tags", d.get("method"))) for m, d in llm.log]
    assert steps == [("wake_up", ["weights"]), ("collective_rpc", "atpo_load_weights"), ("wake_up", ["kv_cache"])]
    assert not llm.asleep
    assert len(eng.generate([[1, 2]], SamplingParams(max_tokens=2))) == 1


def test_sleep_wake_without_load(vllm, smollm2):
    eng = make_engine(cfg(enable_sleep=True), smollm2)
    llm = last_llm()
    eng.sleep()
    eng.wake()
    assert calls(llm, "wake_up") == [dict(tags=["kv_cache", "weights"])] and not llm.asleep
    eng.wake()  # awake already: nothing
    assert len(calls(llm, "wake_up")) == 1


def test_sleep_level_2_requires_fresh_weights(vllm, smollm2):
    eng = VLLMEngine(smollm2, sleep_level=2)
    eng.sleep()
    assert calls(last_llm(), "sleep") == [dict(level=2, mode="abort")]
    with pytest.raises(RuntimeError, match="load_weights"):
        eng.wake()
    eng.load_weights(hf_weights(30, tie=True))
    eng.wake()
    assert not last_llm().asleep


def test_sleep_disabled_is_a_no_op(vllm, smollm2):
    eng = make_engine(cfg(enable_sleep=False), smollm2)
    eng.sleep()
    eng.wake()
    assert not calls(last_llm(), "sleep") and not calls(last_llm(), "wake_up")
    assert len(eng.generate([[1]], SamplingParams(max_tokens=1))) == 1


def test_fake_enforces_vllm_rules_our_engine_relies_on(vllm):
    # the rules that made us choose detokenize=bool(stop) and per-request seeds
    with pytest.raises(vllm.exceptions.VLLMValidationError):
        vllm.SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(vllm.exceptions.VLLMValidationError):
        vllm.SamplingParams(n=2, temperature=0)
    assert vllm.SamplingParams().max_tokens == 16
    assert vllm.TokensPrompt(prompt_token_ids=[1]) == {"prompt_token_ids": [1]}
