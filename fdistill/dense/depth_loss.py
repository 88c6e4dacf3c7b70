"""The scale-invariant log (SiLog) loss that monocular-depth training on NYUv2 uses (Eigen et al.,
"Depth Map Prediction from a Single Image using a Multi-Scale Deep Network", 2014; in the square-root
form of BTS, Lee et al. 2019, and GLPDepth, Kim et al. 2022):

    g_i  = log(pred_i) - log(target_i)             over the valid pixels i
    loss = scale * sqrt(mean(g^2) - lambd * mean(g)^2)

* ``lambd``: 0.85 by default, BTS's ``variance_focus`` (and the Monocular-Depth-Estimation-Toolbox's
  ``SigLoss``, which writes it as ``var(g) + 0.15 * mean(g)^2``, up to ``torch.var``'s n / (n - 1));
  GLPDepth's code defaults to 0.5.
  ``lambd = 1`` is fully scale invariant (the variance of ``g``), ``lambd = 0`` the RMS log error.
* ``scale``: 1.0 by default, as GLPDepth and the Toolbox (``loss_weight=1.0``) use; BTS multiplies
  by 10 (``scale=10.0``).
* the means pool every valid pixel of the batch (``g = log(pred[mask]) - log(target[mask])``, one
  mean over the batch, not a mean of per-image losses), as BTS, GLPDepth and the Toolbox all do.
* valid pixels: ``min_depth < target <= max_depth`` (the Toolbox's ``target > 0`` and
  ``<= max_depth``, with NYUv2's 1e-3 floor of :mod:`fdistill.dense.depth_metrics`), finite, and
  inside an optional explicit ``valid`` mask.

Written here, not imported, because none of those codes installs as a package (transformers'
``GLPNForDepthEstimation`` carries a copy, ``target > 0`` only, no bounds, no mask argument) and
two numerical guards are added: ``pred`` is clamped to ``eps`` before the log, and the square root
is taken of ``max(D, 0)`` with a linear piece below ``eps`` (``D / sqrt(eps)``, continuous at
``eps``), so the loss is exactly 0 at ``pred == target`` and its gradient is finite there (the
plain ``sqrt`` has an infinite slope at 0, which gives NaN gradients on a perfect fit).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["SiLogLoss"]


class SiLogLoss(nn.Module):
    """``scale * sqrt(mean(g^2) - lambd * mean(g)^2)``, ``g = log(pred) - log(target)`` over the
    batch's valid pixels (module doc). No valid pixel: 0, still attached to ``pred``'s graph.

    >>> t = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
    >>> round(float(SiLogLoss()(2 * t, t)), 4)   # g = log 2 everywhere: sqrt(0.15) * log 2
    0.2685
    """

    def __init__(self, lambd: float = 0.85, eps: float = 1e-6, *, scale: float = 1.0,
                 min_depth: float = 1e-3, max_depth: Optional[float] = 10.0):
        super().__init__()
        if not 0.0 <= lambd <= 1.0:
            raise ValueError(f"lambd must be in [0, 1] (1: scale invariant), got {lambd}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.lambd, self.eps, self.scale = float(lambd), float(eps), float(scale)
        self.min_depth = float(min_depth)
        self.max_depth = None if max_depth is None else float(max_depth)

    def valid_mask(self, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pixels the loss sees: ``min_depth < target <= max_depth``, finite, and ``valid``."""
        mask = torch.isfinite(target) & (target > self.min_depth)
        if self.max_depth is not None:
            mask &= target <= self.max_depth
        if valid is not None:
            mask &= valid.to(torch.bool).reshape(target.shape)
        return mask

    def forward(self, pred: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """``pred``, ``target``: depths in metres, (B, 1, H, W) or (B, H, W) (``pred`` already at
        ``target``'s size); ``valid``: an optional boolean mask of the same size."""
        if pred.ndim == 4 and pred.shape[1] == 1:
            pred = pred[:, 0]  # (B, H, W)
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if valid is not None and valid.ndim == 4 and valid.shape[1] == 1:
            valid = valid[:, 0]
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have one size (resize pred to the target first), "
                             f"got {tuple(pred.shape)} and {tuple(target.shape)}")
        if valid is not None and valid.shape != target.shape:
            raise ValueError(f"valid must be target's size {tuple(target.shape)}, got {tuple(valid.shape)}")
        mask = self.valid_mask(target.detach(), valid)
        if not bool(mask.any()):
            return pred.sum() * 0.0  # 0, with a gradient path (zero gradients), never NaN
        p = pred[mask].float().clamp_min(self.eps)  # (N,) over the whole batch
        t = target[mask].float()
        g = torch.log(p) - torch.log(t)
        d = (g.square().mean() - self.lambd * g.mean().square()).clamp_min(0.0)  # >= 0 up to rounding
        # sqrt(d) above eps; below, the line d / sqrt(eps) (same value at eps, finite slope at 0)
        root = torch.where(d > self.eps, torch.sqrt(torch.where(d > self.eps, d, torch.ones_like(d))),
                           d / math.sqrt(self.eps))
        return self.scale * root

    def extra_repr(self) -> str:
        return (f"lambd={self.lambd}, eps={self.eps}, scale={self.scale}, min_depth={self.min_depth}, "
                f"max_depth={self.max_depth}")
