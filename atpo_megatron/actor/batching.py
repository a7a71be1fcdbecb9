"""Training sequences -> padded micro-batches, and token-balanced splits across data-parallel ranks.

Pure Python/torch: no process group, no megatron. ``train_step.py`` feeds what this builds to
megatron's pipeline schedule.

Layout of one sequence of P prompt and R response tokens (``full = prompt_ids + response_ids``)::

    position t   : 0      1      ...  P-1        P          ...  P+R-2
    tokens[t]    : full[0] full[1] ... full[P-1]  full[P]    ...  full[P+R-2]      (input, L = P+R-1)
    targets[t]   : full[1] full[2] ... full[P]    full[P+1]  ...  full[P+R-1]      (= tokens shifted)
    response j   :                     j = 0      j = 1      ...  j = R-1

The logit at position t predicts ``targets[t] = full[t+1]``, so response token j sits at position
``P - 1 + j`` and every per-response-token array (loss mask, advantages, old log-probs) is written
there. The last token is never an input: nothing learns from what follows it.

Rows are right-padded to the micro-batch's longest row. Megatron's attention is causal, so a real
token never attends to a pad token that comes after it; pad positions carry ``loss_mask = 0`` and
their outputs are never read. No attention-mask tensor is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MicroBatch:
    """One micro-batch: ``[b, s]`` tensors (b rows, s = longest row), right-padded.

    ``loss_mask`` / ``advantages`` / ``old_logprobs`` are aligned to the positions whose target is a
    response token (see the module docstring); they are 0 elsewhere. ``response_mask`` marks every
    response position, generated or not (tool output has ``loss_mask`` 0 but is still a response
    token whose log-prob ``compute_logprobs`` returns).
    """

    tokens: Tensor  # [b, s] int64 input ids, pad_id after each row's end
    position_ids: Tensor  # [b, s] int64, 0..s-1 (pads continue counting; never read)
    targets: Tensor  # [b, s] int64 next token, pad_id where none
    loss_mask: Tensor  # [b, s] float32 0/1
    advantages: Tensor  # [b, s] float32
    old_logprobs: Tensor  # [b, s] float32
    response_mask: Tensor  # [b, s] bool
    indices: list[int]  # row r is sequence indices[r] of the list given to make_micro_batches
    lengths: list[int]  # real input length of each row (P + R - 1)
    prompt_lens: list[int]  # P of each row (response token j of row r is at position P - 1 + j)

    @property
    def num_rows(self) -> int:
        """Rows of the tensors: ``len(indices)``, or 1 for an empty filler micro-batch."""
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def response_values(self, per_position: Tensor, row: int) -> Tensor:
        """Slice a ``[b, s]`` per-position tensor back to row ``row``'s R response tokens ``[R]``."""
        start = self.prompt_lens[row] - 1
        n = self.lengths[row] - start
        return per_position[row, start : start + n]

    def to(self, device: torch.device | str) -> MicroBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()
        }
        return MicroBatch(**moved)


def input_length(seq) -> int:
    """Length of a sequence's model input, P + R - 1 (the last token is only a target)."""
    return len(seq.prompt_ids) + len(seq.response_ids) - 1


def _check_sequence(i: int, seq) -> None:
    if len(seq.prompt_ids) < 1:
        raise ValueError(
            f"sequence {i} has an empty prompt: the first response token needs a prompt token whose "
            "logit predicts it; give every sequence at least one prompt token (e.g. BOS)"
        )
    R = len(seq.response_ids)
    for name in ("loss_mask", "advantages", "old_logprobs"):
        v = getattr(seq, name, None)
        if v is not None and len(v) != R:
            raise ValueError(
                f"sequence {i}: {name} has {len(v)} entries but response_ids has {R}; "
                "every per-response-token list must have one entry per response token"
            )


