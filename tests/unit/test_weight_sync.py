"""Bucketed weight streaming: every tensor arrives once, in order, in buckets of the asked size."""

import pytest
import torch

from atpo_megatron.weights.sync import buckets, sync_weights


class RecordingEngine:
    """Implements the part of the Engine interface that sync uses, recording what it receives."""

    def __init__(self):
        self.loads: list[list[str]] = []
        self.state: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        weights = list(weights)
        self.loads.append([name for name, _ in weights])
        self.state.update(weights)


def _weights(n=5, numel=256):  # 1 KiB fp32 tensors
    return [(f"w{i}", torch.full((numel,), float(i))) for i in range(n)]


def test_buckets_hold_at_least_the_budget_and_never_split_a_tensor():
    groups = list(buckets(_weights(), bucket_bytes=2048))
    assert [[n for n, _ in g] for g in groups] == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    groups = list(buckets(_weights(), bucket_bytes=1))
    assert len(groups) == 5


def test_sync_delivers_every_tensor_once_with_stats():
    engine = RecordingEngine()
    stats = sync_weights(iter(_weights()), engine, bucket_bytes=3000)
    assert engine.loads == [["w0", "w1", "w2"], ["w3", "w4"]]
    assert all(torch.equal(engine.state[f"w{i}"], torch.full((256,), float(i))) for i in range(5))
    assert (stats.tensors, stats.bytes, stats.buckets) == (5, 5 * 1024, 2)
    assert stats.metrics()["weight_sync/gb"] == pytest.approx(5 * 1024 / 1e9)


def test_ranks_without_engine_still_drain_the_collective_exporter():
    consumed = []

    def exporter():
        for name, t in _weights():
            consumed.append(name)
            yield name, t

    stats = sync_weights(exporter(), None, bucket_bytes=1024)
    assert consumed == [f"w{i}" for i in range(5)] and stats.tensors == 0


def test_bad_bucket_size():
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        list(buckets(_weights(), 0))
