"""Tests for fdistill.multi.balance: UNIC teacher dropping (naver/unic,
modeling/teacher_dropping.py), initial-loss normalisation and static weights."""
from __future__ import annotations

import io

import pytest
import torch

from fdistill.errors import ConfigError
from fdistill.multi.balance import (
    UNIC_DROP_PROB,
    InitialLossNormalizer,
    apply_teacher_dropping,
    check_weights,
    drop_probabilities,
    teacher_drop_mask,
    weighted_sum,
)

# (B, T) = (2, 3). Row 0: max 0.9 at t=1. Row 1: tie 0.7 at t=0 and t=1 -> first index, t=0.
LOSSES = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.7, 0.1]])


# --------------------------------------------------------------------------- drop probabilities
def test_drop_probabilities_by_hand_default():
    # UNIC: p = 0 at the row's argmax, drop_prob (= 0.5 by default) everywhere else,
    # whatever the size of the other losses.
    #   row 0: argmax t=1            -> [0.5, 0.0, 0.5]
    #   row 1: argmax t=0 (first tie) -> [0.0, 0.5, 0.5]
    # (A loss-proportional rule 1 - l/max would give row 0 = [0.778, 0, 0.444]: rejected here.)
    expected = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
    assert UNIC_DROP_PROB == 0.5
    assert torch.equal(drop_probabilities(LOSSES), expected)


def test_drop_probabilities_by_hand_custom_prob():
    # drop_prob = 0.3: row 0 -> [0.3, 0, 0.3]; row 1 -> [0, 0.3, 0.3]
    expected = torch.tensor([[0.3, 0.0, 0.3], [0.0, 0.3, 0.3]])
    assert torch.equal(drop_probabilities(LOSSES, 0.3), expected)


def test_all_equal_losses():
    # all equal: argmax is the first teacher (kept, p = 0); the rest keep drop_prob.
    # [[1, 1, 1]] -> [[0, 0.5, 0.5]]
    p = drop_probabilities(torch.ones(1, 3))
    assert torch.equal(p, torch.tensor([[0.0, 0.5, 0.5]]))


def test_drop_probabilities_is_detached_and_pure():
    losses = LOSSES.clone().requires_grad_(True)
    p1 = drop_probabilities(losses)
    p2 = drop_probabilities(losses)
    assert not p1.requires_grad
    assert torch.equal(p1, p2)
    assert torch.equal(losses.detach(), LOSSES)  # input untouched


def test_single_teacher_never_dropped():
    assert torch.equal(drop_probabilities(torch.tensor([[3.0], [0.1]])), torch.zeros(2, 1))
    keep = teacher_drop_mask(torch.rand(50, 1), drop_prob=1.0)
    assert keep.all()


# --------------------------------------------------------------------------- mask draws
def test_max_loss_teacher_never_dropped():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(64, 5, generator=g)  # (B, T)
    top = losses.argmax(dim=1)  # (B,)
    dropped_any_other = False
    for _ in range(200):
        keep = teacher_drop_mask(losses, g)  # (B, T)
        assert keep.dtype == torch.bool and keep.shape == (64, 5)
        assert keep[torch.arange(64), top].all()
        dropped_any_other |= bool((~keep).any())
    assert dropped_any_other  # the others do get dropped


def test_drop_prob_one_keeps_only_max_and_zero_keeps_all():
    keep = teacher_drop_mask(LOSSES, drop_prob=1.0)
    assert torch.equal(keep, torch.tensor([[False, True, False], [True, False, False]]))
    assert teacher_drop_mask(LOSSES, drop_prob=0.0).all()


@pytest.mark.parametrize("drop_prob", [0.5, 0.3])
def test_empirical_drop_frequencies(drop_prob):
    n = 20_000
    g = torch.Generator().manual_seed(1234)
    keep = teacher_drop_mask(LOSSES.repeat(n, 1), g, drop_prob=drop_prob)  # (n * 2, 3)
    freq = 1.0 - keep.view(n, 2, 3).float().mean(dim=0)  # (2, 3)
    p = drop_probabilities(LOSSES, drop_prob)
    assert (freq - p).abs().max().item() < 0.01
    # p = 0 entries are exactly never dropped
    assert torch.equal(freq[p == 0], torch.zeros(2))


