"""The FD loss (paper Sec. 3.1) against values worked out by hand."""
import math

import pytest
import torch
import torch.nn as nn

from fdistill.losses import feature_distill_loss, feature_distill_loss_parts, normalize_target


def sl1(d, beta=2.0):
    d = abs(d)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


PRED0 = torch.zeros(1, 2, 2)
TARGET = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])  # token 0 = [CLS], token 1 = a patch


def test_golden_no_norm_cls_weight():
    # per-token: [CLS] (0.25 + 2) / 2 = 1.125 ; patch (0 + 3) / 2 = 1.5
    cls_l = (sl1(1) + sl1(3)) / 2
    patch_l = (sl1(0) + sl1(4)) / 2
    assert cls_l == pytest.approx(1.125) and patch_l == pytest.approx(1.5)
    got10 = feature_distill_loss(PRED0, TARGET, norm="none", cls_weight=10.0)
    assert float(got10) == pytest.approx((10 * 1.125 + 1.5) / 11, abs=1e-6)  # 1.1590909...
    got1 = feature_distill_loss(PRED0, TARGET, norm="none", cls_weight=1.0)
    assert float(got1) == pytest.approx(1.3125, abs=1e-6)
    parts = feature_distill_loss_parts(PRED0, TARGET, norm="none")
    assert float(parts["loss_prefix"]) == pytest.approx(1.125)
    assert float(parts["loss_patch"]) == pytest.approx(1.5)


def test_golden_standardize():
    # [1, 3] -> mean 2, var 1 -> +-1/sqrt(1 + 1e-5); [0, 4] -> mean 2, var 4 -> +-2/sqrt(4 + 1e-5)
    a = 1 / math.sqrt(1 + 1e-5)
    b = 2 / math.sqrt(4 + 1e-5)
    cls_l, patch_l = sl1(a), sl1(b)  # both coordinates have the same |d|
    got = feature_distill_loss(PRED0, TARGET, norm="standardize", cls_weight=10.0)
    assert float(got) == pytest.approx((10 * cls_l + patch_l) / 11, rel=1e-6)


def test_beta_switches_branch():
    # |d| = 3: quadratic branch for beta=4 (9/8), linear for beta=2 (2)
    p, t = torch.zeros(1, 1, 1), torch.full((1, 1, 1), 3.0)
    assert float(feature_distill_loss(p, t, norm="none", beta=4.0, num_prefix_tokens=0)) == pytest.approx(9 / 8)
    assert float(feature_distill_loss(p, t, norm="none", beta=2.0, num_prefix_tokens=0)) == pytest.approx(2.0)


def test_standardize_invariant_to_scale_and_shift():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    base = feature_distill_loss(pred, target)
    shifted = feature_distill_loss(pred, 7.5 * target - 3.0)
    assert torch.allclose(base, shifted, atol=1e-5)
    # ...but not with norm='none'
    assert not torch.allclose(feature_distill_loss(pred, target, norm="none"),
                              feature_distill_loss(pred, 7.5 * target - 3.0, norm="none"))


def test_cls_weight_effect():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    parts = feature_distill_loss_parts(pred, target, cls_weight=1.0)
    lp, lq = float(parts["loss_prefix"]), float(parts["loss_patch"])
    for w in (0.0, 1.0, 10.0, 1000.0):
        got = float(feature_distill_loss(pred, target, cls_weight=w))
        assert got == pytest.approx((w * lp + 4 * lq) / (w + 4), rel=1e-5)
    # a huge weight makes the loss the [CLS] loss; zero weight the patch loss
    assert float(feature_distill_loss(pred, target, cls_weight=1e9)) == pytest.approx(lp, rel=1e-4)


def test_cls_weight_one_is_official_code():
    """cls_weight=1 == nn.SmoothL1Loss(beta=2)(pred, LayerNorm_noaffine(target)) of the official FD."""
    torch.manual_seed(2)
    pred, target = torch.randn(4, 10, 12), torch.randn(4, 10, 12) * 3 + 1
    official = nn.SmoothL1Loss(beta=2.0)(pred, nn.LayerNorm(12, elementwise_affine=False)(target))
    assert torch.allclose(feature_distill_loss(pred, target, cls_weight=1.0), official, atol=1e-6)


def test_granularity_gap_and_cls():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[9.0, 9.0], [1.0, 3.0], [3.0, 5.0]]])  # patches average to [2, 4]
    gap = feature_distill_loss(pred, target, norm="none", granularity="gap")
    assert float(gap) == pytest.approx((sl1(2) + sl1(4)) / 2)
    cls = feature_distill_loss(pred, target, norm="none", granularity="cls")
    assert float(cls) == pytest.approx(sl1(9))


def test_l2_norm_and_errors():
    t = torch.tensor([[[3.0, 4.0]]])
    assert torch.allclose(normalize_target(t, "l2"), torch.tensor([[[0.6, 0.8]]]))
    with pytest.raises(ValueError, match="same shape"):
        feature_distill_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="granularity"):
        feature_distill_loss(PRED0, TARGET, granularity="mean")
    with pytest.raises(ValueError, match="target norm"):
        feature_distill_loss(PRED0, TARGET, norm="whiten")
    with pytest.raises(ValueError, match="prefix"):
        feature_distill_loss(PRED0, TARGET, granularity="cls", num_prefix_tokens=0)


def test_gradient_flows_to_pred_only():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, requires_grad=True)
    feature_distill_loss(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
