"""A fake ``vllm`` package for CPU tests, faithful to vLLM 0.33 up to the engine boundary.

Names, keywords, defaults, validation and return shapes follow /work/shared/notes/vllm-te-api.md
(sections 1-3 and the checklist in 6). Generation is a deterministic toy: token t of a request is a
hash of (prompt, seed, t); a test can replace ``FakeLLM.script`` to force EOS, stop strings or length.
``install(monkeypatch)`` puts ``vllm``, ``vllm.exceptions``, ``vllm.logprobs``, ``vllm.outputs``,
``vllm.sampling_params`` and ``vllm.inputs`` into ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import types
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path

import torch

# ------------------------------------------------------------------ exceptions, params, prompts


class VLLMError(Exception):
    pass


class VLLMClientError(VLLMError):
    pass


class VLLMValidationError(VLLMClientError):
    pass


class RequestOutputKind(IntEnum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


_SP_DEFAULTS = dict(
    n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, temperature=1.0, top_p=1.0,
    top_k=0, min_p=0.0, seed=None, stop=None, stop_token_ids=None, ignore_eos=False, max_tokens=16,
    min_tokens=0, logprobs=None, prompt_logprobs=None, logprob_token_ids=None, flat_logprobs=False,
    detokenize=True, skip_special_tokens=True, spaces_between_special_tokens=True,
    include_stop_str_in_output=False, output_kind=RequestOutputKind.CUMULATIVE, stream_interval=None,
    structured_outputs=None, logit_bias=None, allowed_token_ids=None, extra_args=None, bad_words=None,
    skip_reading_prefix_cache=None, thinking_token_budget=None, repetition_detection=None,
    routed_experts_prompt_start=0, trace_decode_token_ids=None,
)


class SamplingParams:
    """Keyword-only like the msgspec Struct; validates like its ``__post_init__``."""

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(_SP_DEFAULTS)
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) {sorted(unknown)}")
        for k, v in {**_SP_DEFAULTS, **kwargs}.items():
            setattr(self, k, v)
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        if self.seed == -1:
            self.seed = None
        if self.logprobs is True:
            self.logprobs = 1
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= 2:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}")
        if 0 < self.temperature < 0.01:
            self.temperature = 0.01
        if self.temperature < 1e-5:
            if self.n != 1:
                raise VLLMValidationError("n must be 1 when using greedy sampling")
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        if not 0 < self.top_p <= 1:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise VLLMValidationError(f"top_k must be an int >= -1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < -1:
            raise VLLMValidationError(f"logprobs must be None, >= 0 or -1, got {self.logprobs}")
        if self.stop and not self.detokenize:
            raise VLLMValidationError("stop strings are only supported when detokenize is True")
        if any(s == "" for s in self.stop):
            raise VLLMValidationError("stop cannot contain an empty string")

    def clone(self):
        new = object.__new__(SamplingParams)
        new.__dict__.update({k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()})
        return new


def TokensPrompt(**kwargs):  # a TypedDict: calling it returns a plain dict
    allowed = {"prompt_token_ids", "prompt", "token_type_ids", "prompt_token_offsets", "multi_modal_data",
               "mm_processor_kwargs", "multi_modal_uuids", "cache_salt"}
    assert set(kwargs) <= allowed, f"unknown TokensPrompt keys {set(kwargs) - allowed}"
    return dict(kwargs)


def TextPrompt(**kwargs):
    return dict(kwargs)


# ------------------------------------------------------------------ outputs


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    routed_experts: object = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: object = None
    sampling_mask: object = None
    spec_decode_metrics: object = None
    weight_versions: object = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished, metrics=None,
                 lora_request=None, encoder_prompt=None, encoder_prompt_token_ids=None, num_cached_tokens=None,
                 num_cache_creation_tokens=None, *, prompt_token_id_logprobs=None, kv_transfer_params=None,
                 ec_transfer_params=None, **kwargs):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.prompt_logprobs, self.outputs, self.finished = prompt_logprobs, outputs, finished
        self.metrics, self.num_cached_tokens = metrics, num_cached_tokens


# ------------------------------------------------------------------ worker and model


class FakeLlamaModel:
    """``load_weights`` with vLLM's contract for Llama: HF names, full tensors, returns loaded names."""

    def __init__(self, hf_config: dict):
        self.cfg = hf_config
        L = hf_config["num_hidden_layers"]
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        for i in range(L):
            p = f"model.layers.{i}."
            names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"}
            names |= {p + f"self_attn.{x}_proj.weight" for x in "qkv"}
            names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        if not hf_config.get("tie_word_embeddings", False):
            names.add("lm_head.weight")
        self.names = names
        self.weights: dict[str, torch.Tensor] = {}
        self.calls: list[list[str]] = []

    def load_weights(self, weights):
        weights = list(weights)
        given = {n for n, _ in weights}
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.cfg.get("tie_word_embeddings", False):
                if "model.embed_tokens.weight" not in given:
                    raise ValueError(f"{name} was skipped because it is tied to model.embed_tokens.weight")
                continue
            if name not in self.names:
                raise ValueError(f"There is no module or parameter named '{name}' in LlamaForCausalLM")
            self.weights[name] = tensor.clone()
            loaded.add(name)
        self.calls.append([n for n, _ in weights])
        return loaded


