"""Weighted k-nearest-neighbour classification on frozen features (DINO's ``eval_knn``:
Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, Sec. 4.1 /
Appendix; k = 20, T = 0.07).

Every feature is L2-normalised; a test sample's k nearest training samples by cosine
similarity ``s`` vote for their class with weight ``exp(s / T)``; the class scores are the summed
votes. Written by hand (no library ships it as a function) and streamed: the test set is
processed in batches and the training set in chunks whose top-k are merged, so memory stays
``O(test_batch * (train_chunk + k))`` however large both sets are (never the N x M matrix).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["knn_scores", "knn_classify", "topk_accuracy"]


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    k: int = 20,
    T: float = 0.07,
    num_classes: Optional[int] = None,
    normalize: bool = True,
    test_batch: int = 256,
    train_chunk: int = 65536,
    progress: bool = False,
) -> torch.Tensor:
    """Class scores of a weighted k-NN vote.

    Args:
        train_feats: (N, D) training features.
        train_labels: (N,) integer labels in ``[0, num_classes)``.
        test_feats: (M, D) test features (same device as ``train_feats``).
        k: neighbours per test sample (clamped to N).
        T: temperature of the vote weights ``exp(cos_sim / T)``.
        num_classes: number of classes (default: ``max(train_labels) + 1``).
        normalize: L2-normalise the features first (DINO does; pass False if already done).
        test_batch, train_chunk: streaming sizes (memory ``test_batch * (train_chunk + k)``).
        progress: show a tqdm bar over the test batches.

    Returns:
        (M, num_classes) float32 scores: ``scores[i, c] = sum_{j in kNN(i), y_j = c} exp(s_ij / T)``.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2:
        raise ValueError(f"features must be (N, D); got train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train features have {train_feats.shape[1]} dims, test features {test_feats.shape[1]}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels must be ({train_feats.shape[0]},), got {tuple(train_labels.shape)}")
    if train_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one training sample")
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    train_labels = train_labels.to(device=train_feats.device, dtype=torch.long)
    if int(train_labels.min()) < 0:
        raise ValueError("k-NN needs labelled training samples (found label < 0)")
    C = int(num_classes) if num_classes is not None else int(train_labels.max()) + 1
    if int(train_labels.max()) >= C:
        raise ValueError(f"train label {int(train_labels.max())} >= num_classes {C}")
    k = max(1, min(int(k), train_feats.shape[0]))

    xtr = train_feats.float()
    xte = test_feats.to(xtr.device).float()
    if normalize:
        xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    M = xte.shape[0]
    scores = torch.zeros(M, C, device=xtr.device)
    starts = range(0, M, test_batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="k-NN", unit="batch", total=len(starts))
    for s in starts:
        q = xte[s:s + test_batch]  # (b, D)
        best_sim = best_idx = None
        for c0 in range(0, xtr.shape[0], train_chunk):
            sim = q @ xtr[c0:c0 + train_chunk].T  # (b, chunk)
            kk = min(k, sim.shape[1])
            v, i = sim.topk(kk, dim=1)  # (b, kk)
            i = i + c0
            if best_sim is not None:  # merge with the running top-k
                v, j = torch.cat((best_sim, v), 1).topk(min(k, best_sim.shape[1] + kk), dim=1)
                i = torch.gather(torch.cat((best_idx, i), 1), 1, j)
            best_sim, best_idx = v, i
        w = (best_sim / T).exp()  # (b, k)
        scores[s:s + q.shape[0]].scatter_add_(1, train_labels[best_idx], w)
    return scores


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: Optional[int] = None,
    **kwargs,
) -> torch.Tensor:
    """Predicted class per test sample, (M,) long; ties go to the lower class index.
    See :func:`knn_scores` for the arguments."""
    scores = knn_scores(train_feats, train_labels, test_feats, k=k, T=T, num_classes=num_classes, **kwargs)
    return scores.argmax(dim=1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[str, float]:
    """``{"top1": %, "top5": %}`` of (M, C) scores against (M,) labels, in percent. A k larger
    than the number of classes is left out (top-5 of a 3-class problem means nothing)."""
    labels = labels.to(scores.device)
    out = {}
    M, C = scores.shape
    if M == 0:
        raise ValueError("no samples to score")
    maxk = min(max(ks), C)
    pred = scores.topk(maxk, dim=1).indices  # (M, maxk)
    hit = pred.eq(labels.view(-1, 1))
    for kk in ks:
        if kk <= C:
            out[f"top{kk}"] = float(hit[:, :kk].any(dim=1).float().mean()) * 100.0
    return out
