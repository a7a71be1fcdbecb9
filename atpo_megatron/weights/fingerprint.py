"""Exact fingerprints of tensors, to prove a weight transfer delivered what the actor sent.

A fingerprint is two 64-bit integers over the tensor's bytes read as 32-bit words ``w_i`` (bytes when
the size is not a multiple of 4): ``(sum_i w_i, sum_i i * w_i) mod 2**64`` for ``i = 1..n``. Integer
sums do not depend on the order of reduction, so the sender and the receiver get bit-identical
results on any device and thread count; the position-weighted sum also catches reordered or shifted
bytes, which a plain sum misses. It runs on the tensor's own device, in chunks (bounded memory).

Motivation: silent corruption in transfer (verl #6813, bytes of another buffer over
``embed_tokens``; #7139, a bucket overwritten while it was being read) trains on garbage for steps
before anyone notices. ``rollout.verify_weights_every`` turns the check on.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from atpo_megatron.config import UserError

Fingerprint = tuple[int, int]
_CHUNK_WORDS = 1 << 24


class WeightSyncError(UserError):
    """The rollout engine did not receive (or could not load) the actor's weights as sent; the run
    stops with one line naming the tensor (the CLI prints it without a traceback)."""


def fingerprint(tensor: torch.Tensor) -> Fingerprint:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if data.numel() % 4 == 0:
        if data.storage_offset() % 4:
            data = data.clone()  # an int32 view needs 4-byte alignment
        data = data.view(torch.int32)
    total = weighted = 0
    for start in range(0, data.numel(), _CHUNK_WORDS):
        words = data[start:start + _CHUNK_WORDS].to(torch.int64)
        index = torch.arange(start + 1, start + 1 + words.numel(), dtype=torch.int64, device=words.device)
        total += int(words.sum())
        weighted += int((words * index).sum())
    return total % (1 << 64), weighted % (1 << 64)


def check_fingerprints(sent: Iterable[tuple[str, Fingerprint]], received: Iterable[tuple[str, int, int]],
                       where: str) -> None:
    """Raise :class:`WeightSyncError` naming the first tensor whose received fingerprint differs."""
    got = {name: (a % (1 << 64), b % (1 << 64)) for name, a, b in received}
    for name, expected in sent:
        if name not in got:
            raise WeightSyncError(f"weight sync: {where} never received {name}")
        if got[name] != expected:
            raise WeightSyncError(
                f"weight sync: {name} arrived corrupted in {where} (fingerprint {got[name]} != the actor's "
                f"{expected}); the run stops before sampling with damaged weights"
            )
