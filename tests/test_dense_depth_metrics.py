"""NYUv2 depth metrics against values worked out by hand (issue 14)."""
import math

import pytest
import torch

from fdistill.dense.depth_metrics import EIGEN_CROP, DepthMetrics

GT = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
PRED = torch.tensor([[[1.0, 1.0], [8.0, 8.0]]])  # exact, half, double, exact


def test_one_image_by_hand():
    m = DepthMetrics(eigen_crop=False)
    m.update(PRED, GT)
    r = m.compute()
    ln2 = math.log(2.0)
    # max(gt/pred, pred/gt) = 1, 2, 2, 1: half the pixels within 1.25, 1.25^2 and 1.25^3 (< 2)
    assert r["d1"] == r["d2"] == r["d3"] == 0.5
    assert r["abs_rel"] == pytest.approx((0 + 1 / 2 + 4 / 4 + 0) / 4)
    assert r["sq_rel"] == pytest.approx((0 + 1 / 2 + 16 / 4 + 0) / 4)
    assert r["rmse"] == pytest.approx(math.sqrt((0 + 1 + 16 + 0) / 4))
    assert r["rmse_log"] == pytest.approx(ln2 * math.sqrt(0.5))
    assert r["log10"] == pytest.approx(math.log10(2.0) / 2)
    assert r["silog"] == pytest.approx(100 * math.sqrt(ln2 ** 2 / 2))  # the log errors' mean is 0
    assert r["images"] == 1


def test_images_are_averaged_not_pixels_and_invalid_pixels_are_left_out():
    m = DepthMetrics(eigen_crop=False)
    gt2 = torch.tensor([[[3.0, 3.0], [20.0, 0.0]]])  # 20 m > max depth, 0: no measurement
    pred2 = torch.tensor([[[3.0, 3.0], [1.0, 5.0]]])  # perfect on its two valid pixels
    m.update(torch.cat([PRED, pred2]), torch.cat([GT, gt2]))
    r = m.compute()
    assert r["images"] == 2 and r["d1"] == pytest.approx(0.75)
    assert r["rmse"] == pytest.approx(math.sqrt(17 / 4) / 2) and r["abs_rel"] == pytest.approx(0.375 / 2)
    m2 = DepthMetrics(eigen_crop=False)
    m2.update(torch.full((1, 2, 2), 50.0), torch.full((1, 2, 2), 2.0))  # clamped to 10 m first
    assert m2.compute()["rmse"] == pytest.approx(8.0)


def test_the_eigen_crop_ignores_the_border():
    gt = torch.full((1, 480, 640), 2.0)
    pred = gt.clone()
    border = torch.ones_like(gt, dtype=torch.bool)
    border[..., EIGEN_CROP[0], EIGEN_CROP[1]] = False
    pred[border] = 9.0  # wrong only outside the crop
    m = DepthMetrics()
    m.update(pred, gt)
    assert m.compute()["rmse"] == 0.0 and m.compute()["d1"] == 1.0
    with pytest.raises(ValueError, match="480 x 640"):
        DepthMetrics().update(torch.ones(1, 4, 4), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        DepthMetrics(eigen_crop=False).update(torch.ones(1, 4, 4), torch.ones(1, 4, 5))
