"""Image-caption pairs for the demo's CLIP teacher, from the same data specs as every command."""
from __future__ import annotations

from typing import Tuple

from torch.utils.data import Dataset

from .clip_pretrain import CaptionedImages, class_caption_fn


def build_caption_pairs(data: str, split: str, img_size: int) -> Tuple[CaptionedImages, Dataset]:
    """(pairs, labelled dataset) for ``synthetic[:N]`` (attribute captions) or an image folder with
    class sub-folders ("a photo of a {class}"); images as uint8 ``img_size`` tensors."""
    from ..data import build_classification_dataset, eval_transform

    ds = build_classification_dataset(data, split, eval_transform(img_size, crop_pct=1.0))
    caption_fn = ds.caption if hasattr(ds, "caption") else class_caption_fn(ds)
    return CaptionedImages(ds, caption_fn), ds
