"""COCO object detection and instance segmentation fine-tuning (paper Sec. 5, Table 1 "COCO": AP box
and AP mask): the backbone as a ViTDet-style detector body (:mod:`fdistill.dense.vitdet`: window-14
attention in every block, one added global block, the simple feature pyramid) inside torchvision's
Mask R-CNN (:func:`~fdistill.dense.maskrcnn.build_maskrcnn`), trained end to end on the engine with
Mask R-CNN's own losses (RPN objectness + box, RoI classification + box + mask), multi-scale
(torchvision's transform draws the shorter side from the recipe's sizes; the longer side is capped)
and scored by the COCO API (:mod:`fdistill.dense.coco_eval`: AP, AP50, AP75, APs/m/l for boxes and
masks). The best weights are those of the highest box AP.

Output folder as :mod:`fdistill.dense.segment`'s (``model_best.safetensors``, ``checkpoints/``,
``metrics.jsonl``, ``log.jsonl``, ``curves.png``, ``predictions.png``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .common import (BestTracker, check_datasets, display_name, plot_dense_curves, recipe_config, run_folder,
                     run_metrics, train_dense)
from ..engine.trainer import Task
from ..images import to_float_images

log = logging.getLogger(__name__)

__all__ = ["build_detector", "evaluate_detector", "DetectTask", "finetune_detection", "plot_detection_examples",
           "train_sizes"]


def _images(images, device) -> List[torch.Tensor]:
    """uint8 (3, H, W) images -> floats in [0, 1] on ``device`` (torchvision's detection transform
    normalises them with the backbone's mean / std and resizes them)."""
    return [to_float_images(im.to(device, non_blocking=True)) for im in images]


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader, coco_gt, *, device: torch.device, precision: str = "fp32", env=None,
                      keep: int = 0, progress: bool = False) -> Dict[str, Any]:
    """Box and mask AP of ``model`` over ``loader`` (batches of (images, targets) with
    ``image_id``), against ``coco_gt``; every rank's predictions are gathered on rank 0 first."""
    from tqdm.auto import tqdm

    from ..engine.distributed import gather_objects
    from ..precision import autocast
    from .coco_eval import CocoEvaluator, contiguous_label_map

    was = model.training
    model.eval()
    ev = CocoEvaluator(coco_gt, contiguous_label_map(coco_gt))
    shown: List[tuple] = []
    for images, targets in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        with autocast(device, precision):
            outs = model(_images(images, device))
        preds = [{"image_id": int(t["image_id"]), **{k: v.float().cpu() for k, v in o.items()}}
                 for o, t in zip(outs, targets)]
        ev.update(preds)
        for img, t, p in zip(images, targets, preds):
            if len(shown) < keep:
                shown.append((img.cpu(), {k: v for k, v in t.items() if k in ("boxes", "labels")}, p))
    if env is not None and env.distributed:
        ev = CocoEvaluator(coco_gt, contiguous_label_map(coco_gt)).merge(gather_objects(ev.results, env))
    model.train(was)
    ap = ev.summarize()
    images = len({int(r["image_id"]) for r in ev.results})  # every rank's, once each
    return {"box": ap.get("bbox", {}), "mask": ap.get("segm", {}), "images": images, "shown": shown}


