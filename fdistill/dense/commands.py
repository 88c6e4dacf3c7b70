"""The dense fine-tuning commands as library functions (``fdistill segment | depth | detect`` call
these): a spec and a recipe in, ``metrics.json`` out; ``--compare`` goes through
:func:`fdistill.eval.commands.compare` like the classification commands, one recipe for every model.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

__all__ = ["run_segment", "run_depth", "run_detect"]


def _run(command: str, cfg, *, model: str, model_kwargs, train: str, val: Optional[str], output: str,
         echo: bool, columns: List[str], fine_tune: Callable) -> Dict[str, Any]:
    """What the three commands share: the process group and the seed (a randomly initialised model
    is the same in every process), the model, ``fine_tune(env, adapter, val, source)`` (the
    task's data and run), the process group closed whatever happens, the record and the table."""
    from ..engine.distributed import init_distributed, shutdown
    from ..engine.rng import seed_everything
    from ..eval.commands import _finish, _record, load_eval_model

    t0 = time.time()
    val = val or train
    env = init_distributed(cfg.device)
    try:
        seed_everything(cfg.seed)
        adapter = load_eval_model(model, model_kwargs)
        res = fine_tune(env, adapter, val, {"spec": str(model), "kwargs": dict(model_kwargs or {})})
    finally:
        shutdown(env)
    metrics = _record(command, model, model_kwargs, train, val, cfg, env.device, t0, **res)
    if not env.is_main:
        return metrics
    return _finish(metrics, output, columns, echo)


def run_segment(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None, output: str,
                resume: Optional[str] = "auto", echo: bool = True) -> Dict[str, Any]:
    """``fdistill segment``: UPerNet fine-tuning of ``model`` on ``train`` (an ADE20K-layout folder
    or ``synthetic[:N]``), scored on ``val`` (default: the val split of ``train``); see
    :mod:`fdistill.dense.segment`."""
    from ..data.segmentation import (SegmentationCropTransform, SegmentationRescaleTransform,
                                     build_segmentation_dataset)
    from .segment import finetune_segmentation

    def fine_tune(env, adapter, val, source):
        d = cfg.data
        common = dict(num_classes=cfg.num_classes, reduce_zero_label=cfg.reduce_zero_label, seed=cfg.seed)
        train_tf = SegmentationCropTransform(d.crop_size, img_scale=d.img_scale, ratio_range=d.ratio_range,
                                             flip=d.flip, photometric=d.photometric)
        train_ds = build_segmentation_dataset(train, "train", d.crop_size, train=True, transform=train_tf, **common)
        val_ds = build_segmentation_dataset(val, "val", d.crop_size, train=False,
                                            transform=SegmentationRescaleTransform(d.img_scale), **common)
        return finetune_segmentation(adapter, train_ds, val_ds, cfg, output_dir=output, resume=resume, env=env,
                                     source=source)

    return _run("segment", cfg, model=model, model_kwargs=model_kwargs, train=train, val=val, output=output,
                echo=echo, columns=["miou", "aacc", "macc", "steps"], fine_tune=fine_tune)


def run_depth(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None, output: str,
              resume: Optional[str] = "auto", echo: bool = True) -> Dict[str, Any]:
    """``fdistill depth``: DPT depth fine-tuning of ``model`` on ``train`` (a NYUv2-layout folder
    with split files, or ``synthetic[:N]``), scored on ``val`` (default: the test split of
    ``train``); see :mod:`fdistill.dense.depth`."""
    from ..data.depth import build_depth_dataset
    from .depth import finetune_depth

    def fine_tune(env, adapter, val, source):
        d = cfg.data
        common = dict(max_depth=d.max_depth, seed=cfg.seed)
        train_ds = build_depth_dataset(train, "train", d.crop_size, train=True, flip=d.flip, **common)
        val_ds = build_depth_dataset(val, "val", d.crop_size, train=False, **common)
        return finetune_depth(adapter, train_ds, val_ds, cfg, output_dir=output, resume=resume, env=env,
                              source=source)

    return _run("depth", cfg, model=model, model_kwargs=model_kwargs, train=train, val=val, output=output,
                echo=echo, columns=["rmse", "abs_rel", "log10", "d1"], fine_tune=fine_tune)


def run_detect(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None, output: str,
               resume: Optional[str] = "auto", echo: bool = True) -> Dict[str, Any]:
    """``fdistill detect``: Mask R-CNN fine-tuning of ``model`` on ``train`` (a COCO root:
    ``train2017/``, ``val2017/``, ``annotations/instances_*2017.json``; or ``synthetic[:N]``,
    exported as one under ``output/data``), scored by COCO AP on ``val`` (default: the val split
    of ``train``); see :mod:`fdistill.dense.detect`."""
    from ..data.coco import build_detection_dataset
    from ..engine.distributed import barrier
    from .detect import finetune_detection

    def fine_tune(env, adapter, val, source):
        common = dict(seed=cfg.seed, cache_dir=Path(output) / "data")

        def build():
            return (build_detection_dataset(train, "train", train=True, flip=cfg.data.flip, **common),
                    build_detection_dataset(val, "val", train=False, **common))

        if env.is_main:  # rank 0 writes a synthetic export once; the others read it after
            train_ds, val_ds = build()
        barrier(env)
        if not env.is_main:
            train_ds, val_ds = build()
        return finetune_detection(adapter, train_ds, val_ds, cfg, output_dir=output, resume=resume, env=env,
                                  source=source)

    return _run("detect", cfg, model=model, model_kwargs=model_kwargs, train=train, val=val, output=output,
                echo=echo, columns=["ap_box", "ap_mask", "steps"], fine_tune=fine_tune)
