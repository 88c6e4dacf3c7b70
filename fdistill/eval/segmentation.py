"""Linear semantic segmentation probe: a dense evaluation of frozen token maps.

The paper reports FD's gains on dense tasks too (ADE20K semantic segmentation, COCO detection,
NYUv2 depth) after full fine-tuning with task heads (UperNet, Mask R-CNN). The cheap, standard way to
compare two backbones' *dense* features side by side is DINOv2's linear segmentation evaluation
(Oquab et al. 2023, the "linear" setting): the frozen model's output patch tokens, as a (C, gh, gw)
map, go through BatchNorm and a 1x1 convolution to K class logits per token, bilinearly upsampled
to the label map and trained with per-pixel cross-entropy (ignored pixels left out). Reported:
mIoU (mean over classes of TP / (TP + FP + FN), classes absent from both prediction and ground
truth left out, as mmsegmentation does), pixel accuracy (aAcc) and mean class accuracy (mAcc).

Written here rather than taken from mmsegmentation: that would add mmcv/mmengine and their
config system for what is a few dozen lines on top of fdistill's adapters (every teacher and FD
student gives ``forward_tokens``). Tokens are computed on the fly under ``no_grad`` each step (augmented crops).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..teachers.base import Teacher
from .data import frozen_forward, probe_loaders

__all__ = ["SegLinearHead", "token_map", "confusion_matrix", "segmentation_scores", "seg_linear_probe"]


class SegLinearHead(nn.Module):
    """DINOv2's linear head: BatchNorm2d + 1x1 conv, (B, C, gh, gw) -> (B, K, gh, gw)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(fmap))


