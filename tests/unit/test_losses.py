"""Unit tests for atpo_megatron.algo.losses: hand-computed values, gradients, invariants, bad input."""

import math
from functools import partial

import pytest
import torch

from atpo_megatron.algo.losses import (
    LOSS_AGGREGATION,
    check_inputs,
    loss_normalizer,
    loss_numerator,
    policy_loss,
    sequence_count,
    trains_nothing,
    turn_ids,
    turn_kl_entropy,
)

NAN = float("nan")


def mean_loss(name, logp, old, adv, mask, **clip):
    """The loss of one batch alone, through the training path: ``numerator / count`` of ``policy_loss``."""
    numerator, count, metrics = policy_loss(name, logp, old, adv, mask, **clip)
    return numerator / count, metrics


atpo_loss, gspo_loss, grpo_loss = (partial(mean_loss, name) for name in ("atpo", "gspo", "grpo"))


def _leaf(x: list[list[float]]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def _random_batch(seed: int, B: int = 6, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) < 0.7).long()
    mask[:, 0] = 1  # every sequence has at least one token
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


# ---------------------------------------------------------------- turn ids


def test_turn_ids_with_tool_gaps():
    mask = torch.tensor([
        [1, 1, 0, 0, 1, 1, 1, 0, 1],  # tool output at 2-3, a notice at 7: three turns
        [0, 0, 1, 1, 1, 1, 1, 1, 1],  # leading zeros, one turn
        [0, 0, 0, 0, 0, 0, 0, 0, 0],  # empty row
        [1, 0, 1, 0, 1, 0, 1, 0, 1],  # alternating: five single-token turns
    ])
    expected = torch.tensor([
        [0, 0, -1, -1, 1, 1, 1, -1, 2],
        [-1, -1, 0, 0, 0, 0, 0, 0, 0],
        [-1, -1, -1, -1, -1, -1, -1, -1, -1],
        [0, -1, 1, -1, 2, -1, 3, -1, 4],
    ])
    assert torch.equal(turn_ids(mask), expected)
    assert torch.equal(turn_ids(mask.bool()), expected)
    assert turn_ids(mask).dtype == torch.long


def _loop_turn_ids(mask: torch.Tensor) -> torch.Tensor:
    out = torch.full(mask.shape, -1, dtype=torch.long)
    for i in range(mask.shape[0]):
        k, prev = -1, 0
        for t in range(mask.shape[1]):
            if mask[i, t] and not prev:
                k += 1
            if mask[i, t]:
                out[i, t] = k
            prev = int(mask[i, t])
    return out


def test_turn_ids_matches_loop_on_random_masks():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(20, 31, generator=g) < 0.5).long()
    assert torch.equal(turn_ids(mask), _loop_turn_ids(mask))


# ---------------------------------------------------------------- ATPO by hand

# Sequence 0: mask 1 1 0 1 1, log ratio 0.1 0.3 | -0.2 0.0, A = +1 on every token.
#   turn 0: mean log ratio 0.2 -> s = e^0.2 = 1.2214 > 1.2 -> clipped, loss = -1.2 per token
#   turn 1: mean log ratio -0.1 -> s = e^-0.1 = 0.9048 in [0.8, 1.2] -> loss = -0.9048 per token
#   token mean over 4 tokens = (2 * -1.2 + 2 * -e^-0.1) / 4
# Sequence 1: mask 1 1 1 0 0, log ratio 0.05 -0.05 0.3, A = -2: one turn, mean 0.1 -> s = e^0.1
#   loss = max(2 s, 2 clip(s)) = 2 e^0.1 per token, token mean 2 e^0.1
# seq-mean = (seq0 + seq1) / 2
HAND_MASK = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]])
HAND_OLD = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -0.7], [-0.4, -0.6, -1.0, 0.0, 0.0]], dtype=torch.float64)
HAND_LR = torch.tensor([[0.1, 0.3, 9.0, -0.2, 0.0], [0.05, -0.05, 0.3, 9.0, 9.0]], dtype=torch.float64)
HAND_ADV = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, -2.0, -2.0]], dtype=torch.float64)


