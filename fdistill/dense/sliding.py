"""Sliding-window inference (mmsegmentation's ``slide`` test mode), for dense models that take a
fixed input size: the segmentation and depth evaluations score whole images of any size with it.
Written here because neither timm nor torchvision has it (mmsegmentation does not install
against this torch)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["sliding_window"]


def sliding_window(model: nn.Module, x: torch.Tensor, channels: int, crop: int, stride: int, *,
                   key: str = "logits") -> torch.Tensor:
    """mmsegmentation's ``slide_inference``: ``crop`` x ``crop`` windows every ``stride`` pixels
    (the last row / column of windows aligned to the far edge), their logits summed and divided by
    how many windows cover each pixel. An image smaller than a window is padded (zeros, i.e. the
    mean colour after normalisation) and the padding cropped from the logits.

    ``x``: (1, 3, H, W) normalised -> (1, channels, H, W): the mean of ``model(windows)[key]``
    (segmentation logits, depth) over the windows covering each pixel."""
    _, _, H, W = x.shape
    ph, pw = max(crop - H, 0), max(crop - W, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    Hp, Wp = x.shape[-2:]
    rows = max(Hp - crop + stride - 1, 0) // stride + 1
    cols = max(Wp - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride, c * stride
            y2, x2 = min(y1 + crop, Hp), min(x1 + crop, Wp)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    windows = torch.cat([x[:, :, a:b, c:d] for a, c, b, d in boxes])  # (n, 3, crop, crop)
    out = model(windows)[key].float()  # (n, channels, crop, crop)
    total = x.new_zeros(1, channels, Hp, Wp, dtype=torch.float32)
    count = x.new_zeros(1, 1, Hp, Wp, dtype=torch.float32)
    for (a, c, b, d), o in zip(boxes, out):
        total[0, :, a:b, c:d] += o
        count[0, :, a:b, c:d] += 1
    return (total / count)[:, :, :H, :W]