def pack_micro_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    order: str = "keep",
    multiple_of: int = 1,
) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``max_tokens`` *padded* tokens each.

    The cost of a micro-batch is ``rows * longest_row`` (what the padded ``[b, s]`` tensors hold).
    ``order="keep"`` fills micro-batches greedily in the given order; ``order="length"`` first sorts
    by length, longest first (ties by index), which wastes the least padding. Either is
    deterministic. Within a micro-batch, indices are ascending. A sequence longer than
    ``max_tokens`` gets a micro-batch of its own (it cannot be split: its token-mean needs all of it).

    ``multiple_of`` > 1 splits the largest micro-batches until the count is a multiple of it (the
    interleaved pipeline schedule needs a multiple of the pipeline size). When there are fewer
    sequences than that, the result is padded with empty micro-batches ``[]``; ``build_micro_batch``
    turns those into a single all-pad row with no loss.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (the micro-batch token budget), got {max_tokens}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    if order == "keep":
        ordered = list(range(len(lengths)))
    elif order == "length":
        ordered = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    else:
        raise ValueError(f"order must be 'keep' or 'length', got {order!r}")

    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in ordered:
        n = lengths[i]
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)

    def cost(g: list[int]) -> int:
        return len(g) * max((lengths[i] for i in g), default=0)

    while len(groups) % multiple_of:
        splittable = [k for k, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            groups.append([])
            continue
        k = max(splittable, key=lambda k: (cost(groups[k]), -k))
        g = groups[k]
        # halve by position in the group; with order="length" both halves stay length-sorted
        groups[k : k + 1] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return [sorted(g) for g in groups]


def build_micro_batch(sequences: Sequence, indices: Sequence[int], *, pad_id: int = 0) -> MicroBatch:
    """Pad ``sequences[i] for i in indices`` into one :class:`MicroBatch` (see the module docstring).

    A sequence needs ``prompt_ids`` and ``response_ids``; ``loss_mask`` / ``advantages`` /
    ``old_logprobs`` are optional (missing: mask 1 on every response token, advantages and old
    log-probs 0, as a forward-only log-prob pass needs nothing else). ``indices == []`` gives one
    row of a single pad token with no loss (a filler for the pipeline schedule).
    """
    rows = [sequences[i] for i in indices]
    for i, seq in zip(indices, rows):
        _check_sequence(i, seq)
    lengths = [input_length(s) for s in rows]
    b, s = max(len(rows), 1), max(max(lengths, default=1), 1)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    targets = torch.full((b, s), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, s), dtype=torch.float32)
    advantages = torch.zeros((b, s), dtype=torch.float32)
    old_logprobs = torch.zeros((b, s), dtype=torch.float32)
    response_mask = torch.zeros((b, s), dtype=torch.bool)
    prompt_lens = []
    for r, seq in enumerate(rows):
        full = torch.as_tensor(list(seq.prompt_ids) + list(seq.response_ids), dtype=torch.long)
        P, R, L = len(seq.prompt_ids), len(seq.response_ids), lengths[r]
        prompt_lens.append(P)
        tokens[r, :L] = full[:-1]
        targets[r, :L] = full[1:]
        resp = slice(P - 1, P - 1 + R)
        response_mask[r, resp] = True
        mask = getattr(seq, "loss_mask", None)
        loss_mask[r, resp] = 1.0 if mask is None else torch.as_tensor(mask, dtype=torch.float32)
        adv = getattr(seq, "advantages", None)
        if adv is not None:
            advantages[r, resp] = torch.as_tensor(adv, dtype=torch.float32)
        old = getattr(seq, "old_logprobs", None)
        if old is not None:
            old_logprobs[r, resp] = torch.as_tensor(old, dtype=torch.float32)
    position_ids = torch.arange(s, dtype=torch.long).expand(b, s).contiguous()
    return MicroBatch(
        tokens=tokens,
        position_ids=position_ids,
        targets=targets,
        loss_mask=loss_mask,
        advantages=advantages,
        old_logprobs=old_logprobs,
        response_mask=response_mask,
        indices=list(indices),
        lengths=lengths,
        prompt_lens=prompt_lens,
    )


def make_micro_batches(
    sequences: Sequence,
    max_tokens: int,
    *,
    order: str = "keep",
    multiple_of: int = 1,
    pad_id: int = 0,
) -> list[MicroBatch]:
    """Dynamic batching: :func:`pack_micro_batches` by input length, then :func:`build_micro_batch`."""
    for i, seq in enumerate(sequences):
        _check_sequence(i, seq)
    groups = pack_micro_batches(
        [input_length(s) for s in sequences], max_tokens, order=order, multiple_of=multiple_of
    )
    return [build_micro_batch(sequences, g, pad_id=pad_id) for g in groups]


def partition_balanced(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Split indices into ``parts`` groups of near-equal total length (greedy LPT, deterministic).

    Longest first (ties by index), each to the group with the fewest tokens so far (ties: the lower
    group). Each group's indices are returned ascending, so the original order survives within a
    rank. Used to split a mini-batch across data-parallel ranks; a group may be empty when there
    are fewer sequences than ranks.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    load = [0] * parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = min(range(parts), key=lambda k: (load[k], k))
        groups[k].append(i)
        load[k] += lengths[i]
    return [sorted(g) for g in groups]
