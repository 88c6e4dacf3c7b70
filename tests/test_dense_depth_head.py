"""The NYUv2 depth model and loss (issue 14): SiLogLoss against values worked by hand (and its
masking, batch pooling, no-valid and gradient behaviour), DepthEstimator's full-size bounded output
on a ViT, the FD student and a Swin, gradients into the backbone, clear size errors, and a short
training run that fits a toy batch."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from fdistill import create_student
from fdistill.dense import DenseError
from fdistill.dense.depth_head import DepthEstimator
from fdistill.dense.depth_loss import SiLogLoss

LOG2 = math.log(2.0)


def tiny_vit(**kw):
    kw.setdefault("img_size", 64)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=64, depth=4, num_heads=2, **kw)


def tiny_swin(img_size=64):
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, window_size=2,
                             embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


# ---------------------------------------------------------------- SiLogLoss, by hand


def test_silog_is_zero_at_a_perfect_fit_with_a_finite_gradient():
    t = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
    p = t.clone().requires_grad_(True)
    loss = SiLogLoss()(p, t)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().max() == 0  # the minimum: a zero gradient, not NaN


def test_silog_of_a_scaled_prediction_by_hand():
    """pred = 2 * target on a 2x2 map of mixed depths: g = log 2 at every pixel, so mean(g^2) =
    log(2)^2 and mean(g)^2 = log(2)^2; loss = sqrt((1 - lambd) log(2)^2) = sqrt(0.15) * 0.693147 = 0.268455."""
    t = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
    assert SiLogLoss()(2 * t, t).item() == pytest.approx(math.sqrt(0.15) * LOG2, rel=1e-6)
    assert SiLogLoss()(2 * t, t).item() == pytest.approx(0.268455, abs=1e-6)
    assert SiLogLoss(lambd=0.5)(0.5 * t, t).item() == pytest.approx(math.sqrt(0.5) * LOG2, rel=1e-6)  # c = 1/2
    assert SiLogLoss(lambd=1.0)(3 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # lambd = 1: scale invariant
    assert SiLogLoss(scale=10.0)(2 * t, t).item() == pytest.approx(2.68455, abs=1e-5)  # BTS's x10


def test_silog_of_an_uneven_error_by_hand():
    """target all 1 m, pred [[1, e], [1, e]]: g = [0, 1, 0, 1]; mean(g^2) = 0.5, mean(g) = 0.5, so
    loss = sqrt(0.5 - 0.85 * 0.25) = sqrt(0.2875) = 0.536190; with lambd 0.5: sqrt(0.375) = 0.612372."""
    t = torch.ones(1, 2, 2)
    p = torch.tensor([[[1.0, math.e], [1.0, math.e]]])
    assert SiLogLoss()(p, t).item() == pytest.approx(0.536190, abs=1e-6)
    assert SiLogLoss(lambd=0.5)(p, t).item() == pytest.approx(0.612372, abs=1e-6)
    assert SiLogLoss()(p[:, None], t[:, None]).item() == pytest.approx(0.536190, abs=1e-6)  # (B, 1, H, W) too


def test_silog_ignores_invalid_pixels():
    """target [[2, 0], [4, 12]] with max_depth 10: only 2 and 4 count. pred 2e there and 4 on the
    other: g = [1, 0], the 0.536190 of the case above, whatever pred is at the 0 m and 12 m pixels."""
    loss = SiLogLoss(max_depth=10.0)
    t = torch.tensor([[[2.0, 0.0], [4.0, 12.0]]])
    a = torch.tensor([[[2 * math.e, 123.0], [4.0, 0.5]]])
    b = torch.tensor([[[2 * math.e, 1e-9], [4.0, 9.0]]])
    assert loss(a, t).item() == pytest.approx(0.536190, abs=1e-6)
    assert loss(b, t).item() == pytest.approx(loss(a, t).item(), abs=1e-7)
    p = a.clone().requires_grad_(True)
    loss(p, t).backward()
    assert p.grad[0, 0, 1] == 0 and p.grad[0, 1, 1] == 0 and p.grad[0, 0, 0] != 0  # no gradient where invalid
    # an explicit mask drops the 2 m pixel as well: one pixel, g = [0], loss 0
    valid = torch.tensor([[[False, True], [True, True]]])
    assert loss(a, t, valid).item() == pytest.approx(0.0, abs=1e-7)
    assert SiLogLoss(max_depth=None)(a, t).item() != pytest.approx(loss(a, t).item())  # 12 m counts without a bound


def test_silog_pools_the_batch():
    """Image 1: pred = 2 * target (g = log 2), image 2: perfect (g = 0). Pooled over all 8 pixels
    (BTS / GLPDepth): mean(g^2) = log(2)^2 / 2, mean(g) = log(2) / 2, loss = sqrt(0.2875) log 2 =
    0.371659; a mean of per-image losses would be (0.268455 + 0) / 2 = 0.134227."""
    t = torch.tensor([[[1.0, 2.0], [4.0, 8.0]], [[3.0, 3.0], [5.0, 5.0]]])
    p = t.clone()
    p[0] *= 2
    assert SiLogLoss()(p, t).item() == pytest.approx(math.sqrt(0.2875) * LOG2, abs=1e-6)
    assert SiLogLoss()(p, t).item() == pytest.approx(0.371659, abs=1e-6)


def test_silog_without_valid_pixels_is_zero_and_keeps_a_gradient_path():
    p = torch.full((2, 1, 3, 3), 4.0, requires_grad=True)
    t = torch.zeros(2, 1, 3, 3)
    t[0, 0, 0, 0] = 11.0  # above max_depth
    loss = SiLogLoss()(p, t)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().max() == 0


def test_silog_gradient_is_finite_and_matches_the_formula():
    torch.manual_seed(0)
    t = torch.rand(2, 1, 5, 5) * 9 + 0.5
    p = (t * torch.exp(0.3 * torch.randn_like(t))).requires_grad_(True)
    loss = SiLogLoss()(p, t)
    loss.backward()
    q = p.detach().clone().requires_grad_(True)
    g = torch.log(q) - torch.log(t)
    ref = torch.sqrt(g.square().mean() - 0.85 * g.mean().square())
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.isfinite(p.grad).all() and torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8)
    z = torch.zeros(1, 1, 2, 2, requires_grad=True)  # pred 0 m: clamped to eps, finite
    SiLogLoss()(z, torch.ones(1, 1, 2, 2)).backward()
    assert torch.isfinite(z.grad).all()


def test_silog_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="one size"):
        SiLogLoss()(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="lambd"):
        SiLogLoss(lambd=1.5)


# ---------------------------------------------------------------- DepthEstimator


@pytest.mark.parametrize("which", ["timm_vit", "fd_student", "swin"])
def test_depth_is_full_size_bounded_and_trains_the_backbone(which):
    if which == "timm_vit":
        net = tiny_vit(dynamic_img_size=True)  # one model for every size
        sizes = [(64, 64), (64, 96), (48, 80)]  # 48x80: an odd 3x5 grid, resized at the end
    elif which == "fd_student":
        net = create_student("vit_tiny", img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)
        sizes = [(64, 64)]
    else:
        net = tiny_swin()
        sizes = [(64, 64)]
    model = DepthEstimator(net, max_depth=10.0, img_size=sizes[0], features=32)
    assert model.training and net.training  # the probe leaves the mode as it was
    assert (type(model.neck).__name__ == "ViTPyramid") == (which != "swin")  # Swin: its stages as they are
    for h, w in sizes:
        out = model(torch.randn(2, 3, h, w))
        assert set(out) == {"depth"}
        d = out["depth"]
        assert d.shape == (2, 1, h, w)
        assert torch.isfinite(d).all() and (d > 0).all() and (d < 10.0).all()
    model.zero_grad()
    SiLogLoss()(model(torch.randn(2, 3, *sizes[0]))["depth"], torch.rand(2, 1, *sizes[0]) * 9 + 0.5).backward()
    g = net.patch_embed.proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0  # the loss reaches the patch embedding


def test_swin_built_at_a_wide_size():
    model = DepthEstimator(tiny_swin(img_size=(64, 96)), img_size=(64, 96), features=16)
    assert model(torch.randn(1, 3, 64, 96))["depth"].shape == (1, 1, 64, 96)


def test_wrong_sizes_raise_dense_errors():
    with pytest.raises(DenseError, match=r"60x64.*patch size 16x16"):  # in the constructor: before any data
        DepthEstimator(tiny_vit(dynamic_img_size=True), img_size=(60, 64), features=16)
    model = DepthEstimator(tiny_vit(dynamic_img_size=True), img_size=(64, 64), features=16)
    with pytest.raises(DenseError, match=r"64x72.*patch size 16x16"):  # and in forward
        model(torch.randn(1, 3, 64, 72))
    with pytest.raises(DenseError, match=r"64x64 inputs only.*dynamic_img_size"):  # a fixed-size ViT
        DepthEstimator(tiny_vit(), img_size=(64, 96), features=16)
    with pytest.raises(DenseError, match="patch size 4x4"):
        DepthEstimator(tiny_swin(), img_size=(62, 64), features=16)
    with pytest.raises(DenseError, match="decoder 'glp'"):
        DepthEstimator(tiny_vit(), img_size=(64, 64), decoder="glp")
    with pytest.raises(DenseError, match="forward_intermediates"):
        DepthEstimator(torch.nn.Conv2d(3, 8, 3), img_size=(32, 32))


def test_a_short_training_run_fits_a_toy_batch(one_thread):
    """4 images whose depth is 1 + 8 * their red channel (a smooth random field): 60 Adam steps
    bring the SiLog loss down by a large factor (~0.40 -> ~0.03-0.07; ~2 s on one core)."""
    torch.manual_seed(0)
    model = DepthEstimator(tiny_vit(), img_size=(64, 64), features=32)
    gen = torch.Generator().manual_seed(0)
    red = F.interpolate(torch.rand(4, 1, 4, 4, generator=gen), size=(64, 64), mode="bilinear", align_corners=False)
    x = torch.cat([red, 0.2 * torch.rand(4, 2, 64, 64, generator=gen)], dim=1)  # (4, 3, 64, 64)
    y = 1.0 + 8.0 * red  # (4, 1, 64, 64), 1..9 m
    loss_fn = SiLogLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = loss_fn(model(x)["depth"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-10:]) < losses[0] / 5, losses
    assert losses[-1] < losses[0] / 3, losses
