"""The actor's two passes over training sequences, through megatron's pipeline schedules.

    old = compute_logprobs(models, seqs, max_tokens=32768)        # forward only, every rank gets all
    for mini in mini_batches:                                       # e.g. 8 prompts x 22 leaves
        metrics = train_step(models, optimizer, mini, loss_name="atpo", clip_kwargs=cfg.loss.clip_kwargs())
        scheduler.step(1)

``models`` are the DDP-wrapped chunks from ``optimizer.wrap_ddp`` (one per virtual pipeline stage);
``sequences`` are objects with ``prompt_ids``, ``response_ids`` and, for training, ``loss_mask``,
``advantages`` and ``old_logprobs`` per response token (``algo.tree.LeafSequence``).

**Who holds what.** By default (``shard=True``) every rank is given the same full list; it is split
across DP ranks by tokens (``batching.partition_balanced``, deterministic, so every rank knows every
rank's share), and each DP rank cuts its share into micro-batches under the ``max_tokens`` budget
(``batching.pack_micro_batches``). TP and PP ranks of one DP replica see the same micro-batches.
With ``shard=False`` each DP rank passes only its own share (still identical across its TP/PP ranks).

**Exact seq-mean-token-mean.** The mini-batch loss is ``L = (1/N) sum_i mean_{t in y_i} l_{i,t}``,
N = the number of sequences (with at least one loss token) in the whole mini-batch, over all DP
ranks. Megatron's schedule, reading ``schedules.forward_step_calc_loss`` and
``finalize_model_grads`` of megatron-core 0.19.2:

* our loss function returns the triple ``(numerator, count, metrics)``, where ``numerator = sum over
  the micro-batch's sequences of their token-mean loss`` and ``count`` = how many such sequences;
* ``optimizer.wrap_ddp`` sets ``config.calculate_per_token_loss=True``. With it the schedule does
  *not* divide the loss by ``count`` nor by ``num_microbatches`` (the 2-tuple form always divides by
  ``num_microbatches``, which would weight a sequence by 1/M of its own rank's micro-batches), it
  adds ``count`` into ``total_num_tokens``; DDP's gradient scaling factor is 1 (a *sum* over DP,
  not the default mean);
* after the last micro-batch ``finalize_model_grads`` all-reduces the gradient buckets over DP
  (sum), broadcasts ``total_num_tokens`` from the last pipeline stage, all-reduces it over DP, and
  multiplies every gradient by ``1 / total``.

So the gradient is ``(1/N) * sum over ranks, micro-batches and sequences of grad(token-mean_i)`` =
``grad L`` whatever the micro-batch split, DP size or PP size, as long as a sequence is never split
(it is not). GRPO's token-mean is the same with ``numerator = token sum`` and ``count = tokens``.
A sequence with ``A = 0`` on every loss token (every leaf of a tree whose leaves all got one reward)
adds 0 to the numerator and to the gradient: ``train_step`` does not run it and adds its count to
the first micro-batch's (of DP rank 0 with ``shard=True``), so ``N`` and the gradient are unchanged.
``count`` is megatron's "number of tokens" slot used as a generic denominator.

**Non-finite values.** Input data with NaN/inf where ``loss_mask`` is 1, or a mask not 0/1, is
refused before any computation (on every rank: the decision is all-reduced, so no rank is left
waiting in a collective). A non-finite log-prob or gradient norm during the step (a diverged model)
raises :class:`NonFiniteError` on every rank *before* ``optimizer.step()``: gradients are zeroed and
the weights and optimizer state are untouched, so the caller may skip the batch or stop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config

from atpo_megatron.actor.batching import (
    MicroBatch,
    build_micro_batch,
    input_length,
    pack_micro_batches,
    partition_balanced,
)
from atpo_megatron.actor.logprobs import vocab_parallel_logprobs_entropy
from atpo_megatron import distributed
from atpo_megatron.algo.losses import LOSS_AGGREGATION, TOKEN_LOSSES, policy_loss, sequence_count, trains_nothing


class NonFiniteError(FloatingPointError):
    """The step produced a NaN/inf loss or gradient; no parameter or optimizer state was changed."""


# ---------------------------------------------------------------------------------------------
# Work split: which sequences this rank runs, in which micro-batches


def _dp() -> tuple[int, int]:
    return parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()


def _pipeline_multiple(models: Sequence[torch.nn.Module]) -> int:
    # The interleaved schedule needs the micro-batch count to be a multiple of the pipeline size
    # (its groups of PP contiguous micro-batches per virtual stage); 1F1B and no-PP take any count.
    return parallel_state.get_pipeline_model_parallel_world_size() if _interleaved(models) else 1


def dp_shares(sequences: Sequence, dp_size: int) -> list[list[int]]:
    """The indices each DP rank runs when every rank holds the full list (``shard=True``)."""
    return partition_balanced([input_length(s) for s in sequences], dp_size)


def _local_micro_batches(
    models, sequences: Sequence, max_tokens: int, shard: bool, order: str, pad_id: int
) -> tuple[list[int], list[MicroBatch]]:
    dp_size, dp_rank = _dp()
    local = dp_shares(sequences, dp_size)[dp_rank] if shard else list(range(len(sequences)))
    multiple = _pipeline_multiple(models)
    groups = pack_micro_batches([input_length(sequences[i]) for i in local], max_tokens, order=order, multiple_of=multiple)
    # an idle DP rank (fewer sequences than ranks) still runs empty micro-batches through its pipeline
    groups = [[local[j] for j in g] for g in groups] or [[] for _ in range(multiple)]
    device = distributed.device()
    mbs = [build_micro_batch(sequences, g, pad_id=pad_id).to(device) for g in groups]
    return local, mbs


def _interleaved(models) -> bool:
    return len(models) > 1


def _is_float16(model: torch.nn.Module) -> bool:
    while not isinstance(model, Float16Module):
        if not hasattr(model, "module"):
            return False
        model = model.module
    return True


def _run_schedule(models, mbs: list[MicroBatch], loss_fn, forward_only: bool):
    config = get_model_config(models[0])
    # Micro-batches differ in [b, s]: the pipeline's p2p exchanges shapes first (unused at PP=1).
    config.variable_seq_lengths = True
    if _interleaved(models):
        # The interleaved schedule sends activations forward and gradients backward in one exchange.
        # Batched p2p (megatron's default) posts both sends to the same peer when PP=2 (prev = next),
        # and the receiver matches them in posting order: activations and gradients get swapped
        # (silently when shapes agree). Megatron-LM never batches with interleaving; neither do we:
        # per-direction ops, overlapped with compute, as its --overlap-p2p-communication default.
        config.batch_p2p_comm = False
        config.overlap_p2p_comm = True
    # bf16 models sit in a Float16Module, which would upcast the whole [b, s, V/tp] logits to fp32;
    # logprobs.py upcasts chunk by chunk instead.
    kwargs = {"fp32_output": False} if _is_float16(models[0]) else {}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb.tokens, mb.position_ids, None, **kwargs)  # causal attention; pads come last
        return output, partial(loss_fn, mb)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(mbs) for _ in models],  # one iterator per virtual stage, same order
        model=list(models),
        num_microbatches=len(mbs),
        seq_length=max(mb.seq_len for mb in mbs),
        micro_batch_size=max(mb.num_rows for mb in mbs),
        forward_only=forward_only,
    )


def _reduce_over_pipeline_and_dp(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the PP group (only the last stage holds non-zeros) and the DP group, in place."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(x, group=parallel_state.get_pipeline_model_parallel_group())
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(x, group=parallel_state.get_data_parallel_group())
    return x


# ---------------------------------------------------------------------------------------------
# Forward only: log-probs of the response tokens


def compute_logprobs(
    models: Sequence[torch.nn.Module],
    sequences: Sequence,
    *,
    max_tokens: int = 32768,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    with_raw: bool = False,
    shard: bool = True,
    order: str = "length",
    pad_id: int = 0,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], ...]:
    """Per-token log-prob (and entropy) of every sequence's response tokens, forward only.

    Returns one fp32 CPU tensor ``[R_i]`` per sequence, in input order; with ``with_entropy`` and/or
    ``with_raw`` a tuple ``(logprobs, [entropies], [raw])``, where ``raw`` are the log-probs at
    temperature 1 from the same logits (the rollout engines' convention, ``rollout/engine.py``: what
    the train-inference mismatch compares). Where the results are: with ``shard=True`` (every rank passed the full list)
    *every rank* gets every sequence's values (broadcast from the last pipeline stage, then
    all-gathered over DP); with ``shard=False`` every rank of the DP replica gets its own list's.
    ``temperature`` must be the rollout's sampling temperature so the values are comparable with the
    sampler's; ``vocab_size`` is the tokenizer's vocabulary (columns beyond it are padding).
    """
    models = list(models)
    local, mbs = _local_micro_batches(models, sequences, max_tokens, shard, order, pad_id)
    results: dict[int, torch.Tensor] = {}

    def loss_fn(mb: MicroBatch, logits: torch.Tensor):
        logp, ent = vocab_parallel_logprobs_entropy(logits, mb.targets, vocab_size=vocab_size, temperature=temperature)
        columns = [logp] + ([ent] if with_entropy else [])
        if with_raw:
            columns.append(logp if temperature == 1.0 else
                           vocab_parallel_logprobs_entropy(logits, mb.targets, vocab_size=vocab_size)[0])
        for r, i in enumerate(mb.indices):
            results[i] = torch.cat([mb.response_values(c, r) for c in columns])
        zero = logits.new_zeros((), dtype=torch.float32)
        return zero, torch.zeros((), dtype=torch.int, device=logits.device), {}

    with torch.no_grad():
        _run_schedule(models, mbs, loss_fn, forward_only=True)

    k = 1 + with_entropy + with_raw
    R = [len(s.response_ids) for s in sequences]
    device = distributed.device()

    def flat(indices: list[int]) -> torch.Tensor:
        n = k * sum(R[i] for i in indices)
        if not results:  # not the last pipeline stage: receive below
            return torch.zeros(n, dtype=torch.float32, device=device)
        return torch.cat([results[i] for i in indices] + [torch.zeros(0, device=device)]).float()

    mine = flat(local)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            mine,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    shares = [local]
    parts = [mine]
    dp_size, _ = _dp()
    if shard and dp_size > 1:
        shares = dp_shares(sequences, dp_size)
        sizes = [k * sum(R[i] for i in share) for share in shares]
        padded = torch.zeros(max(sizes), dtype=torch.float32, device=device)
        padded[: mine.numel()] = mine
        parts = [torch.empty_like(padded) for _ in shares]
        dist.all_gather(parts, padded, group=parallel_state.get_data_parallel_group())
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for share, part in zip(shares, parts):
        part, pos = part.cpu(), 0
        for i in share:
            out[i] = part[pos : pos + k * R[i]]
            pos += k * R[i]
    if shard:
        missing = [i for i, v in enumerate(out) if v is None]
        assert not missing, f"sequences {missing[:5]} were assigned to no DP rank"
    columns = tuple([v[c * R[i]:(c + 1) * R[i]].clone() if v is not None else None for i, v in enumerate(out)]
                    for c in range(k))
    return columns[0] if k == 1 else columns


# ---------------------------------------------------------------------------------------------
# One optimizer step

# Per-micro-batch sums that the step reduces over micro-batches, PP and DP, in this order.
_STAT_KEYS = (
    "numerator",  # sum of per-sequence token-mean losses (or token sum for token-mean losses)
    "count",  # loss denominator units: sequences with >= 1 loss token (or loss tokens)
    "loss_tokens",
    "loss_seqs",
    "input_tokens",
    "nonfinite",  # loss tokens whose log-prob is NaN/inf
    "clipfrac",  # token-weighted
    "clipfrac_lower",  # token-weighted (GRPO's dual clip)
    "log_ratio_abs",  # token-weighted
    "ppo_kl",  # token-weighted
    "entropy",  # token-weighted
    "h_turn",  # sequence-weighted
    "single_turn",
    "skipped",  # sequences with A = 0 on every loss token: counted, not run (see train_step)
)


def _micro_batch_stats(mb, logp, ent, numerator, count, metrics, skipped) -> torch.Tensor:
    m = mb.loss_mask
    n_tok = m.sum()
    n_seq = (m.sum(dim=1) > 0).sum().float()
    lower = metrics.get("actor/pg_clipfrac_lower", torch.zeros(()))
    vals = {
        "numerator": numerator.detach(),
        "count": count,
        "loss_tokens": n_tok,
        "loss_seqs": n_seq,
        "input_tokens": torch.tensor(float(sum(mb.lengths))),
        "nonfinite": (~torch.isfinite(logp) & (m > 0)).sum().float(),
        "clipfrac": metrics["actor/pg_clipfrac"] * n_tok,
        "clipfrac_lower": lower * n_tok,
        "log_ratio_abs": metrics["actor/log_ratio_abs_mean"] * n_tok,
        "ppo_kl": metrics["actor/ppo_kl"] * n_tok,
        "entropy": (torch.nan_to_num(ent) * m).sum(),
        "h_turn": metrics["actor/turn_kl_entropy"] * n_seq,
        "single_turn": metrics["actor/single_turn_count"],
        "skipped": skipped,
    }
    return torch.stack([torch.as_tensor(vals[k], dtype=torch.float32, device=m.device).reshape(()) for k in _STAT_KEYS])


def _validate_training_data(mbs: list[MicroBatch]) -> None:
    """Refuse NaN/inf advantages or old log-probs under the loss mask, or a mask not in {0, 1}, on all ranks."""
    bad = torch.zeros(3, dtype=torch.float32, device=distributed.device())
    for mb in mbs:
        on = mb.loss_mask > 0
        bad[0] += (~torch.isfinite(mb.advantages) & on).sum()
        bad[1] += (~torch.isfinite(mb.old_logprobs) & on).sum()
        bad[2] += ((mb.loss_mask != 0) & (mb.loss_mask != 1)).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    if bad.any():
        a, o, m = (int(v) for v in bad.tolist())
        raise ValueError(
            f"training data is not usable: {a} non-finite advantages and {o} non-finite old log-probs under "
            f"loss_mask=1, {m} loss_mask entries not 0/1 (counted over all ranks); fix the rollout/credit "
            "stage that produced them (old log-probs come from compute_logprobs, advantages from algo.credit)"
        )


def _zero_grads(models, optimizer) -> None:
    for m in models:
        m.zero_grad_buffer()
    optimizer.zero_grad()


def train_step(
    models: Sequence[torch.nn.Module],
    optimizer,
    sequences: Sequence,
    loss_name: str = "atpo",
    clip_kwargs: dict | None = None,
    *,
    max_tokens: int = 16384,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    shard: bool = True,
    order: str = "length",
    pad_id: int = 0,
) -> dict[str, float]:
    """One optimizer step on the mini-batch ``sequences`` (see the module docstring for who holds what).

    ``loss_name`` in ``algo.losses.TOKEN_LOSSES`` ("atpo", "gspo", "grpo"), ``clip_kwargs`` its clip
    arguments (``cfg.loss.clip_kwargs()``), ``max_tokens`` the padded-token budget of a micro-batch.
    Gradient clipping (global norm) is the optimizer config's ``clip_grad`` (1.0 by default).
    Returns metrics (identical on every rank), with mini-batch-wide means:
    ``actor/pg_loss`` (the aggregated loss), ``actor/grad_norm`` (before clipping),
    ``actor/pg_clipfrac``, ``actor/log_ratio_abs_mean`` (|turn/sequence/token log-ratio|),
    ``actor/ppo_kl``, ``actor/turn_kl_entropy`` (H_turn), ``actor/single_turn_count``,
    ``actor/entropy`` (mean over loss tokens), ``actor/loss_tokens``, ``actor/input_tokens``,
    ``actor/sequences``, ``actor/skipped_sequences`` (A = 0 on every loss token: counted in the loss's
    normaliser, not run; the token means above are over the sequences run), ``actor/micro_batches``
    (this rank's), and ``actor/pg_clipfrac_lower`` for GRPO.
    Raises :class:`NonFiniteError` (weights untouched) when the loss or the gradient is not finite.
    """
    if loss_name not in TOKEN_LOSSES:
        raise ValueError(f"unknown loss_name {loss_name!r}; choose one of {sorted(TOKEN_LOSSES)}")
    models = list(models)
    config = get_model_config(models[0])
    if not config.calculate_per_token_loss or config.finalize_model_grads_func is None:
        raise RuntimeError(
            "train_step needs models wrapped by atpo_megatron.actor.optimizer.wrap_ddp (it sets "
            "calculate_per_token_loss and finalize_model_grads_func, on which the exact aggregation relies)"
        )
    loss_of = partial(policy_loss, loss_name, **(clip_kwargs or {}))
    # Sequences with A = 0 on every loss token add nothing to the loss or its gradient, only to its count:
    # they are not run, and their count is carried by this rank's first micro-batch (by DP rank 0 when every
    # rank holds the full list), so finalize_model_grads still divides by the whole mini-batch's count.
    agg = LOSS_AGGREGATION[loss_name]
    idle = [trains_nothing(s.advantages, s.loss_mask) for s in sequences]
    carries = not shard or _dp()[1] == 0
    skipped = float(sum(any(s.loss_mask) for s, i in zip(sequences, idle) if i)) if carries else 0.0
    skipped_count = float(sum(sequence_count(s.loss_mask, agg) for s, i in zip(sequences, idle) if i)) if carries else 0.0
    trained = [s for s, i in zip(sequences, idle) if not i]
    _, mbs = _local_micro_batches(models, trained, max_tokens, shard, order, pad_id)
    _validate_training_data(mbs)
    stats: list[torch.Tensor] = []

    def loss_fn(mb: MicroBatch, logits: torch.Tensor):
        logp, ent = vocab_parallel_logprobs_entropy(logits, mb.targets, vocab_size=vocab_size, temperature=temperature)
        # A NaN log-prob must not raise here: only the last pipeline stage runs this, and the other
        # ranks would wait forever. Count it, feed 0 instead (no gradient), decide after the schedule.
        finite = torch.isfinite(logp)
        safe_logp = torch.where(finite, logp, torch.zeros_like(logp))
        numerator, count, metrics = loss_of(safe_logp, mb.old_logprobs, mb.advantages, mb.loss_mask)
        first = mb is mbs[0]
        count = count + skipped_count if first else count
        stats.append(_micro_batch_stats(mb, logp.detach(), ent, numerator, count, metrics, skipped if first else 0.0))
        # (loss, count, reported): with calculate_per_token_loss the schedule neither divides the loss
        # by count nor by the number of micro-batches; finalize_model_grads divides by the global count.
        return numerator, count.round().to(torch.int), {}

    _zero_grads(models, optimizer)
    _run_schedule(models, mbs, loss_fn, forward_only=False)

    totals = torch.stack(stats).sum(dim=0) if stats else torch.zeros(len(_STAT_KEYS), device=distributed.device())
    totals = _reduce_over_pipeline_and_dp(totals.float())
    t = dict(zip(_STAT_KEYS, totals.tolist()))

    if t["nonfinite"] > 0 or not math.isfinite(t["numerator"]):
        _zero_grads(models, optimizer)
        raise NonFiniteError(
            f"non-finite loss in this mini-batch ({int(t['nonfinite'])} NaN/inf log-probs, loss sum "
            f"{t['numerator']}); the optimizer step was skipped and the weights are unchanged. The model has "
            "diverged or received bad inputs: lower the lr, check the last checkpoint, or skip this batch"
        )
    # prepare_grads (copy model grads to the fp32 main grads) is idempotent without an fp16 loss
    # scaler, so checking the norm before step() (which prepares again) is safe.
    optimizer.prepare_grads()
    pre_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(pre_norm):
        _zero_grads(models, optimizer)
        raise NonFiniteError(
            f"gradient norm is {pre_norm} with a finite loss; the optimizer step was skipped and the weights "
            "are unchanged. Lower the lr or check the inputs of this mini-batch"
        )
    success, grad_norm, _ = optimizer.step()
    if not success:
        raise NonFiniteError("the optimizer reported an overflow (fp16 loss scaler); the step was skipped")

    tokens, seqs = max(t["loss_tokens"], 1.0), max(t["loss_seqs"], 1.0)
    metrics = {
        "actor/pg_loss": t["numerator"] / max(t["count"], 1.0),
        "actor/grad_norm": float(grad_norm) if grad_norm is not None else pre_norm,
        "actor/pg_clipfrac": t["clipfrac"] / tokens,
        "actor/log_ratio_abs_mean": t["log_ratio_abs"] / tokens,
        "actor/ppo_kl": t["ppo_kl"] / tokens,
        "actor/turn_kl_entropy": t["h_turn"] / seqs,
        "actor/single_turn_count": t["single_turn"],
        "actor/entropy": t["entropy"] / tokens,
        "actor/loss_tokens": t["loss_tokens"],
        "actor/input_tokens": t["input_tokens"],
        "actor/sequences": t["loss_seqs"] + t["skipped"],
        "actor/skipped_sequences": t["skipped"],
        "actor/micro_batches": float(len(mbs)),
    }
    if loss_name == "grpo":
        metrics["actor/pg_clipfrac_lower"] = t["clipfrac_lower"] / tokens
    return metrics