def test_atpo_loss_by_hand_and_gradient():
    logp = (HAND_OLD + HAND_LR).requires_grad_(True)  # the 9.0 entries sit where the mask is 0
    loss, metrics = atpo_loss(logp, HAND_OLD, HAND_ADV, HAND_MASK, clip_low=0.2, clip_high=0.2)
    seq0 = (2 * -1.2 + 2 * -math.exp(-0.1)) / 4
    seq1 = 2 * math.exp(0.1)
    assert loss.item() == pytest.approx((seq0 + seq1) / 2, rel=1e-12)
    loss.backward()
    # unclipped token: d loss / d logp = -A s / (n_seq |y_i|); clipped token or mask 0: 0
    expected = torch.tensor([
        [0.0, 0.0, 0.0, -1 * math.exp(-0.1) / (2 * 4), -1 * math.exp(-0.1) / (2 * 4)],
        [2 * math.exp(0.1) / (2 * 3)] * 3 + [0.0, 0.0],
    ], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)
    # 2 of 7 masked tokens are clipped; |log s| per token: 0.2 0.2 0.1 0.1 0.1 0.1 0.1
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(2 / 7)
    assert metrics["actor/log_ratio_abs_mean"].item() == pytest.approx((0.2 * 2 + 0.1 * 5) / 7)
    assert metrics["actor/single_turn_count"].item() == 1


def test_atpo_default_clip_by_hand():
    # default clip [1 - 3e-3, 1 + 4e-3]: seq 0 turn 0 (s = e^0.2) -> -1.004; turn 1 (s = e^-0.1, A > 0)
    # keeps -e^-0.1 (max(-s, -0.997) = -s); seq 1 (A = -2, s = e^0.1) keeps 2 e^0.1.
    logp = HAND_OLD + HAND_LR
    loss, _ = atpo_loss(logp, HAND_OLD, HAND_ADV, HAND_MASK)
    seq0 = (2 * -1.004 + 2 * -math.exp(-0.1)) / 4
    assert loss.item() == pytest.approx((seq0 + 2 * math.exp(0.1)) / 2, rel=1e-12)


def test_gspo_loss_by_hand():
    # seq 0 as ONE ratio: mean log ratio over 4 tokens = (0.1 + 0.3 - 0.2 + 0) / 4 = 0.05, s = e^0.05
    # clip 0.2/0.2 -> unclipped: loss -e^0.05 per token; seq 1 as in ATPO: 2 e^0.1
    logp = (HAND_OLD + HAND_LR).requires_grad_(True)
    loss, metrics = gspo_loss(logp, HAND_OLD, HAND_ADV, HAND_MASK, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx((-math.exp(0.05) + 2 * math.exp(0.1)) / 2, rel=1e-12)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-math.exp(0.05) / (2 * 4))
    assert metrics["actor/pg_clipfrac"].item() == 0.0
    # the gspo defaults (3e-4, 4e-4) clip both sequences: seq 0 -> -1.0004, seq 1 -> max(2 s, 2 * 1.0004) = 2 s
    loss, metrics = gspo_loss(logp, HAND_OLD, HAND_ADV, HAND_MASK)
    assert loss.item() == pytest.approx((-1.0004 + 2 * math.exp(0.1)) / 2, rel=1e-12)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(4 / 7)


def test_atpo_gradient_zero_when_clipped_low_side():
    # A < 0 and s below 1 - clip_low: clip(s) = 0.997 > s, loss = -A * 0.997 is constant -> no gradient
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.full((1, 3), -0.5, dtype=torch.float64, requires_grad=True)
    loss, metrics = atpo_loss(logp, old, torch.full((1, 3), -1.0, dtype=torch.float64), torch.ones(1, 3))
    assert loss.item() == pytest.approx(0.997)
    loss.backward()
    assert torch.count_nonzero(logp.grad) == 0
    assert metrics["actor/pg_clipfrac"].item() == 1.0


