"""The rollout engine on vLLM 0.33's offline ``LLM`` (CUDA only; ``pip install atpo_megatron[vllm]``).

What it sets, and why (see /work/shared/notes/vllm-te-api.md for the API facts):
* ``enable_prefix_caching=True``: tree rollouts re-send long shared contexts; the cache skips them.
* ``logprobs_mode="raw_logprobs"`` and ``SamplingParams(logprobs=0)``: the log-prob of exactly the
  sampled token under the raw model distribution, the convention of engine.py (also vLLM's default;
  passed explicitly so a changed default cannot silently change the PPO ratio).
* ``include_stop_str_in_output=True``: we only read ``token_ids`` (vLLM cuts them right after the token
  completing a stop string, either way); the flag keeps the text consistent with the tokens.
* ``detokenize`` only when there are stop strings (vLLM needs the text to match them).
* Per-request seeds ``params.seed + i``: vLLM seeds each request's own generator, so one shared seed
  would give every repeated prompt the *same* sample.
* ``allowed_token_ids`` = the tokenizer's ids when the model's vocab is padded past the tokenizer
  (Qwen), as the paper's code does (spec 2.2), so padding rows are never sampled.

Weights go in through a worker extension (:class:`AtpoWorkerExtension`, a mixin vLLM adds to its
``Worker``): ``collective_rpc("atpo_load_weights", args=(bucket,))`` calls the model's own
``load_weights`` (HF names, full tensors; each TP rank narrows to its shard) on every worker, bucket
by bucket, so the caller's generator is streamed. This suits bf16/fp16 rollout weights; a quantized
rollout model would need ``reload_weights`` instead (it post-processes after loading).

Sleep (colocated mode): ``sleep()`` is ``llm.sleep(level)`` (1: weights to CPU RAM, KV cache freed,
prefix cache cleared; 2: weights discarded too). ``load_weights`` while asleep wakes only the weights
(``wake_up(tags=["weights"])``) so the KV cache is not allocated while tensors arrive; ``wake()`` then
wakes the rest. Without ``enable_sleep_mode`` sleep/wake do nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from atpo_megatron.rollout.engine import Completion, SamplingParams

INSTALL_HINT = "pip install atpo_megatron[vllm] on a CUDA machine, or set rollout.engine=hf"
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"rollout.engine=vllm needs vLLM 0.33, which is not installed: {INSTALL_HINT}") from exc
    return vllm


class AtpoWorkerExtension:
    """Mixed into vLLM's ``Worker`` (``worker_extension_cls``); ``self`` is the worker.

    Method names must not exist on ``Worker`` (vLLM asserts that), hence the ``atpo_`` prefix.
    """

    def atpo_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        loaded = self.get_model().load_weights(weights)
        return len(loaded) if loaded is not None else len(weights)


class VLLMEngine:
    """Engine over ``vllm.LLM``. ``engine_kwargs`` go to ``LLM`` unchanged (e.g. ``enforce_eager``,
    ``distributed_executor_backend="external_launcher"`` for torchrun SPMD)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        enable_sleep_mode: bool = True,
        max_model_len: int | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        sleep_level: int = 1,
        weight_bucket_bytes: int = 1 << 30,
        **engine_kwargs,
    ):
        from transformers import AutoTokenizer

        vllm = _import_vllm()
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level} must be 1 (offload weights) or 2 (discard weights)")
        self.model_path = Path(model_path)
        hf_config = json.loads((self.model_path / "config.json").read_text())
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        vocab = int(hf_config.get("vocab_size", len(self.tokenizer)))
        self._allowed_token_ids = list(range(len(self.tokenizer))) if vocab > len(self.tokenizer) else None
        self.sleep_enabled = enable_sleep_mode
        self.sleep_level = sleep_level
        self.weight_bucket_bytes = weight_bucket_bytes
        engine_kwargs.setdefault("worker_extension_cls", f"{__name__}.{AtpoWorkerExtension.__name__}")
        self.llm = vllm.LLM(
            model=str(self.model_path),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            enable_prefix_caching=True,
            max_model_len=max_model_len,
            dtype=_DTYPES.get(dtype, dtype) if dtype is not None else "auto",
            seed=seed,
            logprobs_mode="raw_logprobs",
            **engine_kwargs,
        )
        self._asleep: set[str] = set()  # vLLM tags currently asleep: "weights", "kv_cache"
        self._weights_stale = False  # level-2 sleep discarded them and nothing was loaded since

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep; call engine.wake() first")
        if not prompts:
            return []
        vllm = _import_vllm()
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        requests = [vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        if params.seed is None:
            sampling = self._sampling_params(params, None)
        else:
            sampling = [self._sampling_params(params, params.seed + i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [_to_completion(o) for o in outputs]

    def _sampling_params(self, params: SamplingParams, seed: int | None):
        vllm = _import_vllm()
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
            allowed_token_ids=self._allowed_token_ids,
        )

    # ---------------------------------------------------------------- weights and memory

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream ``(hf_name, full_tensor)`` pairs into every worker, ~``weight_bucket_bytes`` at a time."""
        if "weights" in self._asleep:
            # KV cache stays asleep: loading needs only the weights' memory (vLLM's documented RL order)
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        # Engine core in another process (vLLM's default): arguments travel by value through msgpack,
        # which needs CPU tensors. In-process (external_launcher) device tensors pass as they are.
        in_process = hasattr(self.llm.llm_engine, "model_executor")
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in weights:
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # vLLM skips it too, and errors unless embed_tokens is in the same call
            tensor = tensor.detach() if in_process else tensor.detach().cpu()
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.weight_bucket_bytes:
                self._send(bucket)
                bucket, size = [], 0
        if bucket:
            self._send(bucket)
        self._weights_stale = False
        if not self._asleep:
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("atpo_load_weights", args=(bucket,))

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
    return Completion(token_ids, logprobs, reason)
