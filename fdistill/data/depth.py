"""Monocular depth datasets for ``fdistill depth`` (the paper's NYUv2 benchmark).

``build_depth_dataset(spec, split, crop_size, train=...)`` gives ``(image uint8 (3, H, W), depth
float32 (1, H, W) metres)`` from:

- a **NYUv2 folder in the BTS / GLPDepth / Depth-Anything layout**: a split file of
  ``rgb_path depth_path [focal]`` lines relative to the folder (a leading ``/`` is dropped), depth
  maps as 16-bit PNGs in millimetres (``depth_scale`` 1000), 0 = no measurement. The split file is
  ``nyu_train.txt`` / ``nyu_test.txt`` (BTS's names) or ``train.txt`` / ``test.txt``; split ``val``
  reads the test file.
- ``synthetic[:N]``: the built-in shapes (:class:`~fdistill.data.SyntheticShapes`) with a depth map
  made from each scene: a ground plane receding from 2 m (bottom row) to 8 m (top row) and every
  object upright at one depth in front of it, later-drawn objects nearer (the renderer draws the
  distractors first and the main object last, on top), so occlusion and depth agree.

Pixels with depth 0 or beyond ``max_depth`` stay in the map; the loss and the metrics leave them out.
Training takes a random ``crop_size`` square crop and a horizontal flip of image and depth together
(torchvision ``transforms.v2``; depth as a ``Mask``, so it is never interpolated); evaluation keeps
the whole image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .synthetic import SyntheticShapes

__all__ = ["DepthFolder", "SyntheticDepth", "DepthTransform", "build_depth_dataset", "synthetic_depth_map"]

SPLIT_FILES = {"train": ("nyu_train.txt", "train.txt"), "val": ("nyu_test.txt", "test.txt"),
               "test": ("nyu_test.txt", "test.txt")}
DEFAULT_SYNTHETIC_TRAIN = 2000


class DepthTransform:
    """(image uint8 (3, H, W), depth (1, H, W)) -> the same, cropped and flipped together (training)."""

    def __init__(self, crop_size: int, *, train: bool, flip: bool = True):
        from torchvision.transforms import v2

        ops = [v2.RandomCrop(int(crop_size), pad_if_needed=True, fill=0)]
        if flip:
            ops.append(v2.RandomHorizontalFlip())
        self.tf = v2.Compose(ops) if train else None

    def __call__(self, image: torch.Tensor, depth: torch.Tensor):
        if self.tf is None:
            return image, depth
        from torchvision import tv_tensors

        img, d = self.tf(tv_tensors.Image(image), tv_tensors.Mask(depth))
        return img.as_subclass(torch.Tensor), d.as_subclass(torch.Tensor)


def synthetic_depth_map(sample: dict, size: int) -> np.ndarray:
    """The depth (metres, float32 (S, S)) of a :meth:`SyntheticShapes.sample` (module docstring):
    object ``k`` (mask id, 1 = main, 2.. = distractors in drawing order) stands where its box's
    bottom edge meets the ground, moved nearer the later it is drawn."""
    rows = np.arange(size, dtype=np.float32)
    ground = 8.0 - 6.0 * rows / max(size - 1, 1)  # (S,) 8 m at the top row, 2 m at the bottom
    depth = np.repeat(ground[:, None], size, axis=1)
    mask = sample["mask"]
    n = len(sample["boxes"])
    for k in range(1, n + 1):
        sel = mask == k
        if not sel.any():
            continue
        y1 = sample["boxes"][k - 1][3] - 1  # where the object meets the ground
        order = n - k if k > 1 else n  # drawing order: distractors 2..n first, the main object last
        depth[sel] = max(ground[min(max(y1, 0), size - 1)] - 0.3 * (1 + order), 0.5)
    return depth.astype(np.float32)


class SyntheticDepth(Dataset):
    """:class:`SyntheticShapes` images with :func:`synthetic_depth_map` depth."""

    def __init__(self, shapes: SyntheticShapes, transform: Optional[DepthTransform] = None):
        self.shapes, self.transform = shapes, transform

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int):
        s = self.shapes.sample(index)
        img = torch.from_numpy(np.asarray(s["image"], dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        depth = torch.from_numpy(synthetic_depth_map(s, self.shapes.img_size))[None]  # (1, S, S)
        return self.transform(img, depth) if self.transform else (img, depth)


class DepthFolder(Dataset):
    """A NYUv2-layout folder (module docstring); every listed file is checked at construction."""

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike, transform=None, *,
                 depth_scale: float = 1000.0):
        self.root = Path(root).expanduser()
        sf = Path(split_file)
        if not sf.is_file():
            raise DataError(f"{sf}: no such split file")
        self.items: List[Tuple[Path, Path]] = []
        for n, line in enumerate(sf.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{sf}:{n}: expected 'rgb_path depth_path [focal]', got {line!r}")
            self.items.append((self.root / parts[0].lstrip("/"), self.root / parts[1].lstrip("/")))
        if not self.items:
            raise DataError(f"{sf}: lists no images")
        missing = [str(p) for pair in self.items for p in pair if not p.is_file()]
        if missing:
            raise DataError(f"{sf}: {len(missing)} listed file(s) missing, e.g. {missing[:3]}")
        self.transform, self.depth_scale, self.split_file = transform, float(depth_scale), sf

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        ip, dp = self.items[index]
        try:
            with Image.open(ip) as im:
                img = np.asarray(im.convert("RGB"), dtype=np.uint8)
            with Image.open(dp) as dm:
                if dm.mode not in ("I;16", "I;16B", "I"):
                    raise DataError(f"{dp}: a depth map must be a 16-bit PNG in millimetres, got mode {dm.mode}")
                depth = np.asarray(dm, dtype=np.float32) / self.depth_scale
        except DataError:
            raise
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {ip.name} / {dp.name}: {e}") from e
        if depth.shape != img.shape[:2]:
            raise DataError(f"{dp}: depth map is {depth.shape[1]}x{depth.shape[0]} but its image is "
                            f"{img.shape[1]}x{img.shape[0]}")
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)  # (3, H, W)
        d = torch.from_numpy(depth.copy())[None]  # (1, H, W)
        return self.transform(x, d) if self.transform else (x, d)


def build_depth_dataset(spec: str, split: str, crop_size: int, *, train: bool, flip: bool = True,
                        max_depth: float = 10.0, seed: int = 0, img_size: int = 32) -> Dataset:
    """The dataset ``spec`` names (module docstring), cropped for training or whole for evaluation.
    ``max_depth`` is the recipe's (the loss and metrics mask deeper pixels)."""
    if split not in SPLIT_FILES:
        raise DataError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    tf = DepthTransform(crop_size, train=train, flip=flip)
    name, _, arg = str(spec).partition(":")
    if name == "synthetic" and not Path(str(spec)).exists():
        try:
            n_train = int(arg) if arg else DEFAULT_SYNTHETIC_TRAIN
        except ValueError:
            raise DataError(f"bad dataset {spec!r}: expected 'synthetic' or 'synthetic:N'") from None
        n = n_train if split == "train" else max(10, n_train // 5)
        return SyntheticDepth(SyntheticShapes(n, img_size, seed=seed, split="train" if split == "train" else "val"), tf)
    p = Path(str(spec)).expanduser()
    if p.is_file():
        return DepthFolder(p.parent, p, tf)
    if not p.is_dir():
        raise DataError(f"depth data {spec!r}: not a folder (NYUv2 layout), a split file, nor 'synthetic[:N]'")
    for f in SPLIT_FILES[split]:
        if (p / f).is_file():
            return DepthFolder(p, p / f, tf)
    raise DataError(f"{p}: no split file for {split!r} (expected one of {', '.join(SPLIT_FILES[split])})")