class _DetectorLoss(nn.Module):
    """Mask R-CNN's training losses (torchvision computes them in train mode), summed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images, targets = batch
        device = next(self.model.parameters()).device
        tg = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        losses = self.model(_images(images, device), tg)  # {loss_classifier, loss_box_reg, loss_mask, ...}
        return {"loss": sum(v.float() for v in losses.values())}


class DetectTask(Task):
    """Detection fine-tuning as a task of the engine: the detector, its losses, COCO AP of every
    evaluation, best (box AP) and last weights."""

    name = "detect"

    def __init__(self, model: nn.Module, *, val_loader, coco_gt, precision: str, env, out: Path, figure_images: int = 0):
        self.model, self.val_loader, self.coco_gt = model, val_loader, coco_gt
        self.precision, self.env = precision, env
        self.device = next(model.parameters()).device
        self.tracker = BestTracker(out, "ap_box", higher=True, env=env)
        self.figure_images = figure_images
        self.shown: List[tuple] = []

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _DetectorLoss(model)

    def evaluate(self, model: nn.Module, ema, epoch: int, step: int) -> Dict[str, Any]:
        res = evaluate_detector(model, self.val_loader, self.coco_gt, device=self.device, precision=self.precision,
                                env=self.env, keep=self.figure_images)
        self.shown = res.pop("shown")
        # NaN (COCOeval's -1: no ground truth in a size range) -> None, which JSON can hold
        box, mask = ({k: (None if v != v else v) for k, v in res[t].items()} for t in ("box", "mask"))
        rec = {"epoch": epoch + 1, "step": step, "ap_box": box.get("AP"), "ap_mask": mask.get("AP"),
               "box": box, "mask": mask, "images": res["images"]}
        self.tracker.update(model, rec)
        log.info("epoch %d: AP box %.2f, AP mask %.2f (best box %.2f)", epoch + 1, rec["ap_box"], rec["ap_mask"],
                 self.tracker.best["ap_box"])
        return rec

    def state_dict(self) -> Dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)


def finetune_detection(adapter, train_ds, val_ds, cfg, *, output_dir, resume: Optional[str] = "auto", env=None,
                       source: Optional[Dict[str, Any]] = None, on_step=None, progress: bool = True,
                       **maskrcnn_kwargs) -> Dict[str, Any]:
    """Fine-tune ``adapter`` inside Mask R-CNN on ``train_ds`` and score it on ``val_ds`` (both
    give (uint8 (3, H, W), torchvision detection target) with ``classes``; ``val_ds.coco`` is the
    ground truth for AP), with the recipe ``cfg`` (:class:`fdistill.config.dense.DetectConfig`);
    ``maskrcnn_kwargs`` go to torchvision's ``MaskRCNN``, over the recipe's ``model`` fields."""
    from ..engine.distributed import DistEnv
    from ..eval.data import make_loader
    from ..precision import resolve_precision

    env = env or DistEnv()
    device = env.device
    out = Path(output_dir)
    d = cfg.data
    precision = resolve_precision(cfg.precision, device.type)
    classes = list(train_ds.classes)
    with run_folder(out, env):
        # the detector first: a backbone it cannot use fails here, before any image is read
        model, info, kwargs = build_detector(adapter, cfg, len(classes), **maskrcnn_kwargs)
        model.to(device)
        _check_same_categories(train_ds, val_ds)
        check_datasets([train_ds, val_ds], env, progress=progress)  # bad files fail now, not mid-run
        test_size = d.test_size
        recipe = dict(command="detect", model=(source or {}).get("spec") or adapter.name, config=recipe_config(cfg),
                      world_size=env.world_size, precision=precision, train_images=len(train_ds),
                      num_classes=len(classes), epochs=cfg.epochs, max_steps=cfg.max_steps,
                      eval_interval=cfg.eval_interval, log_interval=cfg.log_interval, num_workers=d.num_workers,
                      figure_images=cfg.figure_images, maskrcnn={k: v for k, v in kwargs.items()
                                                                 if isinstance(v, (int, float, str, list))})
        from ..data.coco import detection_collate

        val_sub = val_ds if not env.distributed else torch.utils.data.Subset(val_ds, range(env.rank, len(val_ds), env.world_size))
        val_loader = make_loader(val_sub, batch_size=max(1, d.batch_size // 2), shuffle=False, num_workers=d.num_workers,
                                 device=device, collate_fn=detection_collate)
        task = DetectTask(model, val_loader=_TestSize(val_loader, model, test_size), coco_gt=val_ds.coco,
                          precision=precision, env=env, out=out, figure_images=cfg.figure_images if env.is_main else 0)
        result, steps_per_epoch = train_dense(task, cfg, optimizer_model=model, train_ds=train_ds, output_dir=out,
                                              recipe=recipe, env=env, resume=resume, on_step=on_step,
                                              progress=progress, collate_fn=detection_collate)
        best, last = task.tracker.best or {}, (result.history[-1] if result.history else {})
        box, mask = best.get("box") or {}, best.get("mask") or {}
        metrics = {"ap_box": best.get("ap_box"), "ap_mask": best.get("ap_mask"), "ap50_box": box.get("AP50"),
                   "ap75_box": box.get("AP75"), "ap50_mask": mask.get("AP50"), "box": best.get("box"),
                   "mask": best.get("mask"), "best_epoch": best.get("epoch"), "last": last,
                   "num_classes": len(classes),
                   **run_metrics(result, steps_per_epoch, env, train_ds=train_ds, val_ds=val_ds, info=info,
                                 precision=precision, device=device)}
        if env.is_main:
            name = display_name(adapter, source)
            curves = plot_dense_curves(out, result.history, "ap_box", f"{name}: Mask R-CNN fine-tuning")
            metrics["curves"] = str(curves) if curves else None
            if task.shown:
                metrics["figure"] = str(plot_detection_examples(
                    task.shown, classes, out / "predictions.png",
                    title=f"{name}: Mask R-CNN, AP box {last.get('ap_box', float('nan')):.1f} "
                          f"(first {len(task.shown)} val images)"))
        return metrics


def build_detector(adapter, cfg, num_classes: int, **maskrcnn_kwargs):
    """``(model, info, kwargs)``: the trainable Mask R-CNN of the recipe ``cfg`` on ``adapter``'s
    network (:func:`~fdistill.dense.backbone.dense_backbone` -> :func:`~fdistill.dense.maskrcnn.build_maskrcnn`),
    what the backbone is, and the ``MaskRCNN`` arguments used (the recipe's, then ``maskrcnn_kwargs``).
    ``model.load_state_dict`` takes the ``model_*.safetensors`` a run writes."""
    from .backbone import dense_backbone
    from .maskrcnn import build_maskrcnn

    d, m = cfg.data, cfg.model
    backbone, info = dense_backbone(adapter, img_size=None, drop_path_rate=m.drop_path)
    kwargs = dict(m.maskrcnn_kwargs(), image_mean=list(adapter.mean), image_std=list(adapter.std))
    kwargs.update(maskrcnn_kwargs)
    model = build_maskrcnn(backbone, num_classes, window_size=m.window_size, global_blocks=m.global_blocks,
                           add_global_block=m.add_global_block, min_size=train_sizes(d), max_size=d.max_size,
                           img_size=(d.crop_size, d.crop_size), out_channels=m.fpn_channels,
                           anchor_sizes=tuple(m.anchor_sizes), **kwargs)
    return model, info, kwargs


def train_sizes(d) -> tuple:
    """The shorter-side choices of multi-scale training: ``train_sizes`` [lo, hi] in ``size_step``
    steps (480, 512, ..., 800 for COCO); torchvision's transform draws one per image."""
    lo, hi = d.train_sizes
    return tuple(range(lo, hi + 1, d.size_step))


def _check_same_categories(train_ds, val_ds) -> None:
    """Training and evaluation must name the same categories in the same order (a label is an
    index into them): one clear error before training otherwise."""
    from ..data import DataError

    a, b = list(getattr(train_ds, "cat_ids", train_ds.classes)), list(getattr(val_ds, "cat_ids", val_ds.classes))
    if a != b:
        raise DataError(f"the training and evaluation sets have different categories: {a[:10]} vs {b[:10]} "
                        f"({len(a)} vs {len(b)}); a detector's labels index one list of categories")


class _TestSize:
    """The evaluation loader, iterated with torchvision's transform at the single test size
    (training draws the shorter side from the recipe's sizes; testing uses one)."""

    def __init__(self, loader, model, size: int):
        self.loader, self.model, self.size = loader, model, int(size)

    def __iter__(self):
        t = self.model.transform
        train_sizes = t.min_size
        t.min_size = (self.size,)
        try:
            yield from self.loader
        finally:
            t.min_size = train_sizes

    def __len__(self):
        return len(self.loader)


def plot_detection_examples(shown, classes, path, *, score: Optional[float] = None, title: str = "") -> Path:
    """Rows of (ground-truth boxes, predicted boxes and masks), drawn with torchvision's
    ``draw_bounding_boxes`` / ``draw_segmentation_masks``. Predictions: those with score >=
    ``score``, or by default the top N by score where N is the image's number of ground-truth
    objects (what AP ranks; a briefly trained detector's scores are low, a fixed threshold would
    often show nothing), each labelled with its class and score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ..io import atomic_path

    def names(labels):
        return [classes[int(i) - 1] if 0 < int(i) <= len(classes) else str(int(i)) for i in labels]

    n = len(shown)
    fig, axes = plt.subplots(n, 2, figsize=(6.4, 3.1 * n + 0.5), squeeze=False)
    for r, (img, gt, pred) in enumerate(shown):
        img = img if img.dtype == torch.uint8 else (img * 255).clamp(0, 255).to(torch.uint8)
        # small images (the synthetic scenes are 32 px) are enlarged, nearest, so the labels fit
        f = max(1, -(-256 // max(img.shape[-2:])))
        img = img.repeat_interleave(f, -2).repeat_interleave(f, -1)
        a = draw_bounding_boxes(img, gt["boxes"].float() * f, labels=names(gt["labels"]), colors="lime", width=2)
        if score is None:
            keep = torch.zeros(len(pred["scores"]), dtype=torch.bool)
            keep[pred["scores"].argsort(descending=True)[:len(gt["boxes"])]] = True
        else:
            keep = pred["scores"] >= score
        b = img
        if keep.any() and "masks" in pred:
            masks = pred["masks"][keep][:, 0] > 0.5  # (K, H, W)
            b = draw_segmentation_masks(b, masks.repeat_interleave(f, -2).repeat_interleave(f, -1), alpha=0.45)
        if keep.any():
            b = draw_bounding_boxes(b, pred["boxes"][keep] * f, colors="red", width=2,
                                    labels=[f"{c} {s:.2f}" for c, s in zip(names(pred["labels"][keep]),
                                                                            pred["scores"][keep].tolist())])
        for c, (pic, t) in enumerate(((a, "ground truth"), (b, "prediction (top N by score)" if score is None
                                                                 else f"prediction (score >= {score})"))):
            axes[r, c].imshow(pic.permute(1, 2, 0).numpy())
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(t, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)
