"""Weight streaming: buckets, the byte transport's layout, fingerprints, and the sync driver."""

import pytest
import torch

from atpo_megatron.rollout.vllm_weights import buckets, choose_transport, decode, encode
from atpo_megatron.weights.fingerprint import WeightSyncError, check_fingerprints, fingerprint
from atpo_megatron.weights.sync import sync_weights


class RecordingEngine:
    """The Engine interface's load_weights, bucketing like the vLLM engine and recording what it got."""

    def __init__(self, bucket_bytes):
        self.bucket_bytes = bucket_bytes
        self.loads: list[list[str]] = []
        self.state: dict[str, torch.Tensor] = {}

    def load_weights(self, weights, verify=False):
        for bucket in buckets(weights, self.bucket_bytes):
            self.loads.append([name for name, _ in bucket])
            self.state.update(bucket)
        return len(self.loads)


def _weights(n=5, numel=256):  # 1 KiB fp32 tensors
    return [(f"w{i}", torch.full((numel,), float(i))) for i in range(n)]


def test_buckets_hold_at_least_the_budget_and_never_split_a_tensor():
    groups = list(buckets(_weights(), bucket_bytes=2048))
    assert [[n for n, _ in g] for g in groups] == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    groups = list(buckets(_weights(), bucket_bytes=1))
    assert len(groups) == 5
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        list(buckets(_weights(), 0))


def test_sync_streams_every_tensor_once_with_stats():
    engine = RecordingEngine(bucket_bytes=3000)
    stats = sync_weights(iter(_weights()), engine)
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

    stats = sync_weights(exporter(), None)
    assert consumed == [f"w{i}" for i in range(5)] and stats.tensors == 0


def test_fingerprint_is_exact_and_sees_order_and_single_bits():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    words = t.view(torch.int32).reshape(-1).tolist()
    assert fingerprint(t) == (sum(words) % 2**64, sum((i + 1) * w for i, w in enumerate(words)) % 2**64)
    assert fingerprint(t) == fingerprint(t.clone().t().contiguous().t())  # layout-independent: same values
    swapped = t.clone().reshape(-1)
    swapped[[0, 1]] = swapped[[1, 0]]
    assert fingerprint(swapped)[0] == fingerprint(t)[0] and fingerprint(swapped)[1] != fingerprint(t)[1]
    flipped = t.clone()
    flipped.view(torch.int32)[2, 3] ^= 1  # the lowest mantissa bit of one element
    assert fingerprint(flipped) != fingerprint(t)
    odd = torch.tensor([1, 2, 3], dtype=torch.bfloat16)  # 6 bytes: fingerprinted byte by byte
    b = odd.view(torch.uint8).tolist()
    assert fingerprint(odd) == (sum(b), sum((i + 1) * x for i, x in enumerate(b)))
    big = torch.full((3,), -1, dtype=torch.int32)  # negative words wrap modulo 2**64 like the engine's
    assert fingerprint(big) == ((-3) % 2**64, (-6) % 2**64)


def test_check_fingerprints_names_the_corrupted_tensor():
    sent = [("a", fingerprint(torch.ones(4))), ("b", fingerprint(torch.zeros(4)))]
    check_fingerprints(sent, [["a", *sent[0][1]], ["b", *sent[1][1]]], where="engine")
    with pytest.raises(WeightSyncError, match=r"b arrived corrupted in engine"):
        check_fingerprints(sent, [["a", *sent[0][1]], ["b", 1, 2]], where="engine")
    with pytest.raises(WeightSyncError, match="never received b"):
        check_fingerprints(sent, [["a", *sent[0][1]]], where="engine")


def test_byte_transport_round_trips_dtypes_shapes_and_views():
    # Views of one storage (q/k/v of a fused parameter at TP=PP=1), bf16, an odd-sized tensor, a scalar.
    fused = torch.randn(6, 4)
    weights = [("q", fused[:2]), ("k", fused[2:4]), ("v", fused[4:]), ("half", torch.randn(3, 5).bfloat16()),
               ("odd", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)), ("scalar", torch.tensor(7.0))]
    payloads = list(encode(iter(weights), "bytes", bucket_bytes=40, verify=True))
    assert len(payloads) > 1 and all(isinstance(p["data"], bytes) for p, _ in payloads)  # msgpack-safe
    got = [pair for p, _ in payloads for pair in decode(p, torch.device("cpu"))]
    assert [n for n, _ in got] == [n for n, _ in weights]
    for (_, want), (_, t) in zip(weights, got):
        assert t.dtype == want.dtype and torch.equal(t, want)
    sent = [fp for _, fps in payloads for fp in fps]
    assert sent == [(n, fingerprint(t)) for n, t in weights]
    in_process = list(encode(iter(weights), "in_process", bucket_bytes=1 << 20, verify=False))
    assert in_process[0][0][0][1] is weights[0][1]  # handed over as they are, no copy


def test_transport_follows_where_the_engine_core_runs():
    assert choose_transport(True, "cuda") == "in_process" == choose_transport(True, "cpu")
    assert choose_transport(False, "cpu") == "bytes"
    assert choose_transport(False, "cuda") == "cuda_ipc"
