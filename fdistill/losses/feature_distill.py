"""The feature-distillation objective of Wei et al. (arXiv 2205.14141, Sec. 3).

The student's projected token map ``g(s)`` regresses the teacher's token map ``t`` after a
parameter-free normalisation ``n(t)`` ("feature whitening", Sec. 3.1: a LayerNorm without
affine parameters over channels, per token)::

    l_i  = mean_c SmoothL1_beta( g(s)_{i,c} - n(t)_{i,c} )            beta = 2.0
    loss = sum_i w_i * l_i / sum_i w_i,   w_i = cls_weight for prefix tokens, 1 for patches

``cls_weight = 1`` is exactly the official code (``nn.SmoothL1Loss(beta=2.0)`` averaged over
every element); the paper's default up-weights the [CLS] token by 10.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

NORMS = ("standardize", "l2", "none")
GRANULARITIES = ("full", "gap", "cls")

__all__ = ["feature_distill_loss", "feature_distill_loss_parts", "normalize_target", "NORMS", "GRANULARITIES"]


def normalize_target(target: torch.Tensor, norm: str = "standardize") -> torch.Tensor:
    """Normalise teacher tokens (..., C) over channels, per token.

    ``standardize``: zero mean, unit variance (LayerNorm without affine, eps 1e-5, as the
    official ``nn.LayerNorm(C, elementwise_affine=False)``; the paper's whitening).
    ``l2``: unit L2 norm. ``none``: unchanged.
    """
    if norm == "standardize":
        return F.layer_norm(target, target.shape[-1:], eps=1e-5)
    if norm == "l2":
        return F.normalize(target, dim=-1)
    if norm == "none":
        return target
    raise ValueError(f"unknown target norm {norm!r}; expected one of {NORMS}")


def _pool_gap(x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    # (B, P+N, C) -> (B, 1, C): global average of the patch tokens only
    return x[:, num_prefix_tokens:].mean(dim=1, keepdim=True)


def feature_distill_loss_parts(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 2.0,
    norm: str = "standardize",
    cls_weight: float = 10.0,
    num_prefix_tokens: int = 1,
    granularity: str = "full",
    token_weight: torch.Tensor | None = None,
    per_sample: bool = False,
    cosine_weight: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """Feature-distillation loss and its parts (prefix / patch terms), all 0-dim fp32 tensors.

    Args:
        pred: (B, P+N, C) projected student tokens, prefix tokens first.
        target: (B, P+N, C) raw teacher tokens (normalised here, with ``norm``), same layout.
        beta: smooth-L1 transition point (paper: 2.0).
        norm: target normalisation, one of ``standardize`` | ``l2`` | ``none``.
        cls_weight: weight of each prefix token relative to a patch token (paper: 10).
        num_prefix_tokens: P, the number of leading prefix tokens in both maps (0 for a
            patch-only map).
        granularity: ``full`` every token; ``gap`` the average of the patch tokens of both maps
            (normalised after pooling); ``cls`` the prefix tokens only (paper Table 4).
        token_weight: optional (B, P+N) extra per-token weight (e.g. 0 for tokens that a
            student did not compute); multiplies the prefix/patch weights.

        cosine_weight: adds ``cosine_weight x (1 - cos(pred, target))`` per token (RADIO / UNIC's
            cosine + smooth-L1 with 1; 0, FD: smooth-L1 alone).
        per_sample: also return ``loss_per_sample`` (B,), each sample's weighted mean (not
            detached; for per-sample balancing across teachers, :mod:`fdistill.multi`).

    Returns:
        ``loss`` (the weighted mean), ``loss_prefix`` and ``loss_patch`` (unweighted means of
        the per-token losses of each group; 0 when the group is empty).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.dim() != 3:
        raise ValueError(f"expected (B, N, C) token maps, got {tuple(pred.shape)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    P = int(num_prefix_tokens)
    if not 0 <= P <= pred.shape[1]:
        raise ValueError(f"num_prefix_tokens={P} outside [0, {pred.shape[1]}]")
    pred = pred.float()
    target = target.detach().float()  # the teacher is a fixed target

    if granularity == "gap":
        if P == pred.shape[1]:
            raise ValueError("granularity='gap' needs patch tokens")
        pred, target = _pool_gap(pred, P), _pool_gap(target, P)
        P, token_weight = 0, None
    elif granularity == "cls":
        if P == 0:
            raise ValueError("granularity='cls' needs a prefix token, but num_prefix_tokens=0")
        pred, target = pred[:, :P], target[:, :P]
        token_weight = None if token_weight is None else token_weight[:, :P]

    target = normalize_target(target, norm)
    per_token = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(dim=-1)  # (B, T)
    if cosine_weight:
        per_token = per_token + float(cosine_weight) * (1.0 - F.cosine_similarity(pred, target, dim=-1))

    w = torch.ones_like(per_token)
    w[:, :P] = float(cls_weight)
    if token_weight is not None:
        w = w * token_weight.to(w.dtype)
    loss = (per_token * w).sum() / w.sum().clamp_min(1e-12)

    zero = per_token.new_zeros(())
    loss_prefix = per_token[:, :P].mean() if P > 0 else zero
    loss_patch = per_token[:, P:].mean() if per_token.shape[1] > P else zero
    out = {"loss": loss, "loss_prefix": loss_prefix.detach(), "loss_patch": loss_patch.detach()}
    if per_sample:
        out["loss_per_sample"] = (per_token * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-12)  # (B,)
    return out


def feature_distill_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 2.0,
    norm: str = "standardize",
    cls_weight: float = 10.0,
    num_prefix_tokens: int = 1,
    granularity: str = "full",
) -> torch.Tensor:
    """The FD loss as one 0-dim tensor; see :func:`feature_distill_loss_parts`."""
    return feature_distill_loss_parts(
        pred, target, beta=beta, norm=norm, cls_weight=cls_weight,
        num_prefix_tokens=num_prefix_tokens, granularity=granularity,
    )["loss"]
