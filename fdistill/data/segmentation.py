"""Semantic segmentation datasets for the dense evaluation (``fdistill segprobe``).

``build_segmentation_dataset(spec, split, img_size, train=...)`` gives a dataset of
``(image uint8 (3, S, S), mask int64 (S, S))`` with a ``classes`` list, from:

- an ADE20K-style folder: ``root/images/<split>/*.jpg`` with ``root/annotations/<split>/*.png``
  label maps of the same name and size (split ``train`` is also found as ``training``, ``val`` as
  ``validation``: ADEChallengeData2016 as downloaded). Class names come from ``root/classes.txt``
  (one per line) when present, else ``num_classes`` must be given. ``reduce_zero_label`` is
  ADE20K's convention: label 0 ("other") is ignored and 1..K become 0..K-1 (mmsegmentation's
  ``reduce_zero_label=True``).
- ``synthetic[:N]``: the built-in shapes (:class:`~fdistill.data.SyntheticShapes`) with their
  per-pixel object masks turned into classes: 0 background, 1 + shape index for every object's
  pixels (11 classes). Same images and splits as the classification commands.

Pixels labelled ``ignore_index`` (255) count in neither the loss nor the metrics. Images and
masks are transformed together by torchvision's ``transforms.v2`` (a mask is resized with
nearest-neighbour): training takes a random resized crop (``scale``) and a horizontal flip,
evaluation resizes the whole image to ``S x S`` (the metrics are taken at that resolution).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .folder import IMG_EXTENSIONS
from .synthetic import SHAPES, SyntheticShapes, synthetic_split_size

IGNORE_INDEX = 255
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "validation")}
DEFAULT_SYNTHETIC_TRAIN = 2000

__all__ = ["SegmentationFolder", "SyntheticSegmentation", "SegmentationTransform", "segmentation_transform",
           "SegmentationCropTransform", "SegmentationRescaleTransform", "rescale_size",
           "build_segmentation_dataset", "IGNORE_INDEX"]


class SegmentationTransform:
    """(PIL image, (H, W) integer mask) -> (uint8 (3, S, S), int64 (S, S)), transformed together by
    torchvision ``transforms.v2`` (the mask with nearest-neighbour). A class, not a closure, so
    loader workers can pickle it under any start method."""

    def __init__(self, img_size: int | Tuple[int, int], *, train: bool, scale: Sequence[float] = (0.5, 1.0),
                 interpolation: str = "bilinear"):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import v2

        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        interp = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
        ops = [v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp, antialias=True),
               v2.RandomHorizontalFlip()] if train else [v2.Resize(size, interpolation=interp, antialias=True)]
        self.tf = v2.Compose([v2.ToImage(), *ops])

    def __call__(self, image: Image.Image, mask: np.ndarray):
        from torchvision import tv_tensors

        img, m = self.tf(image, tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)).long()))
        return img.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"SegmentationTransform({self.tf})"


def segmentation_transform(img_size: int | Tuple[int, int], *, train: bool,
                           scale: Sequence[float] = (0.5, 1.0), interpolation: str = "bilinear"):
    """Training crops (RandomResizedCrop ``scale`` + flip) or the evaluation resize, applied to
    image and mask together: a :class:`SegmentationTransform`."""
    return SegmentationTransform(img_size, train=train, scale=scale, interpolation=interpolation)


def rescale_size(height: int, width: int, img_scale: Sequence[int], ratio: float = 1.0) -> Tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size of the image's aspect ratio that fits a box of
    ``img_scale`` (short, long) x ``ratio``, whichever way round the image is.

    >>> rescale_size(480, 640, (512, 2048))   # the short side reaches 512 first
    (512, 683)
    >>> rescale_size(100, 1000, (512, 2048))  # a long panorama: the long side reaches 2048 first
    (205, 2048)
    """
    short, long = min(img_scale) * ratio, max(img_scale) * ratio
    f = min(long / max(height, width), short / min(height, width))
    return int(height * f + 0.5), int(width * f + 0.5)


class _JointTransform:
    def __call__(self, image: Image.Image, mask: np.ndarray):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        m = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)).long())
        size = rescale_size(image.height, image.width, self.img_scale, self._ratio())
        img = TF.resize(TF.to_image(image), list(size), antialias=True)  # bilinear
        m_resized = TF.resize(m, list(size))  # a Mask: nearest
        return self._after(img, m_resized, m)

    def _ratio(self) -> float:
        return 1.0


