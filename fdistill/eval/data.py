"""Datasets, transforms and loaders for evaluation.

Transforms come from timm (``create_transform``): the fine-tuning train transform is the
official FD / BEiT one (RandomResizedCrop, flip, colour jitter 0.4, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25, bicubic), normalised with the *model's* mean/std
(random erasing fills with normal noise in normalised space). Images of 32 px or less get a
``RandomCrop(size, padding=4)`` instead of the resized crop, as the official ``build_transform``.

Evaluation images come from the data layer's ``eval_transform`` (resize + centre crop, uint8);
each model normalises them with its own statistics on the device (:func:`normalize`), so one
loader serves a CLIP teacher and an ImageNet-normalised student side by side.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.workers import worker_options
from ..images import normalize_images, to_float_images

normalize = normalize_images  # the package's one image normaliser (fdistill.images), by its older name here

__all__ = ["train_transform", "load_dataset", "make_loader", "normalize", "dataset_classes",
           "to_float_images", "model_inputs", "autocast", "PRECISIONS", "probe_loaders", "frozen_forward"]

#: the evaluation precisions: fp32, or bf16 / fp16 autocast
from ..precision import PRECISIONS, amp_dtype  # noqa: E402  (the one precision module)


def train_transform(
    img_size: int | Tuple[int, int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    color_jitter: float = 0.4,
    scale: Tuple[float, float] = (0.08, 1.0),
    interpolation: str = "bicubic",
    hflip: float = 0.5,
) -> Callable:
    """timm's ImageNet training transform (see module docstring); output normalised (3, H, W)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    size = img_size if isinstance(img_size, int) else tuple(img_size)
    tf = create_transform(
        input_size=size, is_training=True, color_jitter=color_jitter if color_jitter > 0 else None,
        auto_augment=auto_augment if auto_augment and auto_augment != "none" else None,
        re_prob=re_prob, re_mode=re_mode, re_count=1, interpolation=interpolation, mean=tuple(mean),
        std=tuple(std), scale=tuple(scale), hflip=hflip,
    )
    hw = (size, size) if isinstance(size, int) else size
    if max(hw) <= 32:  # official build_transform: small images are padded and cropped, not resized
        tf.transforms[0] = T.RandomCrop(hw, padding=4)
    return tf


def load_dataset(path_or_name: str, split: str, transform: Callable, *, download: bool = False) -> Dataset:
    """A labelled classification dataset (image folder with class sub-folders, ``synthetic`` or a
    torchvision name) through :func:`fdistill.data.build_classification_dataset`."""
    from ..data import build_classification_dataset

    ds = build_classification_dataset(str(path_or_name), split, transform, download=download)
    if not dataset_classes(ds):
        from ..data import DataError

        raise DataError(f"{path_or_name!r} ({split}) has no class labels; evaluation needs class sub-folders")
    return ds


def dataset_classes(ds: Dataset) -> list:
    """Class names of a dataset (``.classes``, looking through ``Subset`` wrappers)."""
    while not hasattr(ds, "classes") and hasattr(ds, "dataset"):
        ds = ds.dataset
    return list(getattr(ds, "classes", []) or [])


def make_loader(ds: Dataset, *, batch_size: int, shuffle: bool, num_workers: int = 4, drop_last: bool = False,
                sampler=None, seed: int = 0, device: str | torch.device = "cpu", collate_fn=None) -> DataLoader:
    """A DataLoader; ``num_workers`` is capped at the CPUs this process may use (``collate_fn``:
    None = torch's default)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cpus = os.cpu_count() or 1
    workers = max(0, min(int(num_workers), cpus))
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, drop_last=drop_last, pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False, generator=g, collate_fn=collate_fn, **worker_options(workers),
    )


def model_inputs(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 device: torch.device) -> torch.Tensor:
    """A loader's batch (uint8, or floats in [0, 1]; (B, 3, H, W)) -> a model's normalised float
    input on ``device``: each model normalises with its own statistics (module docstring)."""
    return normalize_images(to_float_images(images.to(device, non_blocking=True)), mean, std)


def autocast(device: str | torch.device, precision: str):
    """``torch.autocast`` for ``precision`` ``bf16`` / ``fp16`` on ``device``; for ``fp32`` a
    disabled one (a no-op). (:mod:`fdistill.precision`'s, as a ``torch.autocast`` object.)"""
    dt = amp_dtype(precision)
    return torch.autocast(torch.device(device).type, dtype=dt or torch.bfloat16, enabled=dt is not None)


def probe_loaders(train_ds: Dataset, val_ds: Dataset, *, batch_size: int, num_workers: int, seed: int,
                  device: str | torch.device) -> Tuple[DataLoader, DataLoader]:
    """(train, val) loaders of a head trained on a frozen model: training shuffled (dropping a
    last partial batch when there is more than one), evaluation in order."""
    train = make_loader(train_ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=seed,
                        device=device, drop_last=len(train_ds) > batch_size)
    val = make_loader(val_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, device=device)
    return train, val


def frozen_forward(adapter, fn: Callable, *, device: torch.device, precision: str) -> Callable:
    """``images -> fn(adapter, inputs)`` for a frozen model: the loader's batch normalised with the
    adapter's statistics on ``device``, run without gradients under :func:`autocast`."""

    def run(images: torch.Tensor):
        x = model_inputs(images, adapter.mean, adapter.std, device)
        with torch.no_grad(), autocast(device, precision):
            return fn(adapter, x)

    return run
