"""The dense fine-tuning commands as library functions (``fdistill segment | depth | detect`` call
these): a spec and a recipe in, ``metrics.json`` out; ``--compare`` goes through
:func:`fdistill.eval.commands.compare` like the classification commands, one recipe for every model.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

__all__ = ["run_segment", "run_depth", "run_detect"]


def _setup(cfg, model: str, model_kwargs):
    """(env, adapter) with the seed set first (a randomly initialised model is the same in every process)."""
    from ..engine.distributed import init_distributed
    from ..engine.rng import seed_everything
    from ..eval.commands import load_eval_model

    env = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    return env, load_eval_model(model, model_kwargs)


def run_segment(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None, output: str,
                resume: Optional[str] = "auto", echo: bool = True) -> Dict[str, Any]:
    """``fdistill segment``: UPerNet fine-tuning of ``model`` on ``train`` (an ADE20K-layout folder
    or ``synthetic[:N]``), scored on ``val`` (default: the val split of ``train``); see
    :mod:`fdistill.dense.segment`."""
    from ..data.segmentation import (SegmentationCropTransform, SegmentationRescaleTransform,
                                     build_segmentation_dataset)
    from ..engine.distributed import shutdown
    from ..eval.commands import _finish, _record
    from .segment import finetune_segmentation

    t0 = time.time()
    val = val or train
    d = cfg.data
    env, adapter = _setup(cfg, model, model_kwargs)
    try:
        common = dict(num_classes=cfg.num_classes, reduce_zero_label=cfg.reduce_zero_label, seed=cfg.seed)
        train_tf = SegmentationCropTransform(d.crop_size, img_scale=d.img_scale, ratio_range=d.ratio_range,
                                             flip=d.flip, photometric=d.photometric)
        train_ds = build_segmentation_dataset(train, "train", d.crop_size, train=True, transform=train_tf, **common)
        val_ds = build_segmentation_dataset(val, "val", d.crop_size, train=False,
                                            transform=SegmentationRescaleTransform(d.img_scale), **common)
        res = finetune_segmentation(adapter, train_ds, val_ds, cfg, output_dir=output, resume=resume, env=env,
                                    source={"spec": str(model), "kwargs": dict(model_kwargs or {})})
    finally:
        shutdown(env)
    metrics = _record("segment", model, model_kwargs, train, val, cfg, env.device, t0, **res)
    if not env.is_main:
        return metrics
    return _finish(metrics, output, ["miou", "aacc", "macc", "steps"], echo)


def run_depth(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None, output: str,
              resume: Optional[str] = "auto", echo: bool = True) -> Dict[str, Any]:
    """``fdistill depth``: DPT depth fine-tuning of ``model`` on ``train`` (a NYUv2-layout folder
    with split files, or ``synthetic[:N]``), scored on ``val`` (default: the test split of
    ``train``); see :mod:`fdistill.dense.depth`."""
    from ..data.depth import build_depth_dataset
    from ..engine.distributed import shutdown
    from ..eval.commands import _finish, _record
    from .depth import finetune_depth

    t0 = time.time()
    val = val or train
    d = cfg.data
    env, adapter = _setup(cfg, model, model_kwargs)
    try:
        common = dict(max_depth=d.max_depth, seed=cfg.seed)
        train_ds = build_depth_dataset(train, "train", d.crop_size, train=True, flip=d.flip, **common)
        val_ds = build_depth_dataset(val, "val", d.crop_size, train=False, **common)
        res = finetune_depth(adapter, train_ds, val_ds, cfg, output_dir=output, resume=resume, env=env,
                             source={"spec": str(model), "kwargs": dict(model_kwargs or {})})
    finally:
        shutdown(env)
    metrics = _record("depth", model, model_kwargs, train, val, cfg, env.device, t0, **res)
    if not env.is_main:
        return metrics
    return _finish(metrics, output, ["rmse", "abs_rel", "log10", "d1"], echo)


def run_detect(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None, output: str,
               resume: Optional[str] = "auto", echo: bool = True) -> Dict[str, Any]:
    """``fdistill detect``: Mask R-CNN fine-tuning of ``model`` on ``train`` (a COCO root:
    ``train2017/``, ``val2017/``, ``annotations/instances_*2017.json``; or ``synthetic[:N]``,
    exported as one under ``output/data``), scored by COCO AP on ``val`` (default: the val split
    of ``train``); see :mod:`fdistill.dense.detect`."""
    from pathlib import Path

    from ..data.coco import build_detection_dataset
    from ..engine.distributed import barrier, shutdown
    from ..eval.commands import _finish, _record
    from .detect import finetune_detection

    t0 = time.time()
    val = val or train
    env, adapter = _setup(cfg, model, model_kwargs)
    try:
        common = dict(seed=cfg.seed, cache_dir=Path(output) / "data")

        def build():
            return (build_detection_dataset(train, "train", train=True, flip=cfg.data.flip, **common),
                    build_detection_dataset(val, "val", train=False, **common))

        if env.is_main:  # rank 0 writes a synthetic export once; the others read it after
            train_ds, val_ds = build()
        barrier(env)
        if not env.is_main:
            train_ds, val_ds = build()
        res = finetune_detection(adapter, train_ds, val_ds, cfg, output_dir=output, resume=resume, env=env,
                                 source={"spec": str(model), "kwargs": dict(model_kwargs or {})})
    finally:
        shutdown(env)
    metrics = _record("detect", model, model_kwargs, train, val, cfg, env.device, t0, **res)
    if not env.is_main:
        return metrics
    return _finish(metrics, output, ["ap_box", "ap_mask", "steps"], echo)
