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

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.workers import worker_options
from ..images import normalize_images, to_float_images
from ..precision import autocast

normalize = normalize_images  # the package's one image normaliser (fdistill.images), by its older name here

__all__ = ["train_transform", "load_dataset", "make_loader", "normalize", "dataset_classes",
           "to_float_images", "model_inputs", "probe_loaders", "probe_run_folder", "frozen_forward"]



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


def probe_loaders(train_ds: Dataset, val_ds: Dataset, *, batch_size: int, num_workers: int, seed: int,
                  device: str | torch.device, env) -> Tuple[Any, DataLoader, DataLoader, int]:
    """``(sampler, train loader, val loader, steps per epoch)`` of a head trained on a frozen model
    by the training engine (the linear and segmentation probes). Training: this rank's share of
    each epoch in the resumable sampler's order, ``batch_size`` per process, a last partial batch
    dropped when there is more than one; evaluation: this rank's share (every ``world_size``-th
    image), in order."""
    from ..data import DataError, ResumableDistributedSampler

    if len(train_ds) == 0 or len(val_ds) == 0:
        raise DataError("the training loader gave no batches" if len(train_ds) == 0 else "the validation set is empty")
    sampler = ResumableDistributedSampler(len(train_ds), num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                          seed=seed, drop_last=True)
    drop_last = sampler.num_samples > batch_size  # MAE drops a last partial batch; one small set: one batch
    train = make_loader(train_ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                        drop_last=drop_last, seed=seed, device=device)
    val_sub = val_ds if not env.distributed else Subset(val_ds, range(env.rank, len(val_ds), env.world_size))
    val = make_loader(val_sub, batch_size=batch_size, shuffle=False, num_workers=num_workers, device=device)
    return sampler, train, val, (sampler.num_samples // batch_size if drop_last else 1)


@contextlib.contextmanager
def probe_run_folder(output_dir, env, prefix: str) -> Iterator[Path]:
    """A probe's run folder: ``output_dir`` held with the run lock, or (None) a temporary folder
    removed afterwards (a probe without ``--output`` keeps nothing, and so cannot resume)."""
    from ..engine.lock import hold_run_lock

    with contextlib.ExitStack() as stack:
        if output_dir is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        else:
            out = Path(output_dir)
            stack.enter_context(hold_run_lock(out, env))
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        yield out


def frozen_forward(backbone, fn: Callable, *, device: torch.device, precision: str) -> Callable:
    """``images -> fn(backbone, inputs)`` for a frozen model: the loader's batch normalised with the
    backbone's statistics on ``device``, run without gradients under the one autocast
    (:func:`fdistill.precision.autocast`)."""

    def run(images: torch.Tensor):
        x = model_inputs(images, backbone.mean, backbone.std, device)
        with torch.no_grad(), autocast(device, precision):
            return fn(backbone, x)

    return run
