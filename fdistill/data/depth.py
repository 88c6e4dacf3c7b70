"""Monocular depth datasets for ``fdistill depth`` (the paper's NYUv2 depth benchmark).

``build_depth_dataset(spec, split, size, train=...)`` gives a dataset of
``(image uint8 (3, H, W), depth float32 (1, H, W) metres)`` from:

- a folder in the layout BTS, GLPDepth and Depth-Anything use for NYUv2: a split text file with
  one sample per line, ``rgb_path depth_path [focal]``, both paths relative to ``root`` (a leading
  ``/``, as in BTS's ``nyudepthv2_train_files_with_gt.txt``, is stripped). Depth maps are 16-bit
  PNGs in millimetres (``value / depth_scale`` = metres, ``depth_scale`` 1000). The split file of
  ``root`` is ``train.txt`` / ``test.txt`` (BTS's ``nyu_train.txt`` / ``nyu_test.txt`` too), or
  an explicit split file path is given (``val`` reads the test file: NYUv2 has no other).
- ``synthetic[:N]``: the built-in shapes (:class:`~fdistill.data.SyntheticShapes`) with their
  procedural depth maps (a receding ground plane with objects in front, see
  :mod:`fdistill.data.synthetic`), N training images and ``max(10, N // 5)`` validation ones.

**Invalid pixels are 0.** A 0 in the PNG (no sensor return) stays 0 metres, and so does anything
beyond ``max_depth`` (set to 0): the loss and the metrics
(:mod:`fdistill.dense.depth_loss`, :mod:`fdistill.dense.depth_metrics`) count only
``depth > min_depth`` (1e-3), so one value marks every pixel to ignore. Depth is transformed
together with its image and only ever resized with nearest-neighbour, so an invalid 0 is never
blended with its valid neighbours into a fake depth.

Broken data is refused with one :class:`~fdistill.data.DataError` naming the problem: at
construction a missing or empty split file, a malformed line, missing image or depth files (all
checked, a few named); at load a depth PNG that is not 16-bit (e.g. an 8-bit PNG: metres would
be off by orders of magnitude) or a depth map whose size differs from its image.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .synthetic import SyntheticShapes, synthetic_split_size

__all__ = ["DepthFolder", "SyntheticDepth", "DepthTransform", "build_depth_dataset", "synthetic_depth_map",
           "SPLIT_FILES", "DEFAULT_SYNTHETIC_TRAIN"]

#: a root folder's split files, tried in order
SPLIT_FILES = {"train": ("nyu_train.txt", "train.txt"),
               "val": ("nyu_test.txt", "test.txt", "val.txt"),
               "test": ("nyu_test.txt", "test.txt", "val.txt")}
DEFAULT_SYNTHETIC_TRAIN = 2000
#: the PIL modes of a 16-bit (or wider integer) single-channel PNG
DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")


def _image_tensor(img) -> torch.Tensor:
    """PIL image or (3, H, W) tensor -> uint8 (3, H, W)."""
    if isinstance(img, Image.Image):
        return torch.from_numpy(np.array(img.convert("RGB"), np.uint8)).permute(2, 0, 1).contiguous()
    return torch.as_tensor(img)


def _depth_tensor(depth) -> torch.Tensor:
    """(H, W) or (1, H, W) array / tensor -> float32 (1, H, W)."""
    d = torch.as_tensor(np.ascontiguousarray(depth) if isinstance(depth, np.ndarray) else depth, dtype=torch.float32)
    return d.unsqueeze(0) if d.ndim == 2 else d


def _invalidate(depth: np.ndarray, max_depth: Optional[float]) -> np.ndarray:
    """Beyond ``max_depth`` -> 0 (invalid, module doc)."""
    if max_depth is not None:
        depth[depth > max_depth] = 0.0
    return depth


# ----------------------------------------------------------------------------- transforms

class DepthTransform:
    """(image, depth) -> (uint8 (3, h, w), float32 (1, h, w)), transformed together with
    torchvision ``transforms.v2`` (depth wrapped as a ``Mask``: nearest-neighbour only).

    Training: an image smaller than ``size`` is first resized up keeping its aspect ratio until it
    holds a ``size`` crop, then a random ``size`` crop, a horizontal flip (``flip``) and, only if
    ``jitter``, brightness / contrast / saturation jitter of the image. Evaluation: the full image,
    untouched, or with ``multiple > 1`` resized so both sides are (the nearest) multiples of it
    (e.g. a patch size). ``size``: an int (square) or ``(h, w)``, e.g. BTS's 416 x 544 NYUv2 crop.
    Randomness is torch's (seeded per loader worker). A class, not a closure: workers pickle it.
    """

    def __init__(self, size: int | Tuple[int, int], train: bool, *, multiple: int = 1, flip: bool = True,
                 jitter: bool = False):
        from torchvision.transforms import v2

        self.size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise DataError(f"depth crop size must be a positive int or (h, w), got {size!r}")
        if int(multiple) < 1:
            raise DataError(f"multiple must be >= 1, got {multiple}")
        self.train, self.multiple, self.flip, self.jitter = bool(train), int(multiple), bool(flip), bool(jitter)
        ops = []
        if self.train:
            ops.append(v2.RandomCrop(self.size))
            if self.flip:
                ops.append(v2.RandomHorizontalFlip())
            if self.jitter:  # image only: v2 colour transforms pass masks through
                ops.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
        self.tf = v2.Compose(ops) if ops else None

    def _target_size(self, H: int, W: int) -> Optional[Tuple[int, int]]:
        """The size to resize to before the crop / for evaluation, or None to keep (H, W)."""
        if self.train:
            f = max(self.size[0] / H, self.size[1] / W)
            return None if f <= 1 else (max(self.size[0], math.ceil(H * f)), max(self.size[1], math.ceil(W * f)))
        if self.multiple == 1:
            return None
        m = self.multiple
        out = (max(m, int(H / m + 0.5) * m), max(m, int(W / m + 0.5) * m))  # nearest multiple, halves up
        return None if out == (H, W) else out

    def __call__(self, image, depth):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        img = tv_tensors.Image(_image_tensor(image))  # (3, H, W) uint8
        d = tv_tensors.Mask(_depth_tensor(depth))  # (1, H, W) float32 metres
        if tuple(img.shape[-2:]) != tuple(d.shape[-2:]):
            raise DataError(f"depth map is {tuple(d.shape[-2:])} but its image is {tuple(img.shape[-2:])}")
        size = self._target_size(int(img.shape[-2]), int(img.shape[-1]))
        if size is not None:
            img = TF.resize(img, list(size), antialias=True)  # bilinear
            d = TF.resize(d, list(size))  # a Mask: nearest, invalid zeros stay zeros
        if self.tf is not None:
            img, d = self.tf(img, d)
        return img.as_subclass(torch.Tensor), d.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return (f"DepthTransform(size={self.size}, train={self.train}, multiple={self.multiple}, flip={self.flip}, "
                f"jitter={self.jitter})")


# ----------------------------------------------------------------------------- datasets

class _DepthDataset(Dataset):
    transform = None

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):
        img, depth = self.load(index)
        if self.transform is not None:
            return self.transform(img, depth)
        return _image_tensor(img), _depth_tensor(depth)


def synthetic_depth_map(sample: dict, size: Optional[int] = None) -> np.ndarray:
    """The depth (float32 (S, S) metres) of a :meth:`SyntheticShapes.sample` dict: its ``depth``,
    which :class:`SyntheticShapes` renders itself (:mod:`fdistill.data.synthetic`)."""
    depth = sample["depth"]
    if size is not None and depth.shape != (size, size):
        raise DataError(f"synthetic depth map is {depth.shape}, not ({size}, {size})")
    return depth


class SyntheticDepth(_DepthDataset):
    """:class:`SyntheticShapes` images with their ``depth`` maps (metres, all within (1.3, 8])."""

    def __init__(self, shapes: SyntheticShapes, transform=None, *, max_depth: Optional[float] = 10.0):
        self.shapes, self.transform, self.max_depth = shapes, transform, max_depth

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"SyntheticDepth({self.shapes!r})"

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        s = self.shapes.sample(index)
        return s["image"], _invalidate(s["depth"], self.max_depth)  # (H, W) float32 metres


class DepthFolder(_DepthDataset):
    """``rgb_path depth_path [focal]`` lines under ``root`` (see module doc).

    Attributes: ``samples`` (list of ``(rgb Path, depth Path)``), ``focals`` (float or None each).
    """

    def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike, transform=None, *,
                 max_depth: Optional[float] = 10.0, depth_scale: float = 1000.0):
        self.root = Path(root).expanduser()
        split = Path(split_file).expanduser()
        if not split.is_file() and not split.is_absolute() and (self.root / split).is_file():
            split = self.root / split
        if not split.is_file():
            raise DataError(f"depth split file {split} does not exist (expected lines 'rgb_path depth_path [focal]')")
        if not float(depth_scale) > 0:
            raise DataError(f"depth_scale must be > 0 (PNG units per metre), got {depth_scale}")
        self.split_file, self.transform = split, transform
        self.max_depth, self.depth_scale = max_depth, float(depth_scale)
        self.samples: List[Tuple[Path, Path]] = []
        self.focals: List[Optional[float]] = []
        for n, line in enumerate(split.read_text().splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            focal: Optional[float] = None
            if len(fields) == 3:
                try:
                    focal = float(fields[2])
                except ValueError:
                    fields = []
            if len(fields) not in (2, 3):
                raise DataError(f"{split}:{n}: malformed line {line.strip()!r} "
                                "(expected 'rgb_path depth_path [focal]')")
            self.samples.append((self.root / fields[0].lstrip("/"), self.root / fields[1].lstrip("/")))
            self.focals.append(focal)
        if not self.samples:
            raise DataError(f"depth split file {split} lists no images")
        missing = [str(p.relative_to(self.root)) for pair in self.samples for p in pair if not p.is_file()]
        if missing:
            raise DataError(f"{self.root}: {len(missing)} file(s) listed in {split.name} are missing, "
                            f"e.g. {missing[:3]}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def items(self) -> List[Tuple[Path, Path]]:
        """The ``(rgb, depth)`` paths (the name of the first version of this class)."""
        return self.samples

    def __repr__(self) -> str:
        return f"DepthFolder({str(self.root)!r}, {self.split_file.name!r}, {len(self)} images)"

    def check(self, indices: Optional[Sequence[int]] = None, *, progress: bool = False) -> None:
        """Read the headers of every listed image and depth map (or of ``indices``; no pixel is
        decoded) and raise the :class:`DataError` :meth:`load` would: a depth map that is not
        16-bit, or of another size than its image, or a file PIL cannot open. The fine-tuning
        commands run this before training, so bad data fails in seconds, not hours in."""
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)) if indices is None else indices, desc="checking depth maps", unit="file",
                      disable=not progress, leave=False):
            ip, dp = self.samples[i]
            try:
                with Image.open(ip) as im, Image.open(dp) as dm:
                    mode, dsize, isize = dm.mode, dm.size, im.size
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {ip.name} / {dp.name}: {e}") from e
            if mode not in DEPTH_MODES:
                raise DataError(f"{dp}: a depth map must be a 16-bit single-channel PNG (mode I;16), got "
                                f"mode {mode} (an 8-bit PNG cannot hold millimetres)")
            if dsize != isize:
                raise DataError(f"{dp}: depth map is {dsize[0]}x{dsize[1]} but its image is {isize[0]}x{isize[1]} "
                                f"({ip.name})")

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        ip, dp = self.samples[index]
        try:
            with Image.open(ip) as im:
                img = im.convert("RGB")
            with Image.open(dp) as dm:
                if dm.mode not in DEPTH_MODES:
                    raise DataError(f"{dp}: a depth map must be a 16-bit single-channel PNG (mode I;16), got "
                                    f"mode {dm.mode} (an 8-bit PNG cannot hold millimetres)")
                raw = np.array(dm)  # (H, W) integer units, 0 = invalid
        except DataError:
            raise
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {ip.name} / {dp.name}: {e}") from e
        if raw.shape != (img.height, img.width):
            raise DataError(f"{dp}: depth map is {raw.shape[1]}x{raw.shape[0]} but its image is "
                            f"{img.width}x{img.height} ({ip.name})")
        depth = (raw.astype(np.float64) / self.depth_scale).astype(np.float32)  # (H, W) metres
        return img, _invalidate(depth, self.max_depth)


# ----------------------------------------------------------------------------- spec

def _split_file(root: Path, split: str) -> Path:
    for name in SPLIT_FILES[split]:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no split file for {split!r} (looked for {', '.join(SPLIT_FILES[split])}; "
                    "or give the split file's path)")


def build_depth_dataset(spec: str, split: str, size: int | Tuple[int, int], *, train: bool, flip: bool = True,
                        max_depth: float = 10.0, seed: int = 0, img_size: int = 32, multiple: int = 1,
                        depth_scale: float = 1000.0, transform=None) -> Dataset:
    """The dataset ``spec`` names (module doc), with a :class:`DepthTransform` (``size`` the
    training crop, ``flip`` its flip, ``multiple`` the evaluation rounding) unless ``transform`` is given.
    ``split``: ``train``, ``val`` or ``test`` (``val`` and ``test`` are the same held-out split).
    ``img_size``: the side of synthetic images (32, as the segmentation benchmark's)."""
    if split not in SPLIT_FILES:
        raise DataError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    tf = transform or DepthTransform(size, train=train, multiple=multiple, flip=flip)
    sizes = synthetic_split_size(spec, split, DEFAULT_SYNTHETIC_TRAIN)
    if sizes is not None:
        n = sizes[1]
        shapes = SyntheticShapes(n, img_size, seed=seed, split="train" if split == "train" else "val")
        return SyntheticDepth(shapes, tf, max_depth=max_depth)
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        return DepthFolder(path, _split_file(path, split), tf, max_depth=max_depth, depth_scale=depth_scale)
    if path.is_file():  # an explicit split file: paths relative to its folder
        return DepthFolder(path.parent, path, tf, max_depth=max_depth, depth_scale=depth_scale)
    raise DataError(f"depth data {spec!r}: not a folder (root with train.txt / test.txt), a split file, "
                    "nor 'synthetic[:N]'")
