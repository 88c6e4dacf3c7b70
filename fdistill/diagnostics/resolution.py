"""``fdistill diagnose resolution``: do a model's features keep their meaning across input sizes?

AM-RADIO v2.5 (Heinrich et al. 2024, arXiv 2412.07679, Sec. 3, Fig. 2) found that a student
distilled at one resolution changes "mode" at another: the same image at a higher size gives
features unlike those at the training size. This measures it for any model that takes several
input sizes. Each image is loaded once at the largest size asked for and resized (bicubic,
anti-aliased) to every size; at each size the model's patch map is resampled to its grid at the
reference size (the model's own input size; bilinear, anti-aliased when shrinking) and compared
there:

* ``patch_cosine``: the mean over images and patches of the cosine similarity between the
  patch features at that size and at the reference (1 at the reference itself);
* ``summary_cosine``: the same for the summary vector ([CLS], or the mean patch without one).

Both are *centred*: the reference features' mean over the batch (per channel) is subtracted from
both sides first. Transformer features share a large common direction (every [CLS] after the
final norm points much the same way), which puts the raw cosine of any two inputs near 1; the
centred cosine measures what differs between images, which is what should survive a resize.

A model trained with multi-resolution (``multi.resolution_fraction``) should hold both near 1
over the sizes it was trained at. Fixed-size models are listed as skipped, with the reason.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..distiller import resample_patch_grid
from ..images import to_float_images
from .plots import _caption, _title, pyplot, save_figure, save_json_atomic

log = logging.getLogger(__name__)

__all__ = ["resolution_similarity", "run_resolution_consistency", "plot_resolution_consistency"]


def _to_grid(patches: torch.Tensor, grid, ref_grid) -> torch.Tensor:
    """(B, N, C) patches on ``grid`` -> (B, N_ref, C) on ``ref_grid`` (anti-aliased when shrinking)."""
    if tuple(grid) == tuple(ref_grid):
        return patches.float()
    shrink = grid[0] > ref_grid[0] or grid[1] > ref_grid[1]
    return resample_patch_grid(patches, grid, ref_grid, antialias=shrink)


@torch.no_grad()
def resolution_similarity(backbone, batches, sizes: Sequence[int], *, device: torch.device,
                          progress: bool = False) -> Dict[str, Any]:
    """Mean patch / summary cosine similarity of ``backbone``'s features (a
    :class:`~fdistill.backbone.Backbone`) at each of ``sizes`` (pixels, square) against its own
    input size. ``batches``: (uint8 images (B, 3, H, W), labels) at the largest size or above."""
    from tqdm.auto import tqdm

    ref = tuple(backbone.img_size)
    sizes = sorted({int(s) for s in sizes} | {ref[0]}) if ref[0] == ref[1] else sorted({int(s) for s in sizes})
    ref_grid = backbone.grid_size(ref)
    patch_sum = {s: 0.0 for s in sizes}
    summary_sum = {s: 0.0 for s in sizes}
    n = 0
    for images, _ in tqdm(batches, desc=f"resolution {backbone.name}", unit="batch", disable=not progress):
        x = to_float_images(images.to(device))  # (B, 3, H, W) in [0, 1]

        def features(hw):
            xs = x if tuple(x.shape[-2:]) == tuple(hw) else \
                F.interpolate(x, size=tuple(hw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
            out = backbone.forward_tokens(backbone.normalize(xs))
            patches = _to_grid(out.patches, out.grid, ref_grid)  # (B, N_ref, C)
            has_prefix = out.prefix is not None and out.prefix.shape[1] > 0
            summary = out.prefix[:, 0].float() if has_prefix else out.patches.float().mean(1)  # (B, C)
            return patches, summary

        p_ref, s_ref = features(ref)
        p_mean, s_mean = p_ref.mean((0, 1)), s_ref.mean(0)  # (C,): the common direction (module doc)
        for s in sizes:
            p, v = (p_ref, s_ref) if (s, s) == ref else features((s, s))
            patch_sum[s] += float(F.cosine_similarity(p - p_mean, p_ref - p_mean, dim=-1).mean(1).sum())
            summary_sum[s] += float(F.cosine_similarity(v - s_mean, s_ref - s_mean, dim=-1).sum())
        n += x.shape[0]
    return dict(reference_px=list(ref), sizes=sizes, num_images=n,
                patch_cosine=[patch_sum[s] / max(n, 1) for s in sizes],
                summary_cosine=[summary_sum[s] / max(n, 1) for s in sizes])


def plot_resolution_consistency(models: Sequence[Dict], path, *, caption: Optional[str] = None) -> Path:
    """Two panels (patch, summary): cosine similarity to the reference size against input size,
    one line per model, its reference size marked."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8), sharey=True)
    colors = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        for ax, key in zip(axes, ("patch_cosine", "summary_cosine")):
            ax.plot(m["sizes"], m[key], marker="o", color=colors(i % 10), lw=1.5, label=_title(m["label"]))
            ax.axvline(m["reference_px"][0], color=colors(i % 10), lw=0.7, ls=":")
    for ax, what in zip(axes, ("patch features", "summary ([CLS] or mean patch)")):
        ax.set_title(f"{what} vs the model's own size", fontsize=9.5)
        ax.set_xlabel("input size (px)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("centred cosine similarity")
    axes[0].legend(fontsize=7.5, loc="best")
    _caption(fig, caption)
    return save_figure(fig, path)


def run_resolution_consistency(models, data, out_dir, *, sizes: Sequence[int], device="cpu",
                               progress: bool = True) -> Dict[str, Any]:
    """``fdistill diagnose resolution``: :func:`resolution_similarity` of each model (``models``:
    :class:`~fdistill.diagnostics.commands.ModelRef` or specs; ``data``:
    :class:`~fdistill.diagnostics.commands.DataOptions`); writes ``resolution.json`` and
    ``resolution.png``."""
    from ..config import ConfigError
    from .commands import _each_model, _refs, resolve_device
    from .data import image_batches

    sizes = [int(s) for s in sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"--sizes must be positive pixel sizes, got {sizes}")
    refs, dev = _refs(models), resolve_device(device)
    torch.manual_seed(data.seed)
    rows: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    for dm in _each_model(refs, dev):
        backbone = dm.backbone
        bad = [s for s in sizes if not backbone.accepts_size((s, s))]
        if dm.classifier is not None or bad:
            why = "a fine-tuned classifier (give its backbone)" if dm.classifier is not None else \
                f"takes {dm.img_size[0]}x{dm.img_size[1]} inputs only (asked {bad})"
            skipped.append(dict(label=dm.label, spec=dm.spec, reason=why))
            log.warning("resolution: skipped %s: %s", dm.label, why)
            continue
        top = max(sizes + [dm.img_size[0]])
        batches = image_batches(data.data, split=data.split, img_size=(top, top), num_images=data.images,
                                batch_size=data.batch_size, seed=data.seed, num_workers=data.num_workers)
        rows.append(dict(dm.describe(), **resolution_similarity(backbone, batches, sizes, device=dev,
                                                                 progress=progress)))
    js = dict(diagnostic="resolution", data=data.data, split=data.split, seed=data.seed, sizes=sizes,
              models=rows, skipped=skipped)
    out = Path(out_dir)
    save_json_atomic(js, out / "resolution.json")
    if rows:
        n = rows[0]["num_images"]
        plot_resolution_consistency(rows, out / "resolution.png", caption=(
            f"Centred cosine similarity of each model's features at each input size to its features at its own size "
            f"(dotted), patch maps resampled to the own-size grid; mean over {n} {data.split} images of {data.data}. "
            "RADIO v2.5's 'mode switching' test: a resolution-robust model stays near 1."))
    return js
