"""Weight sync: stream the actor's weights, in the engine's (Hugging Face) names and layout, into the
rollout engine.

The exporter (``weights.hf_bridge.export_hf_weights``) is a collective generator: every rank of the
actor must iterate it to the end, because each tensor is gathered across TP shards and PP stages one
layer at a time, and every rank receives every full tensor (``rollout/placement.py``). Each rank that
holds an engine hands the stream to ``engine.load_weights``, which groups it into transfers of
``rollout.sync_bucket_mb`` itself, so at most one bucket is ever held on top of the actor's shards.
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
    verified: bool = False

    def metrics(self) -> dict[str, float]:
        gb = self.bytes / 1e9
        return {
            "weight_sync/seconds": self.seconds,
            "weight_sync/gb": gb,
            "weight_sync/gb_per_s": gb / self.seconds if self.seconds > 0 else 0.0,
            "weight_sync/buckets": float(self.buckets),
            "weight_sync/verified": float(self.verified),
        }


def sync_weights(weights: Iterable[tuple[str, torch.Tensor]], engine: Engine | None, verify: bool = False) -> SyncStats:
    """Consume the exporter on every rank; load it into ``engine`` where there is one.

    ``verify``: the engine checks every tensor's fingerprint on arrival (``WeightSyncError`` names a
    corrupted one).
    """
    stats = SyncStats(verified=verify and engine is not None)
    start = time.perf_counter()
    if engine is None:  # still take part in the exporter's collectives
        for _ in weights:
            pass
    else:
        stats.buckets = engine.load_weights(_counted(weights, stats), verify=verify)
    stats.seconds = time.perf_counter() - start
    return stats


def _counted(weights: Iterable[tuple[str, torch.Tensor]], stats: SyncStats) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        stats.tensors += 1
        stats.bytes += tensor.numel() * tensor.element_size()
        yield name, tensor