class SegmentationCropTransform(_JointTransform):
    """mmsegmentation's ADE20K training pipeline (BEiT's UPerNet recipe), on image and mask together
    with torchvision ``transforms.v2``: rescale to fit ``img_scale`` (short, long) x a random ratio
    from ``ratio_range`` keeping the aspect ratio (:func:`rescale_size`, mmseg's
    ``RandomResize(keep_ratio=True)``), a random ``crop_size`` crop padded where the image is
    smaller (image 0, mask ``ignore_index``), a horizontal flip and the photometric distortion
    (brightness / contrast / saturation / hue: ``RandomPhotometricDistort``, SSD's =
    mmsegmentation's). mmsegmentation's ``cat_max_ratio`` (re-drawing crops dominated by one class)
    is not reproduced. The ratio is drawn from torch's generator (seeded per loader worker).
    Gives (uint8 (3, c, c), int64 (c, c))."""

    def __init__(self, crop_size: int, *, img_scale: Sequence[int] = (512, 2048),
                 ratio_range: Sequence[float] = (0.5, 2.0), flip: bool = True, photometric: bool = True):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.img_scale, self.ratio_range = tuple(int(v) for v in img_scale), tuple(float(r) for r in ratio_range)
        ops = [v2.RandomCrop(int(crop_size), pad_if_needed=True,
                             fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})]
        if flip:
            ops.append(v2.RandomHorizontalFlip())
        if photometric:
            ops.append(v2.RandomPhotometricDistort(p=0.5))
        self.tf = v2.Compose(ops)

    def _ratio(self) -> float:
        lo, hi = self.ratio_range
        return float(torch.empty(()).uniform_(lo, hi)) if hi > lo else lo

    def _after(self, img, mask, _original):
        img, m = self.tf(img, mask)
        return img.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"SegmentationCropTransform(img_scale={self.img_scale}, ratio_range={self.ratio_range}, {self.tf})"


class SegmentationRescaleTransform(_JointTransform):
    """The evaluation side of :class:`SegmentationCropTransform`: the image rescaled to fit
    ``img_scale`` (keeping its aspect ratio), the label map left at the image's *original* size,
    where the metrics are taken (mmsegmentation's single-scale test: predictions are resized back)."""

    def __init__(self, img_scale: Sequence[int] = (512, 2048)):
        self.img_scale = tuple(int(v) for v in img_scale)

    def _after(self, img, _mask, original):
        return img.as_subclass(torch.Tensor), original.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"SegmentationRescaleTransform(img_scale={self.img_scale})"


class SyntheticSegmentation(Dataset):
    """:class:`SyntheticShapes` with semantic masks: 0 background, ``1 + shape`` for object pixels."""

    def __init__(self, shapes: SyntheticShapes, transform=None):
        self.shapes, self.transform = shapes, transform
        self.classes: List[str] = ["background"] + list(SHAPES)
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"SyntheticSegmentation({self.shapes!r})"

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        s = self.shapes.sample(index)
        ids = s["mask"]  # 0 background, k = object k (1 main, 2.. distractors)
        lut = np.zeros(256, np.uint8)
        for k, c in enumerate(s["box_labels"]):
            lut[k + 1] = 1 + c
        return s["image"], lut[ids]

    def __getitem__(self, index: int):
        img, mask = self.load(index)
        return self.transform(img, mask) if self.transform else (img, mask)


