"""Distillation datasets and loaders.

``build_distill_dataset(path_or_name, img_size=...)`` accepts an image folder, tar shards
(WebDataset) or ``synthetic[:N]``; ``build_distill_loader(dataset, batch_size=...)`` returns a
:class:`DistillDataLoader` whose batches are dicts::

    {"images":  uint8 (B, 3, H, W),   # normalised on the device, per network
     "labels":  int64 (B,),           # class index, or -1 (unlabelled data)
     "indices": int64 (B,),           # dataset index of each sample (-1 for shard streams)
     "skipped": int}                  # samples of this batch whose file was unreadable (replaced)

Bad images: a worker that meets a corrupt or truncated file logs its path, substitutes the
next readable sample and reports how many it stepped over with the sample; the collate sums
them per batch, so the count survives worker processes and reaches the training loop in
``batch["skipped"]`` (a plain int: no device sync to read it).

Reproducibility contract (the engine's resume relies on it): the view of sample ``index`` in
``epoch`` is a pure function of ``(seed, epoch, index)`` (see :mod:`fdistill.data.seeding`),
independent of ``num_workers``, of which worker loads it and of where the epoch was resumed;
the sampler yields ``(epoch, index)`` so persistent workers need no epoch state; the
DataLoader gets its own ``torch.Generator`` so iterating does not consume the main process's
global RNG. A loader built with ``start_index=k`` (or after ``set_epoch(e, start_index=k)``)
yields exactly the samples an uninterrupted loader yields from position ``k`` of this rank's
epoch on, in the same batches when ``k`` is a multiple of ``batch_size``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .errors import DataError
from .folder import ImageFolderDataset
from .sampler import ResumableDistributedSampler
from .seeding import in_worker, sample_seed, seeded
from .shards import WebShardDataset, looks_like_shards
from .synthetic import SyntheticShapes
from .transforms import distill_transform
from .workers import worker_options

log = logging.getLogger(__name__)

#: ``synthetic`` without a size
DEFAULT_SYNTHETIC_SIZE = 10_000


class DistillDataset(Dataset):
    """A map-style dataset seen through a per-sample-seeded transform.

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` for epoch 0) -> ``{"image", "label",
    "index", "skipped"}``. The wrapped dataset either has ``load(index) -> (PIL image, label,
    skipped)`` (:class:`ImageFolderDataset`, :class:`SyntheticShapes`: bad files substituted and
    counted) or is any dataset whose ``[index]`` gives ``(image, label)`` (its own transform,
    if any, also runs inside the seeded RNG).

    Args:
        base: the dataset.
        transform: image -> uint8 tensor (3, H, W), e.g. :func:`distill_transform`; ``None`` if
            ``base`` already returns tensors.
        seed: augmentation seed.
    """

    def __init__(self, base: Dataset, transform: Optional[Callable] = None, *, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return f"DistillDataset({self.base!r}, seed={self.seed})"

    @property
    def classes(self):
        return getattr(self.base, "classes", [])

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with seeded(sample_seed(self.seed, epoch, index), restore=not in_worker()):
            if hasattr(self.base, "load"):
                img, label, skipped = self.base.load(index)
            else:
                img, label = self.base[index]
                skipped = 0
            image = self.transform(img) if self.transform is not None else img
        return {"image": image, "label": int(label), "index": int(index), "skipped": int(skipped)}


def collate_distill(samples: Sequence[dict]) -> dict:
    """Stack per-sample dicts into a batch dict (see module doc). ``default_collate`` stacks the
    images straight into shared memory inside worker processes (no extra copy)."""
    images = [s["image"] for s in samples]
    first = images[0]
    if not isinstance(first, torch.Tensor) or first.dtype != torch.uint8 or first.ndim != 3:
        what = f"{type(first).__name__}" + (f" {first.dtype} {tuple(first.shape)}" if isinstance(first, torch.Tensor) else "")
        raise DataError(f"distillation samples must be uint8 image tensors (3, H, W), got {what}: "
                        "use fdistill.data.distill_transform")
    return {
        "images": default_collate(images),  # (B, 3, H, W) uint8
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "skipped": sum(s["skipped"] for s in samples),
    }


def default_num_workers() -> int:
    """Worker processes for one training process: its share of the CPUs it may use (divided
    among the processes torchrun starts on this node, ``LOCAL_WORLD_SIZE``), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        cpus = os.cpu_count() or 1
    try:
        local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_procs = 1
    return max(0, min(8, cpus // local_procs))


def build_distill_dataset(path_or_name: Union[str, os.PathLike, Sequence[str]], *, img_size, scale=(0.08, 1.0),
                          ratio=(3 / 4, 4 / 3), hflip: float = 0.5, seed: int = 0,
                          synthetic_size: int = DEFAULT_SYNTHETIC_SIZE, labels: Optional[bool] = False,
                          interpolation: str = "bilinear") -> Dataset:
    """The distillation dataset for ``path_or_name`` with the FD view (:func:`distill_transform`).

    Args:
        path_or_name: an image folder (recursive; see :class:`ImageFolderDataset`); tar shards
            (``"/data/train-{000000..000099}.tar"``, a glob, ``::``-joined patterns or a list;
            needs ``webdataset``); ``"synthetic"`` or ``"synthetic:N"`` (N images of
            :class:`SyntheticShapes`, rendered at ``img_size``).
        img_size: output side; scale, ratio, hflip, interpolation: the view (paper defaults).
        seed: augmentation seed (and the synthetic dataset's seed, and the shard shuffle's).
        labels: image folders only: ``False`` (default; FD needs none) -> label -1, ``True`` ->
            class sub-folders required, ``None`` -> class sub-folders when present.

    Raises:
        DataError: missing path, no images, unreadable shards, unknown name -- before any compute.
    """
    transform = distill_transform(img_size, scale=scale, ratio=ratio, hflip=hflip, interpolation=interpolation)
    if isinstance(path_or_name, (list, tuple)):
        return WebShardDataset(list(path_or_name), transform, seed=seed)
    spec = os.fspath(path_or_name)
    name, _, arg = spec.partition(":")
    if name == "synthetic":
        n = synthetic_size
        if arg:
            try:
                n = int(arg)
            except ValueError:
                raise DataError(f"bad dataset {spec!r}: expected 'synthetic' or 'synthetic:N' (N images)") from None
        size = img_size if isinstance(img_size, int) else max(img_size)
        return DistillDataset(SyntheticShapes(n, size, seed=seed, split="train"), transform, seed=seed)
    if looks_like_shards(spec):
        return WebShardDataset(spec, transform, seed=seed)
    path = Path(spec).expanduser()
    if not path.exists():
        if os.sep not in spec and "." not in spec:
            raise DataError(f"unknown dataset {spec!r}: give an image folder, tar shards (a '.tar' pattern) "
                            f"or 'synthetic[:N]'")
        raise DataError(f"data path {spec!r} does not exist")
    return DistillDataset(ImageFolderDataset(path, labels=labels), transform, seed=seed)


class DistillDataLoader(DataLoader):
    """A ``DataLoader`` with an epoch/resume switch that works for map-style and shard datasets.

    ``loader.set_epoch(e, start_index=k)`` before iterating epoch ``e`` (``k``: samples this rank
    already consumed in it, to resume). ``samples_per_epoch`` / ``batches_per_epoch``: this
    rank's whole epoch (``len(loader)`` is what remains of the current one).
    """

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        target = self.sampler if isinstance(self.sampler, ResumableDistributedSampler) else self.dataset
        target.set_epoch(epoch)
        target.set_start(start_index)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch if isinstance(self.sampler, ResumableDistributedSampler) else self.dataset.epoch

    @property
    def samples_per_epoch(self) -> Optional[int]:
        if isinstance(self.sampler, ResumableDistributedSampler):
            return self.sampler.num_samples
        return None  # a stream's length is unknown

    @property
    def batches_per_epoch(self) -> Optional[int]:
        n = self.samples_per_epoch
        if n is None:
            return None
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def build_distill_loader(dataset: Dataset, *, batch_size: int, num_workers: Optional[int] = None, seed: int = 0,
                         epoch: int = 0, start_index: int = 0, num_replicas: int = 1, rank: int = 0,
                         drop_last: bool = True, shuffle: bool = True, pin_memory: Optional[bool] = None,
                         persistent_workers: Optional[bool] = None,
                         prefetch_factor: Optional[int] = None) -> DistillDataLoader:
    """A loader of distillation batches (dicts, see module doc) for one rank.

    Args:
        dataset: from :func:`build_distill_dataset` (any map-style dataset of ``(image tensor,
            label)`` is wrapped, with no bad-file substitution).
        batch_size: per rank.
        num_workers: worker processes (default :func:`default_num_workers`).
        seed: the shuffle seed (same on every rank; the augmentation seed is the dataset's).
        epoch, start_index: start in this epoch, after this rank's first ``start_index`` samples.
        num_replicas, rank: distributed split (``torch.distributed`` world size and rank).
        drop_last: equal shards per rank and only full batches (what training wants).
        pin_memory: default: when CUDA is available. persistent_workers: default: when workers
            are used (map-style data; shard streams always restart workers each epoch so
            they see the new epoch). prefetch_factor: batches in flight per worker (default 4).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    num_workers = default_num_workers() if num_workers is None else int(num_workers)
    pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    worker_kw = {}
    if num_workers > 0:
        worker_kw["prefetch_factor"] = 4 if prefetch_factor is None else int(prefetch_factor)

    if isinstance(dataset, WebShardDataset):
        dataset.configure(num_replicas=num_replicas, rank=rank, batch_size=batch_size)
        dataset.set_epoch(epoch)
        dataset.set_start(start_index)
        if persistent_workers:
            log.warning("persistent_workers ignored for shard streams (workers must see each new epoch)")
        return DistillDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_distill,
                                 pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                                 persistent_workers=False, **worker_options(num_workers), **worker_kw)

    if not isinstance(dataset, DistillDataset):
        dataset = DistillDataset(dataset, None, seed=seed)
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset!r} is empty")
    sampler = ResumableDistributedSampler(len(dataset), num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=drop_last, yield_epoch=True)
    if drop_last and sampler.num_samples < batch_size:
        raise DataError(f"{len(dataset)} samples over {num_replicas} rank(s) give {sampler.num_samples} per rank, "
                        f"fewer than one batch of {batch_size} (with drop_last)")
    sampler.set_epoch(epoch)
    sampler.set_start(start_index)
    persistent = (num_workers > 0) if persistent_workers is None else (bool(persistent_workers) and num_workers > 0)
    return DistillDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                             collate_fn=collate_distill, pin_memory=pin_memory, drop_last=drop_last,
                             generator=generator, persistent_workers=persistent, **worker_options(num_workers),
                             **worker_kw)
