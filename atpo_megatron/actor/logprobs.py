"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds ``logits[..., V/tp]``, the columns ``[rank*V/tp, (rank+1)*V/tp)`` of
the (padded) vocabulary. For ``x = logits / temperature``, in fp32:

    m      = max_v x_v                        all-reduce MAX over the TP group (a constant shift)
    Z      = sum_v exp(x_v - m)               all-reduce SUM   } one stacked all-reduce
    x_y    = x at the target y                all-reduce SUM   }  (only the owner rank adds it)
    S      = sum_v exp(x_v - m) * x_v         all-reduce SUM   }
    log p_y = x_y - (m + log Z)
    H       = (m + log Z) - S / Z             (= -sum_v p_v log p_v)

Columns ``>= vocab_size`` (megatron pads the vocabulary to a multiple of 128*tp) are excluded, as
if their logit were -inf: they always sit at the end of the vocabulary, so each rank simply slices
them off.

The gradient is written by hand (a ``torch.autograd.Function``): every TP rank computes the loss
replicated, so the gradient of its own shard is local, with no communication:
``d log p_y / d x_v = [v == y] - p_v`` and ``d H / d x_v = -p_v (log p_v + H)``, times
``1/temperature``. The backward recomputes the softmax chunk by chunk from the saved logits, so the
fp32 ``[tokens, V/tp]`` softmax is never held for the whole sequence (megatron's
``vocab_parallel_cross_entropy`` keeps it: 4 bytes per logit, and it also overwrites its input).

Entropy is a diagnostic (the ATPO loss has no entropy term): returned detached unless
``entropy_grad=True``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# fp32 elements of one working chunk [rows, V/tp]: 2**26 * 4 B = 256 MiB per temporary
DEFAULT_CHUNK_ELEMENTS = 2**26


def default_tp_group():
    """Megatron's tensor-parallel group when model parallelism is initialised, else None (no TP)."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_tensor_model_parallel_group()
    except ImportError:
        pass
    return None


def _group_size_rank(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _chunks(n_rows: int, v_local: int, chunk_rows: int | None):
    rows = chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // max(v_local, 1))
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, n_valid, temperature, chunk_rows, group, world):
        # logits [N, V_local] (any float dtype), targets [N] int64 global ids
        N = logits.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp)
        local_t = targets - vocab_start
        owned = (local_t >= 0) & (local_t < n_valid)
        local_t = torch.where(owned, local_t, torch.zeros_like(local_t))
        for c in _chunks(N, n_valid, chunk_rows):
            x = logits[c, :n_valid].float()
            if temperature != 1.0:
                x = x / temperature
            if n_valid > 0:
                m = x.max(dim=-1).values
            else:  # this rank holds only vocabulary padding
                m = torch.full((x.shape[0],), -torch.inf, dtype=torch.float32, device=x.device)
            if world > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            e = torch.exp(x - m[:, None])
            if n_valid > 0:
                x_t = x.gather(1, local_t[c, None]).squeeze(1) * owned[c]
            else:
                x_t = torch.zeros_like(m)
            sums = torch.stack([e.sum(dim=-1), x_t, (e * x).sum(dim=-1)])  # [3, rows]
            if world > 1:
                dist.all_reduce(sums, group=group)
            Z, x_y, S = sums
            lse[c] = m + torch.log(Z)
            logp[c] = x_y - lse[c]
            ent[c] = lse[c] - S / Z
        ctx.save_for_backward(logits, local_t, owned, lse, ent)
        ctx.args = (n_valid, temperature, chunk_rows)
        ctx.set_materialize_grads(False)  # an unused output (e.g. the entropy) gives None, not zeros
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local_t, owned, lse, ent = ctx.saved_tensors
        n_valid, temperature, chunk_rows = ctx.args
        grad = torch.zeros_like(logits)
        if n_valid == 0:
            return grad, None, None, None, None, None, None, None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_owned = g_logp * owned
        for c in _chunks(logits.shape[0], n_valid, chunk_rows):
            x = logits[c, :n_valid].float()
            if temperature != 1.0:
                x = x / temperature
            logp_v = x - lse[c, None]  # log p_v, [rows, n_valid]
            p = torch.exp(logp_v)
            g = -p * g_logp[c, None]  # d log p_y / d x_v = [v == y] - p_v
            g.scatter_add_(1, local_t[c, None], g_owned[c, None])
            if g_ent is not None:  # d H / d x_v = -p_v (log p_v + H)
                g -= g_ent[c, None].float() * p * (logp_v + ent[c, None])
            if temperature != 1.0:
                g /= temperature
            grad[c, :n_valid] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    entropy_grad: bool = False,
    chunk_rows: int | None = None,
    tp_group=None,
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``targets`` and entropy of the softmax, per token, in fp32.

    ``logits``: ``[..., V/tp]``, this rank's vocabulary shard (e.g. GPTModel's ``[b, s, V/tp]``).
    ``targets``: ``[...]`` int64 global token ids, each ``< vocab_size``.
    ``vocab_size``: the real vocabulary; columns at or beyond it are padding and excluded
    (default: no padding, ``V/tp * tp``).
    ``temperature``: the logits are divided by it first (use the rollout's sampling temperature,
    so that ``log p`` matches the sampler's).
    ``entropy_grad``: keep the entropy in the autograd graph (default: detached, a diagnostic).
    ``chunk_rows``: tokens per fp32 working chunk (default: about 2**26 logits per chunk).
    ``tp_group``: the tensor-parallel group (default: megatron's, or none when not initialised).
    Returns ``(logp, entropy)``, both ``[...]`` fp32; gradients flow into ``logits`` only.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the sampling temperature), got {temperature}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    group = default_tp_group() if tp_group is None else tp_group
    world, rank = _group_size_rank(group)
    v_local = logits.shape[-1]
    padded = v_local * world
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {padded}] (= V/tp * tp of these logits)")
    if bool(((targets < 0) | (targets >= vocab_size)).any()):  # one host sync per call
        raise ValueError(
            f"targets must be token ids in [0, {vocab_size}); got min {int(targets.min())}, "
            f"max {int(targets.max())}: check the tokenizer / pad id against the model's vocabulary"
        )
    vocab_start = rank * v_local
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    lead = targets.shape
    logp, ent = _VocabParallelLogProbEntropy.apply(
        logits.reshape(-1, v_local),
        targets.reshape(-1).long(),
        vocab_start,
        n_valid,
        float(temperature),
        chunk_rows,
        group,
        world,
    )
    if not entropy_grad:
        ent = ent.detach()
    return logp.view(lead), ent.view(lead)


def gathered_log_softmax(logits: Tensor, *, vocab_size: int | None = None, tp_group=None) -> Tensor:
    """Reference for tests: all-gather the vocabulary shards and ``log_softmax`` in fp32 (no gradient)."""
    group = default_tp_group() if tp_group is None else tp_group
    world, _ = _group_size_rank(group)
    full = logits.detach().float()
    if world > 1:
        parts = [torch.empty_like(full) for _ in range(world)]
        dist.all_gather(parts, full.contiguous(), group=group)
        full = torch.cat(parts, dim=-1)
    if vocab_size is not None:
        full = full[..., :vocab_size]
    return torch.log_softmax(full, dim=-1)
