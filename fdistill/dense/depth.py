"""NYUv2 monocular depth fine-tuning (paper Sec. 5, Table 1 "NYUv2", RMSE): the backbone inside
:class:`~fdistill.dense.depth_head.DepthEstimator` (BEiT's pyramid -> DPT's fusion decoder),
trained end to end on the engine with the SiLog loss (:class:`~fdistill.dense.depth_loss.SiLogLoss`)
on random crops, and scored on whole test images (sliding windows of the crop size where the
image is larger, :func:`~fdistill.dense.sliding.sliding_window`) with the NYUv2 metrics
(:class:`~fdistill.dense.depth_metrics.DepthMetrics`: RMSE, abs rel, log10, delta1-3, on the
Eigen crop). The best weights are those of the lowest RMSE.

Output folder as :mod:`fdistill.dense.segment`'s (``model_best.safetensors``, ``checkpoints/``,
``metrics.jsonl``, ``log.jsonl``, ``curves.png``, ``predictions.png``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..eval.data import model_inputs
from ..precision import autocast
from .common import (BestTracker, check_datasets, display_name, plot_dense_curves, recipe_config, run_folder,
                     run_metrics, sync_batch_norm, train_dense)
from .depth_metrics import DepthMetrics
from .sliding import sliding_window
from ..engine.trainer import Task

log = logging.getLogger(__name__)

__all__ = ["build_depth_estimator", "evaluate_depth", "DepthTask", "finetune_depth", "plot_depth_examples"]


@torch.no_grad()
def evaluate_depth(model: nn.Module, loader, *, crop: int, mean, std, device: torch.device, metrics: DepthMetrics,
                   precision: str = "fp32", env=None, keep: int = 0, progress: bool = False) -> Dict[str, Any]:
    """The NYUv2 metrics of ``model`` over ``loader`` (batches of uint8 images and (1, H, W) depth
    in metres; images of one size per batch). Per-image sums are reduced over ranks."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    shown: List[tuple] = []
    for images, depth in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        x = model_inputs(images, mean, std, device)  # (B, 3, H, W)
        preds = []
        with autocast(device, precision):
            for xi in x.split(1):  # (1, 3, H, W): windows of the crop size cover any image
                preds.append(sliding_window(model, xi, 1, crop, max(crop * 2 // 3, 1), key="depth"))
        pred = torch.cat(preds)[:, 0]  # (B, H, W)
        gt = depth.to(pred.device).float()[:, 0]  # (B, H, W)
        metrics.update(pred, gt)
        for i in range(min(keep - len(shown), len(images))):
            shown.append((images[i].cpu(), gt[i].cpu(), pred[i].cpu()))
    if env is not None and env.distributed:
        from ..engine.distributed import all_reduce_sum_

        s = torch.cat([metrics.sums, torch.tensor([float(metrics.images)], dtype=torch.float64)]).to(device)
        all_reduce_sum_(s, env)
        s = s.cpu()
        metrics.sums, metrics.images = s[:-1].clone(), int(s[-1])
    model.train(was)
    res = metrics.compute()
    res["shown"] = shown
    return res


class _DepthLoss(nn.Module):
    def __init__(self, model: nn.Module, criterion: nn.Module, *, mean, std):
        super().__init__()
        self.model, self.criterion, self.mean, self.std = model, criterion, mean, std

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images, depth = batch
        device = next(self.model.parameters()).device
        x = model_inputs(images, self.mean, self.std, device)  # (B, 3, c, c)
        y = depth.to(device, non_blocking=True).float()  # (B, 1, c, c) metres, 0 = invalid
        pred = self.model(x)["depth"]  # (B, 1, c, c)
        with torch.autocast(device.type, enabled=False):
            loss = self.criterion(pred.float(), y)
        return {"loss": loss}


class DepthTask(Task):
    """Depth fine-tuning as a task of the engine: the estimator, SiLog, the NYUv2 metrics of each
    evaluation, best (lowest RMSE) and last weights."""

    name = "depth"

    def __init__(self, model: nn.Module, criterion: nn.Module, *, val_loader, crop: int, mean, std,
                 metric_args: Dict[str, Any], precision: str, env, out: Path, figure_images: int = 0):
        self.model, self.criterion, self.val_loader, self.crop = model, criterion, val_loader, crop
        self.mean, self.std, self.metric_args, self.precision, self.env = mean, std, metric_args, precision, env
        self.device = next(model.parameters()).device
        self.tracker = BestTracker(out, "rmse", higher=False, env=env)
        self.figure_images = figure_images
        self.shown: List[tuple] = []

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _DepthLoss(model, self.criterion, mean=self.mean, std=self.std)

    def evaluate(self, model: nn.Module, ema, epoch: int, step: int) -> Dict[str, Any]:
        res = evaluate_depth(model, self.val_loader, crop=self.crop, mean=self.mean, std=self.std, device=self.device,
                             metrics=DepthMetrics(**self.metric_args), precision=self.precision, env=self.env,
                             keep=self.figure_images)
        self.shown = res.pop("shown")
        rec = {"epoch": epoch + 1, "step": step, **res}
        self.tracker.update(model, rec)
        log.info("epoch %d: RMSE %.4f, abs rel %.4f, d1 %.3f (best RMSE %.4f)", epoch + 1, rec["rmse"],
                 rec["abs_rel"], rec["d1"], self.tracker.best["rmse"])
        return rec

    def state_dict(self) -> Dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)


def build_depth_estimator(adapter, cfg):
    """``(model, criterion, info)``: the trainable DPT depth model of the recipe ``cfg`` on
    ``adapter``'s network at the crop size, its SiLog loss and what the backbone is."""
    from .backbone import dense_backbone
    from .depth_head import DepthEstimator
    from .depth_loss import SiLogLoss

    d, m = cfg.data, cfg.model
    crop = d.crop_size
    backbone, info = dense_backbone(adapter, img_size=(crop, crop), drop_path_rate=m.drop_path)
    model = DepthEstimator(backbone, max_depth=d.max_depth, img_size=(crop, crop), indices=m.indices,
                           features=m.features)
    return model, SiLogLoss(m.silog_lambda, min_depth=d.min_depth, max_depth=d.max_depth), info


def finetune_depth(adapter, train_ds, val_ds, cfg, *, output_dir, resume: Optional[str] = "auto", env=None,
                   source: Optional[Dict[str, Any]] = None, on_step=None, progress: bool = True) -> Dict[str, Any]:
    """Fine-tune ``adapter`` inside :class:`~fdistill.dense.depth_head.DepthEstimator` on
    ``train_ds`` (uint8 (3, c, c) crops with (1, c, c) depth in metres, 0 = invalid) and score it
    on ``val_ds`` (whole images), with the recipe ``cfg``
    (:class:`fdistill.config.dense.DepthConfig`); returns the metrics of the best evaluation."""
    from ..engine.distributed import DistEnv
    from ..eval.data import make_loader
    from ..precision import resolve_precision

    env = env or DistEnv()
    device = env.device
    out = Path(output_dir)
    d = cfg.data
    crop = d.crop_size
    precision = resolve_precision(cfg.precision, device.type)
    with run_folder(out, env):
        model, criterion, info = build_depth_estimator(adapter, cfg)
        model = sync_batch_norm(model, env).to(device)
        check_datasets([train_ds, val_ds], env, progress=progress)  # bad files fail now, not mid-run
        recipe = dict(command="depth", model=(source or {}).get("spec") or adapter.name, config=recipe_config(cfg),
                      world_size=env.world_size, precision=precision, train_images=len(train_ds),
                      epochs=cfg.epochs, max_steps=cfg.max_steps, eval_interval=cfg.eval_interval,
                      log_interval=cfg.log_interval, num_workers=d.num_workers, figure_images=cfg.figure_images)
        val_sub = val_ds if not env.distributed else torch.utils.data.Subset(val_ds, range(env.rank, len(val_ds), env.world_size))
        val_loader = make_loader(val_sub, batch_size=1, shuffle=False, num_workers=d.num_workers, device=device)
        task = DepthTask(model, criterion, val_loader=val_loader, crop=crop, mean=adapter.mean, std=adapter.std,
                         metric_args=dict(min_depth=d.min_depth, max_depth=d.max_depth, eigen_crop=d.eigen_crop),
                         precision=precision, env=env, out=out, figure_images=cfg.figure_images if env.is_main else 0)
        result, steps_per_epoch = train_dense(task, cfg, optimizer_model=model, train_ds=train_ds, output_dir=out,
                                              recipe=recipe, env=env, resume=resume, on_step=on_step,
                                              progress=progress)
        best, last = task.tracker.best or {}, (result.history[-1] if result.history else {})
        metrics = {**{k: best.get(k) for k in ("rmse", "abs_rel", "log10", "d1", "d2", "d3", "sq_rel", "rmse_log",
                                               "silog")},
                   "best_epoch": best.get("epoch"), "last": last,
                   **run_metrics(result, steps_per_epoch, env, train_ds=train_ds, val_ds=val_ds, info=info,
                                 precision=precision, device=device)}
        if env.is_main:
            name = display_name(adapter, source)
            curves = plot_dense_curves(out, result.history, "rmse", f"{name}: depth fine-tuning")
            metrics["curves"] = str(curves) if curves else None
            if task.shown:
                metrics["figure"] = str(plot_depth_examples(
                    task.shown, out / "predictions.png", max_depth=d.max_depth,
                    title=f"{name}: depth, RMSE {last.get('rmse', float('nan')):.3f} (first {len(task.shown)} val images)"))
        return metrics


def plot_depth_examples(shown, path, *, max_depth: float, title: str = "") -> Path:
    """Rows of (image, ground-truth depth, predicted depth), one depth colour scale (0..``max_depth``
    metres, invalid ground truth black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_path

    n = len(shown)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.4 * n + 0.6), squeeze=False)
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="black")
    im = None
    for r, (img, gt, pred) in enumerate(shown):
        size = gt.shape[-2:]
        pic = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        axes[r, 0].imshow(pic.permute(1, 2, 0).clamp(0, 255).byte().numpy())
        g = gt.numpy().astype(np.float32).copy()
        g[g <= 0] = np.nan
        axes[r, 1].imshow(g, cmap=cmap, vmin=0, vmax=max_depth)
        im = axes[r, 2].imshow(pred.numpy(), cmap=cmap, vmin=0, vmax=max_depth)
        for c, t in enumerate(("image", "ground truth", "prediction")):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(t, fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="depth (m)")
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
