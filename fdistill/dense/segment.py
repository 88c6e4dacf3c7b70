"""ADE20K-style semantic segmentation fine-tuning (paper Sec. 5, Table 1 "ADE20K"; BEiT's recipe):
the backbone inside :class:`~fdistill.dense.upernet.UperNetSegmenter`, trained end to end on the
engine (:class:`fdistill.engine.trainer.Trainer`) with per-pixel cross-entropy (ignored pixels left
out) plus ``aux_weight`` x the auxiliary FCN head's, and scored by single-scale sliding-window
inference (:func:`~fdistill.dense.sliding.sliding_window`) at each image's original size: mIoU, aAcc, mAcc
(:func:`fdistill.eval.segmentation.segmentation_scores`, mmsegmentation's definitions).

Output folder: ``model_best.safetensors`` / ``model_last.safetensors`` (the whole segmenter),
``checkpoints/`` (the engine's format), ``metrics.jsonl``, ``log.jsonl`` (one line per
evaluation), ``curves.png``, ``predictions.png`` and, from the command, ``metrics.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..eval.data import model_inputs
from ..precision import autocast
from ..eval.segmentation import confusion_matrix, segmentation_scores
from .sliding import sliding_window
from .common import (BestTracker, check_batch_norm_batch, check_datasets, display_name, plot_dense_curves,
                     recipe_config, run_folder, run_metrics, sync_batch_norm, train_dense)
from ..engine.trainer import Task

log = logging.getLogger(__name__)

__all__ = ["build_segmenter", "evaluate_segmenter", "SegmentTask", "finetune_segmentation", "segment_collate"]


def segment_collate(batch):
    """Evaluation batches of images of different sizes: (list of images, list of label maps)."""
    return [b[0] for b in batch], [b[1] for b in batch]


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, loader, *, num_classes: int, ignore_index: int, crop: int, stride: int,
                       mean: Sequence[float], std: Sequence[float], device: torch.device, precision: str = "fp32",
                       env=None, keep: int = 0, progress: bool = False, classes: Optional[List[str]] = None
                       ) -> Dict[str, Any]:
    """mIoU / aAcc / mAcc of ``model`` over ``loader`` (batches from :func:`segment_collate`:
    rescaled uint8 images and label maps at the original size). The confusion matrix is summed on
    the device and over ranks. ``keep``: also return the first ``keep`` (image, label, prediction)
    at the label maps' size, for the figure."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    shown: List[tuple] = []
    for images, masks in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        for img, mask in zip(images, masks):
            x = model_inputs(img.unsqueeze(0), mean, std, device)  # (1, 3, h, w)
            y = mask.to(device)  # (H, W) original size
            with autocast(device, precision):
                logits = sliding_window(model, x, num_classes, crop, stride)
            pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)[0]
            conf += confusion_matrix(pred, y, num_classes, ignore_index)
            if len(shown) < keep:
                small = F.interpolate(img.unsqueeze(0).float(), size=y.shape[-2:], mode="bilinear",
                                      align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
                shown.append((small.cpu(), mask.cpu(), pred.cpu()))
    if env is not None and env.distributed:
        from ..engine.distributed import all_reduce_sum_

        all_reduce_sum_(conf, env)
    model.train(was)
    res = segmentation_scores(conf.cpu(), classes)
    res["shown"] = shown
    return res


class _SegmenterLoss(nn.Module):
    """Cross-entropy over labelled pixels (a crop with none gives 0, not NaN) + the auxiliary head's."""

    def __init__(self, model: nn.Module, *, mean, std, ignore_index: int, aux_weight: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std
        self.ignore, self.aux_weight = ignore_index, aux_weight

    def _ce(self, logits: torch.Tensor, y: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, ignore_index=self.ignore, reduction="sum") / n

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images, masks = batch
        device = next(self.model.parameters()).device
        x = model_inputs(images, self.mean, self.std, device)  # (B, 3, c, c)
        y = masks.to(device, non_blocking=True)  # (B, c, c)
        out = self.model(x)
        with torch.autocast(device.type, enabled=False):
            n = (y != self.ignore).sum().clamp_min(1)
            loss = self._ce(out["logits"], y, n)
            if "aux_logits" in out and self.aux_weight > 0:
                loss = loss + self.aux_weight * self._ce(out["aux_logits"], y, n)
        return {"loss": loss}


class SegmentTask(Task):
    """Segmentation fine-tuning as a task of the engine: the segmenter, its loss, the sliding-window
    mIoU of every evaluation, best (mIoU) and last weights."""

    name = "segment"

    def __init__(self, model: nn.Module, *, val_loader, classes: List[str], ignore_index: int, crop: int,
                 stride: int, mean, std, aux_weight: float, precision: str, env, out: Path, figure_images: int = 0):
        self.model, self.val_loader, self.classes = model, val_loader, classes
        self.ignore, self.crop, self.stride = ignore_index, crop, stride
        self.mean, self.std, self.aux_weight, self.precision, self.env = mean, std, aux_weight, precision, env
        self.device = next(model.parameters()).device
        self.tracker = BestTracker(out, "miou", higher=True, env=env)
        self.figure_images = figure_images
        self.shown: List[tuple] = []

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _SegmenterLoss(model, mean=self.mean, std=self.std, ignore_index=self.ignore,
                              aux_weight=self.aux_weight)

    def evaluate(self, model: nn.Module, ema, epoch: int, step: int) -> Dict[str, Any]:
        res = evaluate_segmenter(model, self.val_loader, num_classes=len(self.classes), ignore_index=self.ignore,
                                 crop=self.crop, stride=self.stride, mean=self.mean, std=self.std,
                                 device=self.device, precision=self.precision, env=self.env,
                                 keep=self.figure_images, classes=self.classes)
        self.shown = res.pop("shown")
        rec = {"epoch": epoch + 1, "step": step, "miou": res["miou"], "aacc": res["aacc"], "macc": res["macc"]}
        self.tracker.update(model, rec)
        self.per_class_iou = res["per_class_iou"]
        log.info("epoch %d: mIoU %.2f (best %.2f)", epoch + 1, rec["miou"], self.tracker.best["miou"])
        return rec

    def state_dict(self) -> Dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)


def build_segmenter(adapter, cfg, num_classes: int):
    """``(model, info)``: the trainable UPerNet of the recipe ``cfg`` on ``adapter``'s network at
    the crop size (:func:`~fdistill.dense.backbone.dense_backbone` ->
    :class:`~fdistill.dense.upernet.UperNetSegmenter`) and what the backbone is; its
    ``load_state_dict`` takes the ``model_*.safetensors`` a run writes."""
    from .backbone import dense_backbone
    from .upernet import UperNetSegmenter

    crop, m = cfg.data.crop_size, cfg.model
    backbone, info = dense_backbone(adapter, img_size=(crop, crop), drop_path_rate=m.drop_path)
    model = UperNetSegmenter(backbone, num_classes, img_size=(crop, crop), indices=m.indices,
                             channels=m.channels, aux_channels=m.aux_channels, aux=m.aux_weight > 0)
    return model, info


def finetune_segmentation(adapter, train_ds, val_ds, cfg, *, output_dir, resume: Optional[str] = "auto",
                          env=None, source: Optional[Dict[str, Any]] = None, on_step=None,
                          progress: bool = True) -> Dict[str, Any]:
    """Fine-tune ``adapter`` (any model :func:`fdistill.models.loading.load_model` gives) inside
    UPerNet on ``train_ds`` and score it on ``val_ds``, with the recipe ``cfg``
    (:class:`fdistill.config.dense.SegmentConfig`); returns the metrics.

    ``train_ds`` gives (uint8 (3, c, c), int64 (c, c)) crops (:class:`fdistill.data.segmentation.
    SegmentationCropTransform`), ``val_ds`` rescaled images with label maps at the original size
    (:class:`~fdistill.data.segmentation.SegmentationRescaleTransform`); both have ``classes`` and
    ``ignore_index``. ``resume``: ``"auto"`` (the newest loadable checkpoint of ``output_dir``), a
    path, or None (start over)."""
    from ..data import DataError
    from ..engine.distributed import DistEnv
    from ..eval.data import make_loader
    from ..precision import resolve_precision

    env = env or DistEnv()
    device = env.device
    out = Path(output_dir)
    classes = list(train_ds.classes)
    if list(val_ds.classes) != classes:
        raise DataError(f"train and val classes differ ({len(classes)} vs {len(val_ds.classes)})")
    ignore = int(getattr(train_ds, "ignore_index", 255))
    crop = cfg.data.crop_size
    precision = resolve_precision(cfg.precision, device.type)
    with run_folder(out, env):
        # the model first: a backbone that cannot give the maps, or a crop it cannot take, is said
        # before any image is read
        model, info = build_segmenter(adapter, cfg, len(classes))
        model = sync_batch_norm(model, env).to(device)
        check_batch_norm_batch(model, cfg.data.batch_size, env, "UPerNet")
        check_datasets([train_ds, val_ds], env, progress=progress)  # bad files fail now, not mid-run
        m = cfg.model
        recipe = dict(command="segment", model=(source or {}).get("spec") or adapter.name, config=recipe_config(cfg),
                      world_size=env.world_size, precision=precision, train_images=len(train_ds),
                      num_classes=len(classes), epochs=cfg.epochs, max_steps=cfg.max_steps,
                      eval_interval=cfg.eval_interval, log_interval=cfg.log_interval,
                      num_workers=cfg.data.num_workers, figure_images=cfg.figure_images)
        val_sub = val_ds if not env.distributed else torch.utils.data.Subset(val_ds, range(env.rank, len(val_ds), env.world_size))
        val_loader = make_loader(val_sub, batch_size=max(1, cfg.data.batch_size // 4), shuffle=False,
                                 num_workers=cfg.data.num_workers, device=device, collate_fn=segment_collate)
        task = SegmentTask(model, val_loader=val_loader, classes=classes, ignore_index=ignore, crop=crop,
                           stride=cfg.data.slide_stride, mean=adapter.mean, std=adapter.std,
                           aux_weight=m.aux_weight, precision=precision, env=env, out=out,
                           figure_images=cfg.figure_images if env.is_main else 0)
        result, steps_per_epoch = train_dense(task, cfg, optimizer_model=model, train_ds=train_ds, output_dir=out,
                                              recipe=recipe, env=env, resume=resume, on_step=on_step,
                                              progress=progress)
        best, last = task.tracker.best or {}, (result.history[-1] if result.history else {})
        metrics = {"miou": best.get("miou"), "aacc": best.get("aacc"), "macc": best.get("macc"),
                   "best_epoch": best.get("epoch"), "last": last, "per_class_iou": getattr(task, "per_class_iou", None),
                   "num_classes": len(classes),
                   **run_metrics(result, steps_per_epoch, env, train_ds=train_ds, val_ds=val_ds, info=info,
                                 precision=precision, device=device)}
        if env.is_main:
            name = display_name(adapter, source)
            curves = plot_dense_curves(out, result.history, "miou", f"{name}: UPerNet fine-tuning")
            metrics["curves"] = str(curves) if curves else None
            if task.shown:
                from ..eval.segmentation_figure import plot_segmentation_examples

                imgs, gts, prs = zip(*task.shown)
                same = len({tuple(g.shape) for g in gts}) == 1
                if same:  # the figure draws one grid; ADE20K's images differ in size, so they are resized
                    imgs, gts, prs = torch.stack(imgs), torch.stack(gts), torch.stack(prs)
                else:
                    imgs, gts, prs = _to_common_size(imgs, gts, prs)
                metrics["figure"] = str(plot_segmentation_examples(
                    imgs, gts, prs, classes, out / "predictions.png", ignore_index=ignore,
                    title=f"{name}: UPerNet, mIoU {last.get('miou', float('nan')):.1f} (first {len(imgs)} val images)"))
        return metrics


def _to_common_size(imgs, gts, prs, size: int = 256):
    def nearest(t):
        return F.interpolate(t[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()

    return (torch.stack([F.interpolate(i[None].float(), size=(size, size), mode="bilinear")[0].to(torch.uint8)
                         for i in imgs]),
            torch.stack([nearest(g) for g in gts]), torch.stack([nearest(p) for p in prs]))