class Worker:
    """The subset of ``vllm.v1.worker.gpu_worker.Worker`` names that matter for extension checks."""

    def __init__(self, model):
        self._model = model

    def get_model(self):
        return self._model

    def apply_model(self, func):
        return func(self.get_model())

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        self._model.load_weights(weights_iterator)

    def update_weights(self, *a, **k): ...
    def start_weight_update(self, *a, **k): ...
    def finish_weight_update(self, *a, **k): ...
    def init_weight_transfer_engine(self, *a, **k): ...
    def load_model(self, *a, **k): ...
    def sleep(self, *a, **k): ...
    def wake_up(self, *a, **k): ...
    def execute_model(self, *a, **k): ...
    def shutdown(self, *a, **k): ...
    def check_health(self, *a, **k): ...


def _make_worker(model, extension_qualname: str):
    if not extension_qualname:
        return Worker(model)
    if not isinstance(extension_qualname, str):
        raise TypeError("worker_extension_cls must be a dotted string")
    module, _, name = extension_qualname.rpartition(".")
    ext = getattr(importlib.import_module(module), name)
    for attr in dir(ext):
        if not attr.startswith("__"):
            assert not hasattr(Worker, attr), f"Worker class already has an attribute {attr}, which conflicts"
    return type("WorkerWithExtension", (Worker, ext), {})(model)


def _serialisable(obj) -> bool:
    """msgpack by value: tensors (CPU), numbers, strings, None, and lists/tuples/dicts of them."""
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if obj is None or isinstance(obj, (int, float, str, bool, bytes)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_serialisable(x) for x in obj)
    if isinstance(obj, dict):
        return all(_serialisable(k) and _serialisable(v) for k, v in obj.items())
    return False


# ------------------------------------------------------------------ LLM

_ENGINE_ARGS = {
    "enable_prefix_caching", "enable_sleep_mode", "sleep_mode_backend", "enable_cumem_allocator",
    "sleep_preserve_parameter_names", "enable_nccl_comm_suspend", "max_model_len", "distributed_executor_backend",
    "load_format", "worker_extension_cls", "worker_cls", "logprobs_mode", "max_logprobs", "weight_transfer_config",
    "pipeline_parallel_size", "data_parallel_size", "max_num_seqs", "max_num_batched_tokens", "generation_config",
    "disable_log_stats",
}
_LOGPROBS_MODES = {"raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"}


class _FakeLLMEngine:
    def __init__(self, llm, in_process: bool):
        self._llm = llm
        if in_process:
            self.model_executor = types.SimpleNamespace(driver_worker=llm._worker)

    def is_sleeping(self) -> bool:
        return bool(self._llm.asleep)


