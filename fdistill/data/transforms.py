"""Image transforms for distillation and evaluation (torchvision ``transforms.v2``).

Images stay ``uint8`` (3, H, W) tensors all the way to the device: 4x less host memory,
pinned-memory traffic and worker IPC than float32, and each network normalises them with its
own mean/std there (``FeatureDistiller`` does; CLIP's statistics differ from ImageNet's).

The distillation view is the paper's augmentation (Sec. 4.1, following the official code):
``RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3))`` + horizontal flip, one view shared by
teacher and student. Its randomness comes from torch's global generator, which the loader
seeds per sample (see :mod:`fdistill.data.loader`), so the view is a pure function of
``(seed, epoch, index)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from .errors import DataError

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}

#: images at most this big (side, pixels) are not centre-cropped by default: CIFAR-sized data
#: is usually evaluated on the whole image
SMALL_IMAGE = 64


def _size2(img_size) -> Tuple[int, int]:
    if isinstance(img_size, int):
        return (img_size, img_size)
    h, w = img_size
    return (int(h), int(w))


def _interp(name: str) -> InterpolationMode:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise DataError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}") from None


class _ToUint8Tensor(torch.nn.Module):
    """PIL / numpy HWC / tensor CHW -> plain uint8 tensor (3, H, W), without a float detour."""

    def forward(self, img):
        if isinstance(img, torch.Tensor):
            t = img.as_subclass(torch.Tensor)
            if t.dtype != torch.uint8:
                raise DataError(f"expected a uint8 image tensor, got {t.dtype}")
        else:
            t = v2.functional.pil_to_tensor(img) if hasattr(img, "getbands") else \
                torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 4:
            t = t[:3]
        return t.contiguous()


class DistillView(torch.nn.Module):
    """RandomResizedCrop + horizontal flip -> uint8 (3, H, W): the result (and the RNG draws) of
    ``v2.Compose([RandomResizedCrop, RandomHorizontalFlip])``, without ``v2``'s per-call
    dispatch (input flattening and type checks cost ~100 us per image, more than the crop of
    a 32 px image). The crop box is drawn by torchvision's own ``RandomResizedCrop`` and the
    pixels come from its ``resized_crop`` kernel."""

    def __init__(self, size: Tuple[int, int], scale, ratio, hflip: float, interpolation: InterpolationMode):
        super().__init__()
        self.to_tensor = _ToUint8Tensor()
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio),
                                         interpolation=interpolation, antialias=True)
        # torchvision >= 0.21 names it make_params; older versions _get_params
        self._params = getattr(self.crop, "make_params", None) or self.crop._get_params
        self.size, self.hflip, self.interpolation = list(size), float(hflip), interpolation

    def forward(self, img) -> torch.Tensor:
        t = self.to_tensor(img)  # (3, h, w) uint8
        p = self._params([t])
        out = v2.functional.resized_crop_image(t, p["top"], p["left"], p["height"], p["width"], self.size,
                                               interpolation=self.interpolation, antialias=True)
        if self.hflip > 0 and torch.rand(1) < self.hflip:  # the draw v2.RandomHorizontalFlip makes
            out = out.flip(-1)
        return out  # (3, H, W) uint8

    def extra_repr(self) -> str:
        return f"size={tuple(self.size)}, scale={self.crop.scale}, ratio={self.crop.ratio}, hflip={self.hflip}, " \
               f"interpolation={self.interpolation.value}"


def distill_transform(img_size: Union[int, Sequence[int]], scale: Tuple[float, float] = (0.08, 1.0),
                      ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                      interpolation: str = "bilinear") -> DistillView:
    """The FD training view: RandomResizedCrop + horizontal flip -> uint8 tensor (3, H, W).

    Args:
        img_size: output side (int) or (H, W).
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges (paper defaults).
        hflip: flip probability (0 disables).
        interpolation: ``bilinear`` (default: official ``data_fd.py`` uses ``T.RandomResizedCrop``'s
            default) | ``bicubic`` | ``nearest``.
    """
    if not (0 < scale[0] <= scale[1] <= 1.0):
        raise DataError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not (0 < ratio[0] <= ratio[1]):
        raise DataError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    if not 0.0 <= hflip <= 1.0:
        raise DataError(f"hflip must be a probability in [0, 1], got {hflip}")
    return DistillView(_size2(img_size), scale, ratio, hflip, _interp(interpolation))


def eval_transform(img_size: Union[int, Sequence[int]], crop_pct: Optional[float] = None,
                   interpolation: str = "bicubic") -> v2.Compose:
    """Deterministic evaluation view: resize the short side to ``img_size / crop_pct``, centre
    crop ``img_size`` -> uint8 tensor (3, H, W) (timm's convention).

    ``crop_pct`` defaults to 0.875 (the ImageNet convention) and to 1.0 (short side to ``img_size``, no border cut)
    for images of at most :data:`SMALL_IMAGE` pixels.
    """
    h, w = _size2(img_size)
    if crop_pct is None:
        crop_pct = 1.0 if max(h, w) <= SMALL_IMAGE else 0.875
    if not 0 < crop_pct <= 1.0:
        raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
    short = int(round(min(h, w) / crop_pct))
    return v2.Compose([_ToUint8Tensor(),
                       v2.Resize(short, interpolation=_interp(interpolation), antialias=True),
                       v2.CenterCrop((h, w))])
