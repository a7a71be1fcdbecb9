"""A rollout engine on plain transformers: our own batched decode loop with a KV cache.

Why not ``model.generate``: we need the log-prob of every sampled token computed from the *same*
logits the sampler used (re-scoring afterwards costs a second forward and can disagree in bf16), stop
strings that end exactly at the token completing them, and rows that leave the batch as they finish.

One ``generate`` call:
1. sort the prompts by length (longest first) and cut them into chunks of ``generation_batch_size``;
2. per chunk, left-pad (attention mask 0 on the padding, position ids counting real tokens only) and
   prefill, keeping only the last position's logits;
3. decode one token per step for every live row; a row finishes on an EOS id ("eos"), on the token that
   completes a stop string ("stop"), or at ``max_tokens`` ("length"). With the dynamic cache finished
   rows are dropped from the batch (and from the KV cache); with the static cache they stay in the
   batch (fixed shapes) but nothing is recorded for them any more.

Sampling (all in fp32): temperature 0 is argmax; otherwise logits / temperature, then top-k, then
top-p, then one draw per row from a ``torch.Generator`` seeded with ``params.seed``. The same seed,
prompts and params give the same completions; the draws depend on how the batch is laid out (sorting
and chunking are deterministic), so a prompt's sample can change when its batch-mates change.
Returned log-probs are the raw ``log_softmax(logits)`` of the sampled tokens (see engine.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from atpo_megatron.rollout.engine import Completion, SamplingParams
from atpo_megatron.weights.fingerprint import check_fingerprints, fingerprint


class HFEngine:
    """Engine over a ``transformers`` causal LM (Llama, Qwen2, ... anything with a KV cache).

    ``model`` is a Hugging Face folder or an already built ``PreTrainedModel`` (then pass its
    ``tokenizer``). ``device`` defaults to cuda when available; ``dtype`` to fp32 on CPU, bf16 on GPU.
    ``eos_token_ids`` defaults to the tokenizer's EOS plus every id in the model's generation config.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        generation_batch_size: int = 64,
        static_cache: bool = False,
        eos_token_ids: Iterable[int] | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        elif tokenizer is None:
            raise ValueError("HFEngine(model=<module>) needs tokenizer=...; pass a folder to load both")
        if generation_batch_size < 1:
            raise ValueError(f"generation_batch_size={generation_batch_size} must be >= 1")
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.generation_batch_size = generation_batch_size
        self.static_cache = static_cache
        self.eos_token_ids = set(eos_token_ids) if eos_token_ids is not None else _default_eos_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # A vocab padded past the tokenizer (Qwen) has rows no text maps to: never sample them
        # (the paper's allowed_token_ids fix, spec 2.2). Log-probs still use the full softmax.
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.sample_vocab = len(tokenizer) if len(tokenizer) < vocab else None
        self._asleep = False

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if self._asleep:
            raise RuntimeError("HFEngine.generate called while asleep; call engine.wake() first")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        gen = torch.Generator(device=self.device)
        if params.seed is None:
            gen.seed()
        else:
            gen.manual_seed(params.seed)
        # Longest first: chunks hold prompts of similar length (little padding), and the first chunk
        # is the most memory-hungry one, so an out-of-memory shows up at once.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for s in range(0, len(order), self.generation_batch_size):
            chunk = order[s : s + self.generation_batch_size]
            for i, c in zip(chunk, self._generate_batch([list(prompts[i]) for i in chunk], params, gen)):
                results[i] = c
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, gen) -> list[Completion]:
        from transformers import DynamicCache, StaticCache

        B, T, dev = len(prompts), params.max_tokens, self.device
        lens = torch.tensor([len(p) for p in prompts])
        L = int(lens.max())
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        # mask covers prompt + every future token; column L+t is the t-th generated token
        mask = torch.zeros((B, L + T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p) :] = torch.tensor(p)
            mask[i, L - len(p) :] = 1
        pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)  # pads get 0; masked out anyway
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        if self.static_cache:
            cache = StaticCache(config=self.model.config, max_cache_len=L + T)
        else:
            cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask if self.static_cache else mask[:, :L], pos, cache)
        next_pos = lens.to(dev)  # position id of the token about to be generated, per live row

        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        live = list(range(B))  # chunk rows still in the batch, in batch order
        stop_window = 4 * max((len(s) for s in params.stop), default=0) + 4
        for t in range(T):
            tok, lp = _sample(logits, params, gen, self.sample_vocab)
            tok_l, lp_l = tok.tolist(), lp.tolist()  # the one host sync per step
            keep = []
            for j, r in enumerate(live):
                if finish[r] is not None:  # static cache: a finished row rides along, unrecorded
                    continue
                tokens[r].append(tok_l[j])
                logps[r].append(lp_l[j])
                finish[r] = self._finish_reason(tokens[r], params, stop_window)
                if finish[r] is None:
                    keep.append(j)
            if not keep:
                break
            if not self.static_cache and len(keep) < len(live):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, next_pos, tok = mask[idx], next_pos[idx], tok[idx]
                live = [live[j] for j in keep]
            step_mask = mask if self.static_cache else mask[:, : L + t + 1]
            logits = self._forward(tok[:, None], step_mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return [Completion(tokens[r], logps[r], finish[r] or "length") for r in range(B)]

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        """Logits of the last position, [B, V]. One place to wrap (compile, CUDA graphs) later."""
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1]

    def _finish_reason(self, tokens: list[int], params: SamplingParams, stop_window: int) -> str | None:
        # Precedence: eos > stop > length (an EOS sampled as the last allowed token is still "eos").
        if tokens[-1] in self.eos_token_ids:
            return "eos"
        if params.stop and self._completes_stop(tokens, params.stop, stop_window):
            return "stop"
        if len(tokens) >= params.max_tokens:
            return "length"
        return None

    def _completes_stop(self, tokens: list[int], stops: tuple[str, ...], window: int) -> bool:
        """Does the last token complete a stop string in the generated text?

        Only the last ``window`` tokens are decoded (a stop of n characters spans at most 4n byte-level
        tokens). A match counts only if it ends in the characters the last token changed, so a stop
        string is reported at exactly the token that completes it, never later.
        """
        a = max(0, len(tokens) - window)
        text = self.tokenizer.decode(tokens[a:], skip_special_tokens=True)
        prev = self.tokenizer.decode(tokens[a:-1], skip_special_tokens=True)
        c = len(os.path.commonprefix([prev, text]))
        return any(text.find(s, max(0, c - len(s) + 1)) != -1 for s in stops)

    # ---------------------------------------------------------------- weights and memory

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], verify: bool = False) -> int:
        """Copy ``(hf_name, full_tensor)`` pairs into the model in place, one tensor at a time (one
        transfer). ``verify``: each parameter, read back, must equal the tensor cast to its dtype.

        A tied ``lm_head.weight`` writes the shared embedding. ``rotary_emb.inv_freq`` is ignored (a
        buffer derived from the config). Any other unknown name, or a shape mismatch, raises ValueError.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        for name, tensor in weights:
            p = params.get(name)
            if p is None and name == "lm_head.weight" and tied:
                p = self.model.get_input_embeddings().weight
            if p is None:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                some = ", ".join(list(params)[:3])
                raise ValueError(
                    f"load_weights: the model has no parameter {name!r}; names must be Hugging Face "
                    f"names of this architecture (e.g. {some}); convert Megatron names first"
                )
            if tuple(p.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(tensor.shape)} but the model expects "
                    f"{tuple(p.shape)}; send the full (unsharded) tensor in HF layout"
                )
            p.copy_(tensor)  # casts dtype and moves device
            if verify:
                check_fingerprints([(name, fingerprint(tensor.to(p.dtype)))], [(name, *fingerprint(p))],
                                   where="the hf engine")
        return 1

    def sleep(self) -> None:
        """On GPU: move the weights to CPU and free the cached GPU memory. On CPU: nothing to do
        (the KV cache never outlives a generate call), so only the asleep flag is set."""
        if self._asleep:
            return
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake(self) -> None:
        if not self._asleep:
            return
        if self.device.type == "cuda":
            self.model.to(self.device)
        self._asleep = False

    def close(self) -> None:
        """Drop the model (its memory goes back to the allocator)."""
        self.model = None


def _sample(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator, vocab_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from logits [B, V] (only ids < vocab_limit when given); return
    (tokens [B], raw log-probs [B]) in fp32."""
    logits = logits.float()
    allowed = logits[:, :vocab_limit] if vocab_limit else logits
    if params.temperature == 0:
        tok = allowed.argmax(-1)
    else:
        x = allowed / params.temperature
        if 0 < params.top_k < x.shape[-1]:
            kth = x.topk(params.top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if params.top_p < 1.0:
            # keep the smallest prefix (by descending probability) whose mass reaches top_p:
            # token i survives iff the mass strictly before it is < top_p (so the top token always does)
            xs, order = x.sort(dim=-1, descending=True)
            ps = xs.softmax(-1)
            drop = (ps.cumsum(-1) - ps) >= params.top_p
            x = x.scatter(-1, order, xs.masked_fill(drop, float("-inf")))
        tok = torch.multinomial(x.softmax(-1), 1, generator=gen).squeeze(1)
    lp = logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(1)
    return tok, lp


def _default_eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src is not None:
            ids.update(int(i) for i in src)
    if not ids:
        raise ValueError("no EOS token id in the tokenizer or generation config; pass eos_token_ids=[...]")
    return ids
