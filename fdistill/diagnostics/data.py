"""Image batches for the diagnostics: the same seeded subset of a dataset for every model, each at
its own input size, without augmentation (``fdistill.data.eval_transform``: resize + centre crop).

Images stay uint8 until they reach the device, where each model normalises them with its own
mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from ..data.workers import worker_options

Size2 = Tuple[int, int]


@dataclass
class ImageBatches:
    """A re-iterable of ``(uint8 images (B, 3, H, W), labels (B,))`` over a fixed subset.

    ``indices`` are the dataset indices used (the same for every model given the same seed);
    ``classes`` the dataset's class names."""

    dataset: object
    indices: List[int]
    batch_size: int
    num_workers: int
    classes: List[str]

    def __len__(self) -> int:  # number of batches
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    @property
    def num_images(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(Subset(self.dataset, self.indices), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, persistent_workers=False,
                            **worker_options(self.num_workers))
        for images, labels in loader:
            yield images, torch.as_tensor(labels, dtype=torch.long)

    def materialize(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """All batches in memory (uint8): for sweeps that revisit the same images many times."""
        return list(iter(self))


def choose_indices(n_total: int, num_images: Optional[int], seed: int) -> List[int]:
    """A seeded random subset of ``num_images`` indices (sorted), or all of them."""
    if n_total <= 0:
        from ..data.errors import DataError

        raise DataError("the dataset is empty")
    if num_images is None or num_images >= n_total:
        return list(range(n_total))
    if num_images <= 0:
        raise ValueError(f"--images must be positive, got {num_images}")
    g = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n_total, generator=g)[:num_images].tolist())


def image_batches(data: str, *, split: str, img_size: Size2, num_images: Optional[int], batch_size: int,
                  seed: int = 0, num_workers: Optional[int] = None) -> ImageBatches:
    """Deterministic uint8 batches of ``data`` (folder, ``synthetic[:N]`` or a torchvision name)
    at ``img_size``: the subset depends only on ``seed`` and the dataset's length."""
    from ..data import build_classification_dataset, default_num_workers, eval_transform

    h, w = int(img_size[0]), int(img_size[1])
    ds = build_classification_dataset(data, split, eval_transform((h, w)), synthetic_img_size=max(16, max(h, w)),
                                      seed=0)
    idx = choose_indices(len(ds), num_images, seed)
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    workers = min(default_num_workers(), 4) if num_workers is None else int(num_workers)
    workers = min(workers, max(0, len(idx) // max(1, batch_size)))  # no idle worker processes for tiny runs
    return ImageBatches(ds, idx, int(batch_size), workers, list(getattr(ds, "classes", []) or []))
