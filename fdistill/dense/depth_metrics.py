"""Monocular depth metrics as the field reports them on NYUv2 (Eigen et al. 2014; the BTS /
GLPDepth / Depth-Anything evaluation code): per image, over the valid pixels, then the mean over
images. The paper's Table 1 column is RMSE (CLIP ViT-B/16 0.416 -> FD 0.352).

Valid pixels: ``min_depth < gt < max_depth`` (1e-3 and 10 m for NYUv2) and, with ``eigen_crop``,
inside the standard crop of the 480 x 640 frame (rows 45:471, columns 41:601). Predictions are
clamped to ``[min_depth, max_depth]`` first, as those codes do.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

__all__ = ["DepthMetrics", "EIGEN_CROP", "NAMES"]

#: rows, columns of the Eigen crop of a 480 x 640 NYUv2 frame
EIGEN_CROP = (slice(45, 471), slice(41, 601))
NAMES = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


class DepthMetrics:
    """Accumulates per-image metrics over batches; :meth:`compute` returns their means.

    >>> m = DepthMetrics(eigen_crop=False)
    >>> m.update(torch.tensor([[[1.0, 1.0], [8.0, 8.0]]]), torch.tensor([[[1.0, 2.0], [4.0, 8.0]]]))
    >>> round(m.compute()["abs_rel"], 4), round(m.compute()["rmse"], 4)
    (0.375, 2.0616)
    """

    def __init__(self, *, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = True):
        self.min_depth, self.max_depth, self.eigen_crop = float(min_depth), float(max_depth), bool(eigen_crop)
        self.sums = torch.zeros(len(NAMES), dtype=torch.float64)
        self.images = 0

    def _valid(self, gt: torch.Tensor) -> torch.Tensor:
        valid = (gt > self.min_depth) & (gt < self.max_depth)
        if self.eigen_crop:
            if gt.shape[-2:] != (480, 640):
                raise ValueError(f"the Eigen crop is defined on 480 x 640 depth maps, got {tuple(gt.shape[-2:])}")
            crop = torch.zeros_like(valid)
            crop[..., EIGEN_CROP[0], EIGEN_CROP[1]] = True
            valid &= crop
        return valid

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """``pred``, ``gt``: (B, H, W) depths in metres (``pred`` already at ``gt``'s size)."""
        if pred.shape != gt.shape or pred.ndim != 3:
            raise ValueError(f"pred and gt must both be (B, H, W), got {tuple(pred.shape)} and {tuple(gt.shape)}")
        pred = pred.detach().double().cpu().clamp(self.min_depth, self.max_depth)
        gt = gt.detach().double().cpu()
        valid = self._valid(gt)
        for p, g, v in zip(pred, gt, valid):
            if not v.any():  # an image without a valid pixel says nothing
                continue
            p, g = p[v], g[v]
            thresh = torch.maximum(g / p, p / g)
            err = torch.log(p) - torch.log(g)
            vals = torch.stack([
                (thresh < 1.25).double().mean(), (thresh < 1.25 ** 2).double().mean(),
                (thresh < 1.25 ** 3).double().mean(),
                ((g - p).abs() / g).mean(), ((g - p) ** 2 / g).mean(),
                ((g - p) ** 2).mean().sqrt(), (err ** 2).mean().sqrt(),
                (torch.log10(g) - torch.log10(p)).abs().mean(),
                ((err ** 2).mean() - err.mean() ** 2).clamp_min(0).sqrt() * 100.0,
            ])
            self.sums += vals
            self.images += 1

    def merge(self, sums: torch.Tensor, images: int) -> None:
        """Add another accumulator's sums (e.g. all-reduced from other ranks)."""
        self.sums += sums.double().cpu()
        self.images += int(images)

    def compute(self) -> Dict[str, Optional[float]]:
        if self.images == 0:
            return {k: math.nan for k in NAMES} | {"images": 0}
        means = (self.sums / self.images).tolist()
        return dict(zip(NAMES, means)) | {"images": self.images}
