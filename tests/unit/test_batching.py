"""Micro-batching of training sequences: shapes, the next-token shift, alignment, packing, DP split."""

from dataclasses import dataclass, field

import pytest
import torch

from atpo_megatron.actor.batching import (
    build_micro_batch,
    make_micro_batches,
    pack_micro_batches,
    partition_balanced,
)


@dataclass
class Seq:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int] = field(default=None)
    advantages: list[float] = field(default=None)
    old_logprobs: list[float] = field(default=None)


def test_shift_and_alignment_hand_checked():
    # full = [10, 11, 12 | 20, 21, 22, 23], P=3, R=4; input length 6
    a = Seq([10, 11, 12], [20, 21, 22, 23], [1, 0, 1, 1], [0.5, 0.5, -1.0, 2.0], [-0.1, -0.2, -0.3, -0.4])
    # full = [30 | 40, 41], P=1, R=2; input length 2
    b = Seq([30], [40, 41], [1, 1], [1.0, 1.0], [-1.0, -2.0])
    mb = build_micro_batch([a, b], [0, 1], pad_id=7)
    assert mb.tokens.shape == (2, 6)
    assert mb.tokens.tolist() == [[10, 11, 12, 20, 21, 22], [30, 40, 7, 7, 7, 7]]
    assert mb.targets.tolist() == [[11, 12, 20, 21, 22, 23], [40, 41, 7, 7, 7, 7]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    # response token j of row 0 at position P-1+j = 2+j
    assert mb.loss_mask.tolist() == [[0, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert mb.response_mask.tolist() == [[False, False, True, True, True, True], [True, True, False, False, False, False]]
    assert mb.advantages.tolist() == [[0, 0, 0.5, 0.5, -1.0, 2.0], [1.0, 1.0, 0, 0, 0, 0]]
    assert torch.allclose(mb.old_logprobs[0], torch.tensor([0, 0, -0.1, -0.2, -0.3, -0.4]))
    # the target at every response position is that response token
    for r, seq in enumerate([a, b]):
        assert mb.response_values(mb.targets, r).tolist() == seq.response_ids
    assert mb.lengths == [6, 2] and mb.prompt_lens == [3, 1] and mb.indices == [0, 1]


def test_missing_optional_fields_default_to_full_mask():
    mb = build_micro_batch([Seq([1, 2], [3, 4])], [0])
    assert mb.loss_mask.tolist() == [[0, 1, 1]]
    assert mb.advantages.abs().sum() == 0 and mb.old_logprobs.abs().sum() == 0


def test_empty_group_is_one_pad_row_without_loss():
    mb = build_micro_batch([Seq([1], [2])], [], pad_id=5)
    assert mb.tokens.tolist() == [[5]] and mb.loss_mask.sum() == 0 and mb.indices == []


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty prompt"):
        build_micro_batch([Seq([], [1, 2])], [0])
    with pytest.raises(ValueError, match="loss_mask has 1 entries but response_ids has 2"):
        make_micro_batches([Seq([1], [1, 2], [1])], 100)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_micro_batches([3], 0)


def test_pack_keep_order_respects_padded_budget():
    lengths = [4, 4, 4, 9, 2, 2]
    # budget 12: [4,4,4]=12 | [9]=9 (9 then 2 -> 2*9=18 > 12) | [2,2]=4
    assert pack_micro_batches(lengths, 12) == [[0, 1, 2], [3], [4, 5]]
    # a sequence longer than the budget gets its own micro-batch
    assert pack_micro_batches([20, 1], 12) == [[0], [1]]


def test_pack_length_order_is_deterministic_and_sorted_inside():
    lengths = [2, 9, 4, 4, 2, 4]
    # sorted: 9(1) 4(2) 4(3) 4(5) 2(0) 2(4); budget 12: [9] | [4,4,4] | [2,2]
    assert pack_micro_batches(lengths, 12, order="length") == [[1], [2, 3, 5], [0, 4]]


def test_pack_multiple_of_splits_largest_then_pads_with_empty():
    lengths = [4, 4, 4, 9]
    groups = pack_micro_batches(lengths, 12, multiple_of=4)
    assert len(groups) == 4 and sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert pack_micro_batches([3], 12, multiple_of=2) == [[0], []]


def test_make_micro_batches_covers_every_sequence_once():
    seqs = [Seq([1] * (i % 3 + 1), [2] * (i % 5 + 1)) for i in range(11)]
    mbs = make_micro_batches(seqs, 16, order="length")
    assert sorted(i for mb in mbs for i in mb.indices) == list(range(11))
    for mb in mbs:
        assert mb.num_rows * mb.seq_len <= 16 or mb.num_rows == 1
        assert mb.loss_mask.sum() == sum(len(seqs[i].response_ids) for i in mb.indices)


def test_partition_balanced_greedy_lpt():
    lengths = [10, 1, 7, 3, 5, 5]
    # LPT: 10->r0, 7->r1, 5(4)->r1 (7<10), 5(5)->r0 (10<12), 3->r1 (12<15)... loads: r0=15, r1=15, then 1->r0
    groups = partition_balanced(lengths, 2)
    assert groups == [[0, 1, 5], [2, 3, 4]]
    assert [sum(lengths[i] for i in g) for g in groups] == [16, 15]
    assert partition_balanced([3], 2) == [[0], []]
