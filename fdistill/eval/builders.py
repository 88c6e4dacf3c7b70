"""The evaluation commands' configs (:mod:`fdistill.config.finetune`, which only describes) ->
the arguments of the functions that run them (:func:`~fdistill.eval.finetune.finetune`,
:func:`~fdistill.eval.linear_probe.linear_probe`, k-NN, zero-shot, the segmentation probe):
learning rates scaled to the global batch, the precision resolved for the device."""
from __future__ import annotations

from typing import Any, Dict

from ..config.finetune import (FinetuneConfig, KnnConfig, LinprobeConfig, SegprobeConfig, ZeroshotConfig,
                               resolve_finetune_lr)
from ..precision import resolve_precision

__all__ = ["build_train_transform_args", "build_finetune_recipe", "build_linprobe_recipe", "build_sweep_recipe",
           "build_knn_recipe", "build_zeroshot_recipe", "build_segprobe_data_args", "build_segprobe_recipe"]


def _precision(p: str, device_type: str) -> str:
    return resolve_precision(p, device_type)


def build_train_transform_args(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Keyword arguments of :func:`fdistill.eval.data.train_transform` (besides size, mean, std)."""
    a = cfg.aug
    return dict(auto_augment=a.auto_augment, color_jitter=a.color_jitter, re_prob=a.re_prob,
                scale=tuple(a.scale), interpolation=cfg.data.interpolation)


def build_finetune_recipe(cfg: FinetuneConfig, *, world_size: int = 1, device_type: str = "cpu") -> Dict[str, Any]:
    """Keyword arguments of :func:`fdistill.eval.finetune.finetune` (the training recipe)."""
    lr, warmup_lr, min_lr = resolve_finetune_lr(cfg.optim, cfg.data.batch_size * world_size)
    a = cfg.aug
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = dict(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                     switch_prob=a.mixup_switch_prob, mode=a.mixup_mode)
    return dict(
        global_pool=cfg.model.global_pool, drop_path_rate=cfg.model.drop_path,
        epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, max_steps=cfg.max_steps,
        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        lr=lr, warmup_lr=warmup_lr, min_lr=min_lr, weight_decay=cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        decay_rel_pos_bias=cfg.optim.decay_rel_pos_bias,
        clip_grad=cfg.optim.clip_grad, mixup=mixup, label_smoothing=a.label_smoothing,
        ema_decay=cfg.ema.decay if cfg.ema.enabled else None,
        precision=_precision(cfg.precision, device_type), eval_interval=cfg.eval_interval,
        log_interval=cfg.log_interval, ckpt_interval=cfg.ckpt_interval, keep_last=cfg.keep_last,
        max_nonfinite=cfg.max_nonfinite, tensorboard=cfg.tensorboard, seed=cfg.seed,
    )


def build_linprobe_recipe(cfg: LinprobeConfig, *, world_size: int = 1, device_type: str = "cpu") -> Dict[str, Any]:
    """Keyword arguments of :func:`fdistill.eval.linear_probe.linear_probe` (standard mode)."""
    gb = cfg.data.batch_size * world_size
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * gb / cfg.lr_batch_denominator
    return dict(feature=cfg.feature, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, lr=lr,
                weight_decay=cfg.weight_decay, momentum=cfg.momentum, batch_size=cfg.data.batch_size,
                num_workers=cfg.data.num_workers, precision=_precision(cfg.precision, device_type), seed=cfg.seed)


def build_sweep_recipe(cfg: LinprobeConfig) -> Dict[str, Any]:
    """Keyword arguments of :func:`fdistill.eval.linear_probe.linear_probe_sweep` (fast mode)."""
    s = cfg.sweep
    lrs = [b * s.batch_size / cfg.lr_batch_denominator for b in s.base_lrs]
    return dict(lrs=lrs, epochs=s.epochs, batch_size=s.batch_size, weight_decay=cfg.weight_decay,
                momentum=cfg.momentum, warmup_epochs=s.warmup_epochs, seed=cfg.seed)


def build_knn_recipe(cfg: KnnConfig) -> Dict[str, Any]:
    return dict(ks=list(cfg.k), T=cfg.temperature)


def build_zeroshot_recipe(cfg: ZeroshotConfig) -> Dict[str, Any]:
    return dict(templates=cfg.templates, classnames=cfg.classnames)


def build_segprobe_data_args(cfg: SegprobeConfig) -> Dict[str, Any]:
    """Keyword arguments of :func:`fdistill.data.segmentation.build_segmentation_dataset` (not the split)."""
    return dict(num_classes=cfg.num_classes, reduce_zero_label=cfg.reduce_zero_label, scale=tuple(cfg.scale),
                interpolation=cfg.data.interpolation, seed=cfg.seed)


def build_segprobe_recipe(cfg: SegprobeConfig, *, device_type: str = "cpu") -> Dict[str, Any]:
    """Keyword arguments of :func:`fdistill.eval.segmentation.seg_linear_probe`."""
    return dict(epochs=cfg.epochs, max_steps=cfg.max_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                warmup_epochs=cfg.warmup_epochs, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                precision=_precision(cfg.precision, device_type), seed=cfg.seed, max_nonfinite=cfg.max_nonfinite)
