"""Weight sync: stream the actor's weights, in the engine's (Hugging Face) names and layout, into the
rollout engine in buckets.

The exporter (``weights.hf_bridge.export_hf_weights``) is a collective generator: every rank of the
actor must iterate it to the end, because each tensor is gathered across TP shards and PP stages
one layer at a time. Only ranks that own an engine keep the tensors; they hand them to
``engine.load_weights`` whenever a bucket reaches ``bucket_bytes``, so at most one bucket (plus the
tensor that overflowed it) is ever held on top of the actor's own shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from atpo_megatron.rollout.engine import Engine


@dataclass
class SyncStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        gb = self.bytes / 1e9
        return {
            "weight_sync/seconds": self.seconds,
            "weight_sync/gb": gb,
            "weight_sync/gb_per_s": gb / self.seconds if self.seconds > 0 else 0.0,
            "weight_sync/buckets": float(self.buckets),
        }


def buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs into lists of about ``bucket_bytes`` (a tensor is never split)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def sync_weights(weights: Iterable[tuple[str, torch.Tensor]], engine: Engine | None, bucket_bytes: int) -> SyncStats:
    """Consume the exporter on every rank; load bucket by bucket into ``engine`` where there is one."""
    stats = SyncStats()
    start = time.perf_counter()
    if engine is None:  # still take part in the exporter's collectives
        for _ in weights:
            pass
    else:
        for bucket in buckets(weights, bucket_bytes):
            engine.load_weights(bucket)
            stats.buckets += 1
            stats.tensors += len(bucket)
            stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
    stats.seconds = time.perf_counter() - start
    return stats