def test_log_ratio_clamped_at_10():
    # log s = 12 is clamped to 10: value e^10 (A = -1 keeps the unclipped branch), gradient 0
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.full((1, 2), 12.0, dtype=torch.float64, requires_grad=True)
    loss, _ = atpo_loss(logp, old, torch.full((1, 2), -1.0, dtype=torch.float64), torch.ones(1, 2))
    assert loss.item() == pytest.approx(math.exp(10.0))
    loss.backward()
    assert torch.count_nonzero(logp.grad) == 0


def test_advantages_per_sequence_broadcast():
    logp = HAND_OLD + HAND_LR
    a, _ = atpo_loss(logp, HAND_OLD, HAND_ADV, HAND_MASK)
    b, _ = atpo_loss(logp, HAND_OLD, HAND_ADV[:, 0], HAND_MASK)
    assert a.item() == b.item()


# ---------------------------------------------------------------- invariants


def _loop_atpo(logp, old, adv, mask, clip_low, clip_high):
    """The spec §5.4 reference, loops over sequences and runs."""
    log_ratio = logp - old
    turn_lr = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        t = 0
        while t < logp.shape[1]:
            if mask[i, t]:
                e = t
                while e < logp.shape[1] and mask[i, e]:
                    e += 1
                turn_lr[i, t:e] = log_ratio[i, t:e].mean()
                t = e
            else:
                t += 1
    s = torch.exp((logp - logp.detach() + turn_lr.detach()).clamp(max=10))
    tok = torch.maximum(-adv * s, -adv * s.clamp(1 - clip_low, 1 + clip_high))
    per_seq = (tok * mask).sum(-1) / mask.sum(-1)
    return per_seq.mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_atpo_vectorised_equals_loop_reference(seed):
    logp, old, adv, mask = _random_batch(seed)
    ref_logp = logp.detach().clone().requires_grad_(True)
    loss, _ = atpo_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.15)
    ref = _loop_atpo(ref_logp, old, adv, mask, 0.1, 0.15)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(logp.grad, ref_logp.grad, rtol=1e-12, atol=1e-15)


def test_gspo_equals_atpo_when_each_sequence_is_one_turn():
    logp, old, adv, _ = _random_batch(3)
    lengths = torch.tensor([12, 5, 1, 9, 3, 7])
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()  # one run per row, right padding
    logp2 = logp.detach().clone().requires_grad_(True)
    a, ma = atpo_loss(logp, old, adv, mask, clip_low=0.05, clip_high=0.07)
    b, mb = gspo_loss(logp2, old, adv, mask, clip_low=0.05, clip_high=0.07)
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    torch.testing.assert_close(logp.grad, logp2.grad, rtol=1e-12, atol=1e-15)
    assert ma["actor/single_turn_count"].item() == mb["actor/single_turn_count"].item() == 6


def test_on_policy_ratio_is_one():
    # logp == old_logp: s = 1 everywhere, nothing clipped, loss = -mean_i mean_t A
    _, old, adv, mask = _random_batch(4)
    logp = old.clone().requires_grad_(True)
    for fn in (atpo_loss, gspo_loss, grpo_loss):
        loss, metrics = fn(logp, old, adv, mask)
        assert metrics["actor/pg_clipfrac"].item() == 0.0
        assert metrics["actor/turn_kl_entropy"].item() == 0.0  # KL_seq == 0 everywhere
    m = mask.double()
    loss, _ = atpo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((-(adv * m).sum(1) / m.sum(1)).mean().item(), rel=1e-12)