def test_mask_reproducible_with_generator_and_global_rng():
    losses = torch.rand(16, 4)
    a = teacher_drop_mask(losses, torch.Generator().manual_seed(7))
    b = teacher_drop_mask(losses, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    torch.manual_seed(11)
    c = teacher_drop_mask(losses)
    torch.manual_seed(11)
    d = teacher_drop_mask(losses)
    assert torch.equal(c, d)


# --------------------------------------------------------------------------- aggregation + gradients
def test_apply_teacher_dropping_by_hand():
    w = torch.tensor([1.0, 2.0, 3.0])
    # drop_prob = 1: keep only the maxima, (b0, t1) = 0.9 and (b1, t0) = 0.7; 2 kept entries
    #   total = (2 * 0.9 + 1 * 0.7) / 2 = 2.5 / 2 = 1.25
    total, keep = apply_teacher_dropping(LOSSES, w, drop_prob=1.0)
    assert keep.sum().item() == 2
    assert total.item() == pytest.approx(1.25, abs=1e-6)
    # drop_prob = 0: all 6 kept
    #   total = (0.2 + 2*0.9 + 3*0.5 + 0.7 + 2*0.7 + 3*0.1) / 6 = 5.9 / 6
    total, keep = apply_teacher_dropping(LOSSES, w, drop_prob=0.0)
    assert keep.all()
    assert total.item() == pytest.approx(5.9 / 6, abs=1e-6)


def test_unit_weights_match_unic_aggregate():
    # UNIC aggregate_losses: coeffs = keep / keep.sum(); loss = sum(coeffs * l) = mean of kept
    g = torch.Generator().manual_seed(3)
    losses = torch.rand(32, 4, generator=g)
    total, keep = apply_teacher_dropping(losses, [1.0] * 4, generator=g)
    assert 32 <= keep.sum().item() < 32 * 4
    assert torch.allclose(total, losses[keep].mean(), atol=1e-6)


def test_gradients_only_through_kept_entries():
    g = torch.Generator().manual_seed(5)
    losses = torch.rand(8, 3, generator=g).requires_grad_(True)  # (B, T)
    w = torch.tensor([1.0, 2.0, 0.5])
    total, keep = apply_teacher_dropping(losses, w, generator=g)
    assert (~keep).any() and keep.any()
    total.backward()
    grad = losses.grad  # (B, T)
    assert torch.equal(grad[~keep], torch.zeros(int((~keep).sum())))
    expected = keep.float() * w / keep.sum()  # d total / d l = w_t / n_kept on kept entries
    assert torch.allclose(grad, expected, atol=1e-7)
    assert (grad[keep] > 0).all()


def test_same_generator_state_same_total():
    losses = torch.rand(10, 3)
    t1, k1 = apply_teacher_dropping(losses, [1, 1, 1], generator=torch.Generator().manual_seed(9))
    t2, k2 = apply_teacher_dropping(losses, [1, 1, 1], generator=torch.Generator().manual_seed(9))
    assert torch.equal(k1, k2) and torch.equal(t1, t2)


# --------------------------------------------------------------------------- initial-loss normaliser
def test_normalizer_by_hand():
    norm = InitialLossNormalizer(2, warmup_steps=2)
    assert norm.initial.dtype == torch.float64 and norm.count.dtype == torch.int64
    assert set(norm.state_dict()) == {"initial", "count"}
    # before any update: divisor 1
    assert torch.equal(norm(torch.tensor([3.0, 4.0])), torch.tensor([3.0, 4.0]))
    norm.update(torch.tensor([2.0, 8.0]))  # initial = [2, 8], count 1
    assert torch.equal(norm.initial, torch.tensor([2.0, 8.0], dtype=torch.float64))
    assert torch.equal(norm(torch.tensor([3.0, 4.0])), torch.tensor([1.5, 0.5]))  # 3/2, 4/8
    assert not norm.warm
    norm.update(torch.tensor([[4.0, 2.0], [4.0, 6.0]]))  # (B, T) -> batch mean [4, 4]
    # initial = ([2, 8] + [4, 4]) / 2 = [3, 6], count 2 -> warm
    assert torch.equal(norm.initial, torch.tensor([3.0, 6.0], dtype=torch.float64))
    assert norm.count.item() == 2 and norm.warm
    norm.update(torch.tensor([100.0, 100.0]))  # past warm-up: divisor stays fixed
    assert torch.equal(norm.initial, torch.tensor([3.0, 6.0], dtype=torch.float64))
    assert norm.count.item() == 2
    out = norm(torch.tensor([1.5, 3.0]))  # [1.5/3, 3/6]
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([0.5, 0.5]))


def test_normalizer_keeps_gradient_and_detaches_update():
    norm = InitialLossNormalizer(2)
    x = torch.tensor([2.0, 4.0], requires_grad=True)
    norm.update(x)  # must not build a graph into the buffer
    assert not norm.initial.requires_grad
    y = norm(x * 3)  # [6/2, 12/4]
    y.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([3 / 2, 3 / 4]))