class LLM:
    instances: list["LLM"] = []

    def __init__(self, model: str, *, tokenizer=None, skip_tokenizer_init=False, trust_remote_code=False,
                 tensor_parallel_size=1, dtype="auto", quantization=None, revision=None, seed=0,
                 gpu_memory_utilization=0.92, cpu_offload_gb=0, enforce_eager=False, kv_cache_memory_bytes=None,
                 compilation_config=None, hf_overrides=None, logits_processors=None, return_sampling_mask=False,
                 **kwargs):
        unknown = set(kwargs) - _ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        if dtype not in ("auto", "half", "float16", "bfloat16", "float", "float32"):
            raise ValueError(f"unknown dtype {dtype!r}")
        if kwargs.get("logprobs_mode", "raw_logprobs") not in _LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {kwargs['logprobs_mode']!r}")
        self.init_kwargs = dict(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                                gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, **kwargs)
        hf_config = json.loads((Path(model) / "config.json").read_text())
        self.max_model_len = kwargs.get("max_model_len") or hf_config.get("max_position_embeddings", 2048)
        self.vocab_size = hf_config["vocab_size"]
        self.eos_token_id = hf_config.get("eos_token_id", 2)
        self.model = FakeLlamaModel(hf_config)
        self._worker = _make_worker(self.model, kwargs.get("worker_extension_cls", ""))
        self.in_process = (kwargs.get("distributed_executor_backend") == "external_launcher"
                           or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0")
        self.llm_engine = _FakeLLMEngine(self, self.in_process)
        self.sleep_enabled = bool(kwargs.get("enable_sleep_mode", False))
        self.asleep: set[str] = set()
        self.request_counter = 0
        self.log: list[tuple] = []  # (method, details) in call order
        self.script = self.default_script
        LLM.instances.append(self)

    # -- generation
    def default_script(self, prompt_ids: list[int], sp: SamplingParams, seed: int):
        """(token_ids, finish_reason, stop_reason): max_tokens pseudo-random ids, no EOS, no stops."""
        g = torch.Generator().manual_seed(hash((tuple(prompt_ids), seed, sp.temperature)) % (2**31))
        hi = len(sp.allowed_token_ids) if sp.allowed_token_ids else self.vocab_size
        n = min(sp.max_tokens, self.max_model_len - len(prompt_ids))
        return torch.randint(3, hi, (n,), generator=g).tolist(), "length", None

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None, mm_processor_kwargs=None):
        if "scheduling" in self.asleep:
            raise RuntimeError("fake: the real engine would queue these requests forever (scheduling paused)")
        if isinstance(prompts, dict) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params.output_kind = RequestOutputKind.FINAL_ONLY
            per = [sampling_params] * len(prompts)
        else:
            if len(sampling_params) != len(prompts):
                raise VLLMValidationError("The lengths of prompts and sampling_params must be the same.")
            per = list(sampling_params)
        self.log.append(("generate", dict(prompts=prompts, sampling_params=per, use_tqdm=use_tqdm)))
        outs = []
        for p, sp in zip(prompts, per):
            ids = p["prompt_token_ids"] if isinstance(p, dict) else p
            if len(ids) > self.max_model_len:
                raise VLLMValidationError("prompt is longer than the maximum model length")
            sp = sp.clone()
            if sp.logprobs is not None and sp.logprobs > 20:
                raise VLLMValidationError("Requested sample logprobs of more than max_logprobs=20")
            seed = sp.seed if sp.seed is not None else self.request_counter + 1000 * self.init_kwargs["seed"]
            tokens, finish, stop_reason = self.script(list(ids), sp, seed)
            logprobs = cum = None
            if sp.logprobs is not None:
                logprobs, cum = [], 0.0
                for i, t in enumerate(tokens):
                    lp = -((t * 7 + i) % 50) / 10.0 - 0.01
                    entry = {t: Logprob(lp, rank=1 + (t % 5), decoded_token=None if not sp.detokenize else f"<{t}>")}
                    for r in range(1, sp.logprobs + 1):
                        entry.setdefault(r + 100, Logprob(-float(r), rank=r))
                    logprobs.append(entry)
                    cum += lp
            comp = CompletionOutput(index=0, text="" if not sp.detokenize else "<text>", token_ids=list(tokens),
                                    cumulative_logprob=cum, logprobs=logprobs, finish_reason=finish,
                                    stop_reason=stop_reason)
            outs.append(RequestOutput(str(self.request_counter), None, list(ids), None, [comp], True,
                                      num_cached_tokens=0))
            self.request_counter += 1
        return sorted(outs, key=lambda o: int(o.request_id))

    def get_tokenizer(self):
        raise NotImplementedError("fake: load the tokenizer with transformers")

    # -- sleep
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self.sleep_enabled:
            raise ValueError("fake: sleep mode is not enabled (LLM(..., enable_sleep_mode=True))")
        self.log.append(("sleep", dict(level=level, mode=mode)))
        if "weights" in self.asleep:
            return
        self.asleep = {"weights", "kv_cache", "scheduling"} if level >= 1 else {"scheduling"}
        if level == 2:
            self.model.weights.clear()  # garbage after wake unless reloaded

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.log.append(("wake_up", dict(tags=tags)))
        for t in tags or ["weights", "kv_cache", "scheduling"]:
            if t not in ("weights", "kv_cache", "scheduling"):
                raise ValueError(f"unknown tag {t}")
            self.asleep.discard(t)
        if not self.asleep & {"weights", "kv_cache"}:
            self.asleep.discard("scheduling")  # scheduling resumes once all memory is back
        return not self.asleep

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.log.append(("reset_prefix_cache", {}))
        return True

    # -- RPC
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_process:
            if callable(method) and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
                raise TypeError(f"Object of type {type(method)} is not serializable")
            if not (_serialisable(list(args)) and _serialisable(kwargs)):
                raise TypeError("fake: collective_rpc arguments must be msgpack-serialisable (CPU tensors, lists)")
        if "weights" in self.asleep and method in ("atpo_load_weights", "reload_weights"):
            raise RuntimeError("fake: writing weights while they are asleep (wake_up(tags=['weights']) first)")
        self.log.append(("collective_rpc", dict(method=method, args=args, kwargs=kwargs)))
        fn = getattr(self._worker, method) if isinstance(method, str) else (lambda *a, **k: method(self._worker, *a, **k))
        return [fn(*args, **kwargs)]

    def apply_model(self, func):
        return self.collective_rpc("apply_model", args=(func,))