@pytest.mark.parametrize("name", ["atpo", "gspo", "grpo"])
def test_split_batch_with_global_normalizer_is_exact(name):
    logp, old, adv, mask = _random_batch(5)
    mask[2] = 0  # an empty sequence counts in neither denominator
    clip = {"clip_low": 0.1, "clip_high": 0.1}
    full, _ = mean_loss(name, logp, old, adv, mask, **clip)
    full.backward()
    full_grad = logp.grad.clone()
    logp.grad = None
    agg = LOSS_AGGREGATION[name]
    parts = [slice(0, 2), slice(2, 6)]
    n_global = sum(loss_normalizer(mask[p], agg) for p in parts)  # what the trainer all-reduces
    assert n_global.item() == (5 if agg == "seq-mean-token-mean" else mask.sum().item())
    total = sum(policy_loss(name, logp[p], old[p], adv[p], mask[p], **clip)[0] for p in parts) / n_global
    total.backward()
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(logp.grad, full_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["atpo", "gspo", "grpo"])
def test_zero_advantage_rows_add_only_to_the_count(name):
    """What train_step relies on to skip them: a row with A = 0 on every loss token adds 0 to the numerator and
    0 to every gradient, whatever its ratios (far off-policy, clipped, dual-clipped), and sequence_count is
    its share of loss_normalizer."""
    logp, old, adv, mask = _random_batch(7)
    with torch.no_grad():
        old[1] -= 2.0  # ratios e^2: clipped by every loss
        adv[1] = 0.0
        adv[4] = torch.where(mask[4] > 0, 0.0, 5.0)  # nonzero only off the mask
    rows = [r for r in range(len(mask)) if trains_nothing(adv[r].tolist(), mask[r].tolist())]
    assert rows == [1, 4]
    numerator, count, _ = policy_loss(name, logp, old, adv, mask, clip_low=0.1, clip_high=0.1)
    numerator.backward()
    assert logp.grad[rows].abs().max().item() == 0.0 and logp.grad.abs().max().item() > 0.0
    rest = [r for r in range(len(mask)) if r not in rows]
    alone, _, _ = policy_loss(name, logp[rest], old[rest], adv[rest], mask[rest], clip_low=0.1, clip_high=0.1)
    assert alone.item() == pytest.approx(numerator.item(), rel=1e-12)
    agg = LOSS_AGGREGATION[name]
    assert sum(sequence_count(m.tolist(), agg) for m in mask) == count.item()
    assert sequence_count([0, 1, 1, 0, 1], "seq-mean-token-mean") == 1 and sequence_count([0, 1, 1, 0, 1], "token-mean") == 3


def test_what_trains_nothing():
    assert trains_nothing([0.0, 0.0, 3.0], [1, 1, 0])  # the nonzero value is under tool output
    assert trains_nothing([], [])
    assert not trains_nothing([0.0, -0.5], [1, 1])
    assert not trains_nothing([NAN, 0.0], [1, 1])  # a NaN advantage is trained, so that it is refused
    assert not trains_nothing([0.0, 0.0], [1, 2])  # a bad mask is run, so that it is refused


def test_aggregate_modes_by_hand():
    tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # seq-mean-token-mean: (mean(1, 2, 3) + 4) / 2 = 3; token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    for agg, expected in (("seq-mean-token-mean", 3.0), ("token-mean", 2.5)):
        assert (loss_numerator(tok, mask, agg) / loss_normalizer(mask, agg)).item() == pytest.approx(expected)
    assert (loss_numerator(tok, mask, "token-mean") / 10).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- GRPO