def token_map(adapter: Teacher, images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> the output patch tokens as a (B, C, gh, gw) map."""
    t = adapter.forward_tokens(images)  # the adapter checks that the patches fill the grid
    (gh, gw), (B, _, C) = t.grid, t.patches.shape
    return t.patches.transpose(1, 2).reshape(B, C, gh, gw)  # row-major tokens -> (B, C, gh, gw)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels skipped."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor, classes: Optional[List[str]] = None) -> Dict[str, Any]:
    """mIoU, aAcc, mAcc (percent) and per-class IoU of a (K, K) confusion matrix.

    IoU_k = TP / (TP + FP + FN); a class with no pixel in the ground truth nor the prediction has
    no IoU (``None``) and is left out of the mean; mAcc averages TP / (TP + FN) over classes that
    occur in the ground truth."""
    c = conf.double()
    tp = c.diag()
    gt, pr = c.sum(1), c.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
    total = float(c.sum())
    names = classes or [str(i) for i in range(conf.shape[0])]
    return dict(miou=100.0 * float(iou.nanmean()) if bool((union > 0).any()) else float("nan"),
                aacc=100.0 * float(tp.sum()) / total if total else float("nan"),
                macc=100.0 * float(acc.nanmean()) if bool((gt > 0).any()) else float("nan"),
                per_class_iou={n: (None if v != v else round(100.0 * v, 4)) for n, v in zip(names, iou.tolist())})


def _logits(head: nn.Module, fmap: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(head(fmap.float()), size=size, mode="bilinear", align_corners=False)


def seg_linear_probe(
    adapter: Teacher,
    train_ds,
    val_ds,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_epochs: float = 1.0,
    batch_size: int = 16,
    num_workers: int = 8,
    precision: str = "fp32",
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_steps: Optional[int] = None,
    progress: bool = True,
    figure: Optional[str | os.PathLike] = None,
    figure_images: int = 6,
) -> Dict[str, Any]:
    """Train :class:`SegLinearHead` on ``adapter``'s frozen token maps and score it on ``val_ds``.

    ``train_ds`` / ``val_ds`` give (uint8 image (3, S, S), int64 mask (S, S)) with ``classes``
    and ``ignore_index`` (:func:`fdistill.data.segmentation.build_segmentation_dataset`). AdamW at
    ``lr`` with linear warm-up and cosine decay (per step). With ``figure``, the first
    ``figure_images`` validation images, their label maps and the predictions are drawn there
    (:func:`fdistill.eval.segmentation_figure.plot_segmentation_examples`)."""
    from tqdm.auto import tqdm

    from ..data import DataError
    from ..engine.schedule import create_warmup_cosine

    device = torch.device(device)
    torch.manual_seed(seed)
    classes = list(train_ds.classes)
    if list(val_ds.classes) != classes:
        raise DataError(f"train and val classes differ ({len(classes)} vs {len(val_ds.classes)})")
    ignore = int(getattr(train_ds, "ignore_index", 255))
    K = len(classes)
    adapter = adapter.to(device).eval()
    train_loader, val_loader = probe_loaders(train_ds, val_ds, batch_size=batch_size, num_workers=num_workers,
                                             seed=seed, device=device)
    fmap_of = frozen_forward(adapter, lambda a, x: token_map(a, x).float(), device=device, precision=precision)

    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise DataError("the training loader gave no batches")
    total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
    head: Optional[SegLinearHead] = None
    step, loss_sum, curve = 0, torch.zeros((), device=device), []
    for epoch in range(epochs):
        bar = tqdm(train_loader, desc=f"segprobe {epoch + 1}/{epochs}", unit="step", disable=not progress,
                   dynamic_ncols=True)
        epoch_loss = torch.zeros((), device=device)
        n_epoch = 0
        for images, masks in bar:
            f = fmap_of(images)  # (B, C, gh, gw)
            if head is None:  # the token width is known after the first batch
                head = SegLinearHead(f.shape[1], K).to(device)
                opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
                sched = create_warmup_cosine(opt, peak_lr=lr, total_steps=total,
                                             warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
                                             warmup_lr=lr * 1e-3, min_lr=0.0)
                sched.step_update(0)
            y = masks.to(device, non_blocking=True)
            # mean over the labelled pixels; a batch with none (all ignored) gives 0, not NaN
            loss = F.cross_entropy(_logits(head, f, y.shape[-2:]), y, ignore_index=ignore, reduction="sum") \
                / (y != ignore).sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            loss_sum += loss.detach()
            epoch_loss += loss.detach()
            n_epoch += 1
            if step >= total:
                break
        bar.close()
        mean_loss = float(epoch_loss) / max(n_epoch, 1)  # one host sync per epoch, none per step
        if not math.isfinite(mean_loss):
            raise DataError(f"segprobe: non-finite training loss in epoch {epoch + 1} (lower the lr; check the "
                            "images for NaN)")
        curve.append(dict(epoch=epoch + 1, step=step, train_loss=mean_loss))
        if step >= total:
            break
    head.eval()
    conf = torch.zeros(K, K, dtype=torch.long, device=device)
    shown: List[tuple] = []  # (images, masks, predictions) on the CPU, for the figure
    with torch.no_grad():
        for images, masks in tqdm(val_loader, desc="segprobe eval", unit="batch", disable=not progress, leave=False):
            y = masks.to(device, non_blocking=True)
            pred = _logits(head, fmap_of(images), y.shape[-2:]).argmax(1)
            conf += confusion_matrix(pred, y, K, ignore)
            if figure is not None and sum(len(b[0]) for b in shown) < figure_images:
                shown.append((images.cpu(), masks.cpu(), pred.cpu()))
    res = segmentation_scores(conf.cpu(), classes)
    if figure is not None and shown:
        from .segmentation_figure import plot_segmentation_examples

        imgs, gts, prs = (torch.cat(t)[:figure_images] for t in zip(*shown))
        name = str(getattr(adapter, "name", "model"))
        name = name if len(name) <= 48 else "..." + name[-45:]  # a run's checkpoint path can be long
        res["figure"] = str(plot_segmentation_examples(
            imgs, gts, prs, classes, figure, ignore_index=ignore,
            title=f"{name}: linear segmentation probe, mIoU {res['miou']:.1f} (first {len(imgs)} val images)"))
    return dict(res, num_classes=K, lr=lr, steps=step, epochs_done=step / steps_per_epoch,
                train_loss=float(loss_sum) / max(step, 1), curve=curve, train_images=len(train_ds),
                val_images=len(val_ds), ignore_index=ignore)