# ------------------------------------------------------------------ install


def install(monkeypatch) -> types.ModuleType:
    """Insert the fake package into sys.modules (undone by monkeypatch); returns the ``vllm`` module."""
    LLM.instances.clear()
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.33.0+fake"
    subs = {
        "exceptions": dict(VLLMError=VLLMError, VLLMClientError=VLLMClientError, VLLMValidationError=VLLMValidationError),
        "logprobs": dict(Logprob=Logprob),
        "outputs": dict(RequestOutput=RequestOutput, CompletionOutput=CompletionOutput),
        "sampling_params": dict(SamplingParams=SamplingParams, RequestOutputKind=RequestOutputKind),
        "inputs": dict(TokensPrompt=TokensPrompt, TextPrompt=TextPrompt),
    }
    for name, attrs in subs.items():
        mod = types.ModuleType(f"vllm.{name}")
        mod.__dict__.update(attrs)
        setattr(vllm, name, mod)
        monkeypatch.setitem(__import__("sys").modules, f"vllm.{name}", mod)
    vllm.__dict__.update(LLM=LLM, SamplingParams=SamplingParams, TokensPrompt=TokensPrompt, TextPrompt=TextPrompt,
                         RequestOutput=RequestOutput, CompletionOutput=CompletionOutput)
    monkeypatch.setitem(__import__("sys").modules, "vllm", vllm)
    return vllm