def test_grpo_dual_clip_by_hand():
    # five tokens, clip 0.2, dual clip 3:
    #   A=-1, r=e^2:    max(e^2, 1.2) = e^2 = 7.39 > 3 -> dual clip -> 3          (no grad)
    #   A=-1, r=e^0.5:  max(1.6487, 1.2) = 1.6487 < 3 -> 1.6487                   (grad -A r)
    #   A=+1, r=e^2:    max(-e^2, -1.2) = -1.2 (clipped)                          (no grad)
    #   A=+1, r=e^-0.1: max(-0.9048, -0.9048) = -e^-0.1                           (grad -A r)
    #   A=-1, r=e^-0.5: max(0.6065, 0.8) = 0.8 (clipped low)                      (no grad)
    # in two rows of 3 and 2 tokens -> token-mean over 5
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[2.0, 0.5, 2.0], [-0.1, -0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = grpo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((3.0 + math.exp(0.5) - 1.2 - math.exp(-0.1) + 0.8) / 5, rel=1e-12)
    loss.backward()
    expected = torch.tensor([[0.0, math.exp(0.5) / 5, 0.0], [-math.exp(-0.1) / 5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-15)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert metrics["actor/pg_clipfrac_lower"].item() == pytest.approx(1 / 5)
    # without the dual clip (a huge bound) the first token would cost e^2
    loss_big, _ = grpo_loss(logp, old, adv, mask, dual_clip=1e9)
    assert loss_big.item() == pytest.approx(loss.item() + (math.exp(2.0) - 3.0) / 5, rel=1e-12)


# ---------------------------------------------------------------- H_turn


def test_turn_kl_entropy_by_hand():
    # row 0: two turns, KL_0 = 0.1 + 0.3 = 0.4, KL_1 = -0.2 + 0 = -0.2, KL_seq = 0.2
    #   p = softmax(0.4 / 0.2, -0.2 / 0.2) = softmax(2, -1): p0 = 1 / (1 + e^-3)
    #   H_0 = -(p0 ln p0 + p1 ln p1) / ln 2
    # row 1: one turn -> H = 0, counted as single-turn; row 2: empty -> not counted in the mean
    lr = torch.tensor([[0.1, 0.3, 5.0, -0.2, 0.0], [0.05, -0.05, 0.3, 0.0, 0.0], [1.0] * 5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0], [0] * 5])
    p0 = 1 / (1 + math.exp(-3))
    p1 = 1 - p0
    h0 = -(p0 * math.log(p0) + p1 * math.log(p1)) / math.log(2)
    h, single = turn_kl_entropy(lr * mask, mask)
    assert h.item() == pytest.approx(h0 / 2, rel=1e-12)
    assert single.item() == 1
    # the same through the loss metrics
    _, metrics = atpo_loss(HAND_OLD + HAND_LR, HAND_OLD, HAND_ADV, HAND_MASK)
    assert metrics["actor/turn_kl_entropy"].item() == pytest.approx(h0 / 2, rel=1e-12)


def test_turn_kl_entropy_three_equal_turns_is_one():
    # equal KL per turn -> uniform p over 3 turns -> H = ln 3 / ln 3 = 1
    lr = torch.tensor([[0.2, 0.0, 0.2, 0.0, 0.1, 0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0, 1, 1]])
    h, single = turn_kl_entropy(lr, mask)
    assert h.item() == pytest.approx(1.0)
    assert single.item() == 0


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    logp, old, adv, mask = _random_batch(6)
    with pytest.raises(ValueError, match="old_logp has shape"):
        atpo_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        atpo_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        atpo_loss(logp[0], old[0], adv[0], mask[0])
    bad = old.clone()
    bad[0, 0] = NAN  # mask[0, 0] == 1
    # values are checked once per batch, at its boundary (the losses never sync with the host)
    with pytest.raises(ValueError, match="old_logp has NaN"):
        check_inputs(logp, bad, adv, mask)
    with pytest.raises(ValueError, match="only 0 and 1"):
        check_inputs(logp, old, adv, mask * 2)
    with pytest.raises(ValueError, match="no 1s"):
        check_inputs(logp, old, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss("ppo", logp, old, adv, mask)
    with pytest.raises(ValueError, match="clip_low"):
        atpo_loss(logp, old, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        grpo_loss(logp, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        loss_numerator(logp, mask, "sum")


def test_nan_outside_mask_is_ignored():
    logp, old, adv, mask = _random_batch(7)
    mask[:, -1] = 0
    poisoned = old.clone()
    poisoned[:, -1] = NAN
    adv_p = adv.clone()
    adv_p[:, -1] = NAN
    for fn in (atpo_loss, gspo_loss, grpo_loss):
        logp.grad = None
        clean, _ = fn(logp, old, adv, mask)
        loss, metrics = fn(logp, poisoned, adv_p, mask)
        loss.backward()
        assert loss.item() == pytest.approx(clean.item(), rel=1e-12)
        assert torch.isfinite(logp.grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())
