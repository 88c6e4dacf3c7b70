"""The segmentation probe's picture: a few validation images, their label maps and the probe's
predictions, side by side (one row per image), so a mIoU can be looked at."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..diagnostics.plots import pyplot, save_figure


def class_palette(num_classes: int) -> np.ndarray:
    """(K + 1, 3) float RGB: distinct colours per class (tab20, then hsv), the last row black for
    ignored pixels."""
    plt = pyplot()
    cmap = plt.get_cmap("tab20" if num_classes <= 20 else "hsv")
    cols = [cmap(i % 20 if num_classes <= 20 else i / num_classes)[:3] for i in range(num_classes)]
    return np.array(cols + [(0.0, 0.0, 0.0)], dtype=np.float32)


def plot_segmentation_examples(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor,
                               classes: Sequence[str], path: str | os.PathLike, *, ignore_index: int = 255,
                               title: Optional[str] = None) -> Path:
    """images uint8 (n, 3, S, S), masks and preds int (n, S, S) -> a PNG with columns image /
    ground truth / prediction; ignored pixels black; a legend of the classes that appear."""
    plt = pyplot()
    K = len(classes)
    pal = class_palette(K)

    def colour(m: torch.Tensor) -> np.ndarray:
        idx = m.long().clone()
        idx[(idx == ignore_index) | (idx < 0) | (idx >= K)] = K
        return pal[idx.numpy()]

    n = images.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n + 0.4), squeeze=False)
    for r in range(n):
        panels = (images[r].permute(1, 2, 0).numpy(), colour(masks[r]), colour(preds[r]))
        for c, (img, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    seen = sorted({int(v) for t in (masks, preds) for v in t.unique().tolist() if 0 <= int(v) < K})
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=pal[k], label=str(classes[k])) for k in seen[:24]], loc="lower center",
               ncol=min(4, max(1, len(seen))), fontsize=7.5, frameon=False, bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=9.5)
    legend_rows = -(-len(seen[:24]) // 4)
    fig.tight_layout(rect=(0, (0.1 + 0.17 * legend_rows) / fig.get_figheight(), 1, 1))  # room for the legend
    return save_figure(fig, path)
