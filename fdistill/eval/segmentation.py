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
config system for what is a few dozen lines on top of fdistill's backbones (every teacher and FD
student gives ``forward_tokens``). Tokens are computed on the fly under ``no_grad`` each step (augmented crops).
The loop is the project's :class:`~fdistill.engine.trainer.Trainer` (:class:`SegProbeTask`): checkpoints,
exact resume, ``torchrun``, the one non-finite policy.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.trainer import Task
from ..backbone import Backbone

from .data import frozen_forward, probe_loaders, probe_run_folder

__all__ = ["SegLinearHead", "token_map", "confusion_matrix", "segmentation_scores", "SegProbeTask", "seg_linear_probe"]


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


def token_map(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> the output patch tokens as a (B, C, gh, gw) map."""
    t = backbone.forward_tokens(images)  # the backbone checks that the patches fill the grid
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


class _SegLoss(nn.Module):
    """Per-pixel cross-entropy of the upsampled logits, the mean over labelled pixels (a batch
    with none, all ignored, gives 0, not NaN)."""

    def __init__(self, head: nn.Module, ignore_index: int):
        super().__init__()
        self.head, self.ignore = head, ignore_index

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        fmap, y = batch  # (B, C, gh, gw) frozen tokens, (B, H, W) labels
        loss = F.cross_entropy(_logits(self.head, fmap, y.shape[-2:]), y, ignore_index=self.ignore,
                               reduction="sum") / (y != self.ignore).sum().clamp_min(1)
        return {"loss": loss}


class SegProbeTask(Task):
    """The linear segmentation probe as a task of :class:`~fdistill.engine.trainer.Trainer`: the
    head is the trained model; each batch's token map comes from the frozen backbone in
    :meth:`prepare`; scored (confusion matrix summed over ranks) after the last epoch."""

    name = "segprobe"

    def __init__(self, head: SegLinearHead, fmap_of, val_loader, *, num_classes: int, ignore_index: int,
                 env, device: torch.device, figure_images: int = 0):
        self.model, self.fmap_of, self.val_loader = head, fmap_of, val_loader
        self.K, self.ignore, self.env, self.device = num_classes, ignore_index, env, device
        self.figure_images = figure_images
        self.conf: Optional[torch.Tensor] = None
        self.shown: List[tuple] = []  # (images, masks, predictions) on the CPU, for the figure

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _SegLoss(model, self.ignore)

    def prepare(self, batch):
        images, masks = batch
        return self.fmap_of(images), masks.to(self.device, non_blocking=True)  # (B, C, gh, gw), (B, H, W)

    @torch.no_grad()
    def evaluate(self, model, ema, epoch: int, step: int) -> Dict[str, Any]:
        from ..engine.distributed import all_reduce_sum_

        model.eval()
        conf = torch.zeros(self.K, self.K, dtype=torch.long, device=self.device)
        self.shown = []
        for images, masks in self.val_loader:
            y = masks.to(self.device, non_blocking=True)
            pred = _logits(model, self.fmap_of(images), y.shape[-2:]).argmax(1)
            conf += confusion_matrix(pred, y, self.K, self.ignore)
            if sum(len(b[0]) for b in self.shown) < self.figure_images:
                self.shown.append((images.cpu(), masks.cpu(), pred.cpu()))
        model.train()
        self.conf = all_reduce_sum_(conf, self.env).cpu()  # every rank scored its share of the images
        scores = segmentation_scores(self.conf)
        return {"epoch": epoch + 1, "step": step, **{k: scores[k] for k in ("miou", "aacc", "macc")}}


def seg_linear_probe(
    backbone: Backbone,
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
    max_nonfinite: int = 20,
    output_dir: Optional[str | os.PathLike] = None,
    resume: Optional[str] = "auto",
    env=None,
    progress: bool = True,
    on_step=None,
    figure: Optional[str | os.PathLike] = None,
    figure_images: int = 6,
) -> Dict[str, Any]:
    """Train :class:`SegLinearHead` on ``backbone``'s frozen token maps and score it on ``val_ds``.

    ``train_ds`` / ``val_ds`` give (uint8 image (3, S, S), int64 mask (S, S)) with ``classes``
    and ``ignore_index`` (:func:`fdistill.data.segmentation.build_segmentation_dataset`). AdamW at
    ``lr`` with linear warm-up and cosine decay (per step); ``batch_size`` is per process
    (``torchrun``: ``env``). ``output_dir`` gets ``checkpoints/`` and ``metrics.jsonl`` (a stopped
    probe resumes exactly with ``resume="auto"``); None: a temporary folder, removed afterwards.
    A step with a non-finite loss is skipped; ``max_nonfinite`` in a row stop the probe with a
    :class:`~fdistill.errors.RunError` (the engine's policy). With ``figure``, the first
    ``figure_images`` validation images, their label maps and the predictions are drawn there
    (:func:`fdistill.eval.segmentation_figure.plot_segmentation_examples`)."""
    from ..data import DataError
    from ..engine.distributed import DistEnv
    from ..engine.schedule import create_warmup_cosine
    from ..engine.trainer import Trainer, TrainerConfig

    device = torch.device(device)
    env = env or DistEnv(device=device)
    torch.manual_seed(seed + env.rank)
    classes = list(train_ds.classes)
    if list(val_ds.classes) != classes:
        raise DataError(f"train and val classes differ ({len(classes)} vs {len(val_ds.classes)})")
    ignore = int(getattr(train_ds, "ignore_index", 255))
    K = len(classes)
    backbone = backbone.to(device).eval()
    sampler, train_loader, val_loader, steps_per_epoch = probe_loaders(
        train_ds, val_ds, batch_size=batch_size, num_workers=num_workers, seed=seed, device=device, env=env)
    fmap_of = frozen_forward(backbone, lambda a, x: token_map(a, x).float(), device=device, precision=precision)
    total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, int(max_steps))

    width = fmap_of(torch.as_tensor(val_ds[0][0])[None]).shape[1]  # from one evaluation image: no random draw
    head = SegLinearHead(width, K).to(device)
    if env.distributed and device.type == "cuda":
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)  # the statistics of the global batch
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = create_warmup_cosine(opt, peak_lr=lr, total_steps=total, warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
                                 warmup_lr=lr * 1e-3, min_lr=0.0)
    recipe = dict(model=str(getattr(backbone, "name", "model")), epochs=epochs, warmup_epochs=warmup_epochs, lr=lr,
                  weight_decay=weight_decay, batch_size=batch_size, world_size=env.world_size, precision=precision,
                  seed=seed, max_steps=max_steps, train_images=len(train_ds), num_classes=K, ignore_index=ignore)
    task = SegProbeTask(head, fmap_of, val_loader, num_classes=K, ignore_index=ignore, env=env, device=device,
                        figure_images=figure_images if figure is not None and env.is_main else 0)
    if output_dir is None:
        resume = None  # a temporary folder holds no earlier run
    with probe_run_folder(output_dir, env, "fdistill-segprobe-") as out:
        trainer = Trainer(task, optimizer=opt, scheduler=sched, loader=train_loader, sampler=sampler, output_dir=out,
                          recipe=recipe, resume_safe=("epochs", "max_steps"), env=env, on_step=on_step,
                          config=TrainerConfig(epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                                               batch_size=batch_size, eval_interval=epochs, max_nonfinite=max_nonfinite,
                                               # the head in fp32 (the backbone runs in ``precision`` in prepare)
                                               log_interval=steps_per_epoch, keep_last=1, progress=progress, seed=seed))
        trainer.resume(resume)
        result = trainer.fit()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if env.is_main else []
    # the per-epoch means (a record at each epoch end; the last one also where max_steps ended the run)
    curve = [dict(epoch=math.ceil(r["epoch"] - 1e-9), step=r["step"], train_loss=r["loss"]) for r in records]
    res = segmentation_scores(task.conf, classes) if task.conf is not None else {}
    if figure is not None and task.shown and env.is_main:
        from .segmentation_figure import plot_segmentation_examples

        imgs, gts, prs = (torch.cat(t)[:figure_images] for t in zip(*task.shown))
        name = str(getattr(backbone, "name", "model"))
        name = name if len(name) <= 48 else "..." + name[-45:]  # a run's checkpoint path can be long
        res["figure"] = str(plot_segmentation_examples(
            imgs, gts, prs, classes, figure, ignore_index=ignore,
            title=f"{name}: linear segmentation probe, mIoU {res['miou']:.1f} (first {len(imgs)} val images)"))
    starts = [0] + [c["step"] for c in curve]  # each record's mean covers the steps since the one before
    train_loss = (sum(c["train_loss"] * (c["step"] - s0) for c, s0 in zip(curve, starts)) / curve[-1]["step"]
                  if curve else math.nan)
    return dict(res, num_classes=K, lr=lr, steps=result.step, epochs_done=result.step / steps_per_epoch,
                train_loss=train_loss, curve=curve, train_images=len(train_ds), val_images=len(val_ds),
                ignore_index=ignore, stopped_early=result.stopped_by is not None)