def test_normalizer_resume_round_trip_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(42)
    steps = [torch.rand(4, 3, generator=g, dtype=torch.float32) + 0.1 for _ in range(8)]  # (B, T)

    full = InitialLossNormalizer(3, warmup_steps=5)
    for s in steps:
        full.update(s)

    first = InitialLossNormalizer(3, warmup_steps=5)
    for s in steps[:2]:  # killed mid-warm-up
        first.update(s)
    mid = {k: v.clone() for k, v in first.state_dict().items()}
    path = tmp_path / "norm.pt"
    torch.save(first.state_dict(), path)

    resumed = InitialLossNormalizer(3, warmup_steps=5)
    resumed.load_state_dict(torch.load(path))
    assert resumed.count.item() == 2
    for s in steps[2:]:
        resumed.update(s)

    assert torch.equal(resumed.initial, full.initial)
    assert torch.equal(resumed.count, full.count)
    assert not torch.equal(mid["initial"], full.initial)  # the resume actually mattered
    probe = torch.rand(3, generator=g)
    assert torch.equal(resumed(probe), full(probe))

    # a fresh module that did NOT load the state would diverge
    fresh = InitialLossNormalizer(3, warmup_steps=5)
    for s in steps[2:]:
        fresh.update(s)
    assert not torch.equal(fresh.initial, full.initial)

    buf = io.BytesIO()
    torch.save(full.state_dict(), buf)
    buf.seek(0)
    again = InitialLossNormalizer(3, warmup_steps=5)
    again.load_state_dict(torch.load(buf))
    assert torch.equal(again.initial, full.initial) and again.warm


def test_normalizer_errors():
    with pytest.raises(ValueError, match="num_teachers"):
        InitialLossNormalizer(0)
    with pytest.raises(ValueError, match="warmup_steps"):
        InitialLossNormalizer(2, warmup_steps=0)
    norm = InitialLossNormalizer(2)
    with pytest.raises(ValueError, match=r"T = 2"):
        norm.update(torch.ones(3))
    with pytest.raises(ValueError, match=r"T = 2"):
        norm(torch.ones(3))
    with pytest.raises(ValueError, match=r"\(T,\) or \(B, T\)"):
        norm.update(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="> 0"):
        norm.update(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        norm.update(torch.tensor([1.0, float("nan")]))
    assert norm.count.item() == 0  # rejected updates left no trace
    with pytest.raises(RuntimeError):  # wrong T in a checkpoint
        norm.load_state_dict(InitialLossNormalizer(3).state_dict())


# --------------------------------------------------------------------------- static weights
def test_weighted_sum_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    # 0.5*1 + 0*2 + 2*3 = 6.5
    out = weighted_sum(x, [0.5, 0.0, 2.0])
    assert out.item() == pytest.approx(6.5)
    out.backward()
    assert torch.equal(x.grad, torch.tensor([0.5, 0.0, 2.0]))


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0, -0.1], ">= 0"),
        ([1.0, float("nan")], "finite"),
        ([1.0, float("inf")], "finite"),
        ([0.0, 0.0], "all be zero"),
        ([], "non-empty 1-D"),
        ([[1.0, 1.0]], "non-empty 1-D"),
    ],
)
def test_check_weights_rejects(weights, match):
    with pytest.raises(ConfigError, match=match):
        check_weights(weights)
    assert issubclass(ConfigError, ValueError)


def test_check_weights_accepts_and_length():
    w = check_weights([1, 0, 2])
    assert w.is_floating_point() and w.tolist() == [1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        check_weights([1.0, 1.0], num_teachers=3)
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        weighted_sum(torch.ones(3), [1.0, 1.0])
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        apply_teacher_dropping(torch.ones(2, 3), [1.0, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        apply_teacher_dropping(torch.ones(2, 3), [1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    "losses, match",
    [
        (torch.ones(3), r"shape \(B, T\)"),
        (torch.ones(2, 0), r"shape \(B, T\)"),
        (torch.ones(2, 3, 4), r"shape \(B, T\)"),
        (torch.ones(2, 3, dtype=torch.long), "floating-point"),
        (torch.tensor([[1.0, float("nan")]]), "non-finite"),
    ],
)
def test_bad_losses(losses, match):
    with pytest.raises(ValueError, match=match):
        drop_probabilities(losses)
    with pytest.raises(ValueError, match=match):
        teacher_drop_mask(losses)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_drop_prob(p):
    with pytest.raises(ValueError, match="drop_prob"):
        drop_probabilities(LOSSES, p)


def test_weighted_sum_bad_shape():
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        weighted_sum(torch.ones(2, 3), [1.0, 1.0, 1.0])
