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

Prefix cache (``prefix_cache_mb`` > 0, dynamic cache only): the KV of every context the engine has
finished is kept, keyed by its token ids, until the weights change (``load_weights``) or the engine
sleeps. A later prompt reuses the KV of its longest common prefix with any kept context (vLLM's
automatic prefix caching, without blocks) and prefills only the rest; the prompts of one call that
share a long common prefix (the system prompt) have it prefilled once. The agent loop re-sends
every branch's whole context each turn, and a tree's branches share their trunk, so this skips most
of the prefill: the contexts are hundreds of tokens, a turn adds tens. Rows keep their cached KV
right-aligned and their new tokens left-padded after it; position ids count real tokens only.

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
        prefix_cache_mb: int = 0,
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
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 and not static_cache else None
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
        reused = self._reused_prefixes(prompts)  # per row: (cached tokens c_i, its KV or None)
        C = max(c for c, _ in reused)
        N = max(len(p) - c for p, (c, _) in zip(prompts, reused))
        ids = torch.full((B, N), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((B, N), dtype=torch.long)
        # mask covers [cached KV | new tokens | every future token]; column C+N+t is the t-th generated token.
        # A row's cached KV ends at column C, its new tokens end at column C+N (pads in between count 0).
        mask = torch.zeros((B, C + N + T), dtype=torch.long)
        for i, (p, (c, _)) in enumerate(zip(prompts, reused)):
            n = len(p) - c
            ids[i, N - n:] = torch.tensor(p[c:])
            pos[i, N - n:] = torch.arange(c, len(p))  # pads get 0; masked out anyway
            mask[i, C - c:C] = 1
            mask[i, C + N - n:] = 1
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        if self.static_cache:
            cache = StaticCache(config=self.model.config, max_cache_len=N + T)
        elif C > 0:
            cache = DynamicCache(_stack_rows([kv for _, kv in reused], [c for c, _ in reused], C), config=self.model.config)
        else:
            cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask if self.static_cache else mask[:, :C + N], pos, cache)
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
                elif self.prefix_cache is not None:  # the cache holds its context and tokens[:-1]
                    self.prefix_cache.add(prompts[r] + tokens[r][:-1], _row_kv(cache, j, mask[j, :C + N + t]))
            if not keep:
                break
            if not self.static_cache and len(keep) < len(live):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, next_pos, tok = mask[idx], next_pos[idx], tok[idx]
                live = [live[j] for j in keep]
            step_mask = mask if self.static_cache else mask[:, : C + N + t + 1]
            logits = self._forward(tok[:, None], step_mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return [Completion(tokens[r], logps[r], finish[r] or "length") for r in range(B)]

    def _reused_prefixes(self, prompts: list[list[int]]) -> list[tuple[int, torch.Tensor | None]]:
        """Per prompt, the longest kept prefix (at most all but its last token) and its KV.

        Prompts that share a longer common prefix than the cache holds get it prefilled once, first.
        """
        if self.prefix_cache is None:
            return [(0, None)] * len(prompts)
        if len(prompts) > 1:
            common = _common_prefix(prompts, max_len=min(len(p) for p in prompts) - 1)
            if len(common) >= PrefixCache.MIN_SHARED and self.prefix_cache.match(common)[0] < len(common):
                self._prefill_into_cache(common)
        return [self.prefix_cache.match(p, max_len=len(p) - 1) for p in prompts]

    def _prefill_into_cache(self, ids: list[int]) -> None:
        from transformers import DynamicCache

        cached, kv = self.prefix_cache.match(ids)
        cache = DynamicCache(_stack_rows([kv], [cached], cached), config=self.model.config) if cached else \
            DynamicCache(config=self.model.config)
        x = torch.tensor([ids[cached:]], device=self.device)
        mask = torch.ones((1, len(ids)), dtype=torch.long, device=self.device)
        self._forward(x, mask, torch.arange(cached, len(ids), device=self.device)[None], cache)
        self.prefix_cache.add(ids, _row_kv(cache, 0, mask[0]))

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
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # KV of the old weights
        return 1

    def sleep(self) -> None:
        """On GPU: move the weights to CPU and free the cached GPU memory. On CPU: nothing to do
        (the KV cache never outlives a generate call), so only the asleep flag is set."""
        if self._asleep:
            return
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
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


class PrefixCache:
    """KV of token sequences, looked up by longest common prefix; least recently used evicted first.

    One entry is a tensor ``[layers, 2, kv_heads, tokens, head_dim]`` (keys and values of every
    layer). An entry that is a prefix of a newly added one is dropped (the new one covers it).
    """

    MIN_SHARED = 32
    """Prompts of a call sharing at least this many tokens have them prefilled once."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: dict[tuple[int, ...], torch.Tensor] = {}  # insertion order = recency
        self.bytes = 0

    def match(self, ids: list[int], max_len: int | None = None) -> tuple[int, torch.Tensor | None]:
        """(n, KV of the first n tokens) of the entry sharing the longest prefix with ``ids``, n <= max_len."""
        limit = len(ids) if max_len is None else min(max_len, len(ids))
        query = torch.tensor(ids[:limit])
        best, best_key = 0, None
        for key in self.entries:
            k = min(len(key), limit)
            if k <= best:
                continue
            same = torch.tensor(key[:k]) == query[:k]
            n = k if bool(same.all()) else int(same.int().argmin())
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        kv = self.entries.pop(best_key)
        self.entries[best_key] = kv  # most recently used
        return best, kv[:, :, :, :best]

    def add(self, ids: list[int], kv: torch.Tensor) -> None:
        key = tuple(ids)
        if not key or kv.shape[3] != len(key):
            return
        for old in [k for k in self.entries if len(k) <= len(key) and key[:len(k)] == k]:
            self.bytes -= _nbytes(self.entries.pop(old))
        self.entries[key] = kv
        self.bytes += _nbytes(kv)
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            self.bytes -= _nbytes(self.entries.pop(next(iter(self.entries))))

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _common_prefix(seqs: list[list[int]], max_len: int) -> list[int]:
    first = seqs[0][:max_len]
    n = len(first)
    for s in seqs[1:]:
        n = min(n, len(s))
        for j in range(n):
            if s[j] != first[j]:
                n = j
                break
    return first[:n]


def _row_kv(cache, row: int, mask_row: torch.Tensor) -> torch.Tensor:
    """One row's KV at its real (mask 1) columns, as a prefix-cache entry ``[layers, 2, heads, n, dim]``."""
    cols = mask_row.bool().nonzero().squeeze(1)
    return torch.stack([torch.stack([layer.keys[row][:, cols], layer.values[row][:, cols]])
                        for layer in cache.layers])


def _stack_rows(kvs: list[torch.Tensor | None], lengths: list[int], width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) ``[rows, heads, width, dim]``: each row's KV right-aligned, zeros before it."""
    ref = next(kv for kv in kvs if kv is not None)
    n_layers, _, heads, _, dim = ref.shape
    out = torch.zeros((n_layers, 2, len(kvs), heads, width, dim), dtype=ref.dtype, device=ref.device)
    for i, (kv, c) in enumerate(zip(kvs, lengths)):
        if c:
            out[:, :, i, :, width - c:] = kv
    return [(out[layer, 0], out[layer, 1]) for layer in range(n_layers)]


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