class SegmentationFolder(Dataset):
    """ADE20K-style ``root/images/<split>`` + ``root/annotations/<split>`` (see module doc)."""

    def __init__(self, root: str | os.PathLike, split: str, transform=None, *, num_classes: Optional[int] = None,
                 reduce_zero_label: bool = False):
        self.root = Path(root).expanduser()
        img_dir = ann_dir = None
        for name in SPLIT_FOLDERS.get(split, (split,)):
            if (self.root / "images" / name).is_dir():
                img_dir, ann_dir = self.root / "images" / name, self.root / "annotations" / name
                break
        if img_dir is None:
            raise DataError(f"{self.root}: no images/{' or images/'.join(SPLIT_FOLDERS.get(split, (split,)))} folder "
                            "(expected the ADE20K layout: images/<split>/*.jpg and annotations/<split>/*.png)")
        if not ann_dir.is_dir():
            raise DataError(f"{self.root}: images/{img_dir.name} has no matching annotations/{img_dir.name} folder")
        self.images = sorted(p for p in img_dir.iterdir()
                             if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
        if not self.images:
            raise DataError(f"{img_dir}: no images")
        self.masks = [ann_dir / (p.stem + ".png") for p in self.images]
        missing = [p.name for p in self.masks if not p.is_file()]
        if missing:
            raise DataError(f"{ann_dir}: no label map for {len(missing)} image(s), e.g. {missing[:3]} "
                            "(each image needs a PNG of the same name)")
        names_file = self.root / "classes.txt"
        if names_file.is_file():
            self.classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
            if num_classes is not None and num_classes != len(self.classes):
                raise DataError(f"num_classes={num_classes} but {names_file} lists {len(self.classes)} classes")
        elif num_classes is not None:
            self.classes = [str(i) for i in range(int(num_classes))]
        else:
            raise DataError(f"{self.root}: give num_classes (or a classes.txt with one class name per line)")
        self.transform, self.reduce_zero_label, self.split = transform, bool(reduce_zero_label), split
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"SegmentationFolder({str(self.root)!r}, {self.split!r}, {len(self)} images, "
                f"{len(self.classes)} classes)")

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        ip, mp = self.images[index], self.masks[index]
        try:
            with Image.open(ip) as im:
                img = im.convert("RGB")
            with Image.open(mp) as m:
                if m.mode not in ("L", "P", "I;16", "I"):
                    raise DataError(f"{mp}: a label map must be a single-channel PNG (mode L or P), got {m.mode}")
                mask = np.array(m, dtype=np.int64)
        except DataError:
            raise
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {ip.name} / {mp.name}: {e}") from e
        if mask.shape != (img.height, img.width):
            raise DataError(f"{mp}: label map is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{img.width}x{img.height}")
        return img, self._labels(mask, mp)

    def _labels(self, mask: np.ndarray, mp: Path) -> np.ndarray:
        """Stored values -> training labels (``reduce_zero_label``), or a DataError naming the
        values outside the classes."""
        if self.reduce_zero_label:  # 0 ("other") -> ignored, 1..K -> 0..K-1
            mask = np.where(mask == 0, IGNORE_INDEX, mask - 1)
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= len(self.classes)))
        if bad.any():
            raise DataError(f"{mp}: labels {sorted(set(mask[bad].tolist()))[:5]} outside 0..{len(self.classes) - 1}"
                            + ("" if self.reduce_zero_label else " (ADE20K label maps need reduce_zero_label=true)"))
        return mask

    def check(self, indices: Optional[Sequence[int]] = None, *, progress: bool = False) -> None:
        """Decode every label map (or those of ``indices``; images only by their headers) and raise
        the :class:`DataError` :meth:`load` would: a label outside the classes, a map that is not
        single-channel or of another size than its image, a file PIL cannot open. The fine-tuning
        command runs this before training (ADE20K's 20k maps: seconds), so bad labels fail before
        the first step, not at the image that has them."""
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)) if indices is None else indices, desc="checking label maps", unit="map",
                      disable=not progress, leave=False):
            ip, mp = self.images[i], self.masks[i]
            try:
                with Image.open(ip) as im, Image.open(mp) as m:
                    size, mode = im.size, m.mode
                    mask = np.array(m, dtype=np.int64)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {ip.name} / {mp.name}: {e}") from e
            if mode not in ("L", "P", "I;16", "I"):
                raise DataError(f"{mp}: a label map must be a single-channel PNG (mode L or P), got {mode}")
            if mask.shape != (size[1], size[0]):
                raise DataError(f"{mp}: label map is {mask.shape[1]}x{mask.shape[0]} but its image is "
                                f"{size[0]}x{size[1]}")
            self._labels(mask, mp)

    def __getitem__(self, index: int):
        img, mask = self.load(index)
        return self.transform(img, mask) if self.transform else (img, mask)


def build_segmentation_dataset(spec: str, split: str, img_size: int | Tuple[int, int], *, train: bool,
                               num_classes: Optional[int] = None, reduce_zero_label: bool = False,
                               scale: Sequence[float] = (0.5, 1.0), interpolation: str = "bilinear",
                               seed: int = 0, transform=None) -> Dataset:
    """The dataset ``spec`` names (see module doc), transformed for training or evaluation
    (``transform``: another joint (image, mask) transform, e.g. :class:`SegmentationCropTransform`)."""
    if split not in SPLIT_FOLDERS:
        raise DataError(f"split must be one of {sorted(SPLIT_FOLDERS)}, got {split!r}")
    tf = transform or segmentation_transform(img_size, train=train, scale=scale, interpolation=interpolation)
    sizes = synthetic_split_size(spec, split, DEFAULT_SYNTHETIC_TRAIN)
    if sizes is not None:
        n = sizes[1]
        ds = SyntheticSegmentation(SyntheticShapes(n, 32, seed=seed, split=split), tf)
        if num_classes is not None and num_classes != len(ds.classes):
            raise DataError(f"synthetic segmentation has {len(ds.classes)} classes, not num_classes={num_classes}")
        return ds
    if not Path(str(spec)).expanduser().is_dir():
        raise DataError(f"segmentation data {spec!r}: not a folder (ADE20K layout) nor 'synthetic[:N]'")
    return SegmentationFolder(spec, split, tf, num_classes=num_classes, reduce_zero_label=reduce_zero_label)
