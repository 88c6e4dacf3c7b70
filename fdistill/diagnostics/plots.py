"""The paper's diagnostic figures (matplotlib, Agg backend; PNG).

* :func:`plot_attention_distance`: Figure 3 style, one panel per model, x = layer, y = mean
  attention distance (px), one dot per head, shared y axis;
* :func:`plot_attention_maps`: Figure 4 style, one row per model, one column per chosen layer;
* :func:`plot_loss_landscape`: Figure 5 style, one column per model, loss (top) and accuracy
  (bottom) against alpha, one curve per random direction.

Each takes plain data (lists / tensors) and a path; files are written atomically.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file, then a rename) and close it."""
    from ..io import atomic_path

    try:
        with atomic_path(path, suffix=Path(path).suffix) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return Path(path)


def _caption(fig, text: Optional[str]) -> None:
    fig.tight_layout()
    if text:
        width = max(70, min(170, int(fig.get_figwidth() * 17)))  # characters per line ~ figure width
        fig.text(0.5, -0.01, "\n".join(textwrap.wrap(text, width)), ha="center", va="top", fontsize=8.5,
                 color="#333333")


def _title(label: str, width: int = 38) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]


def plot_attention_distance(models: Sequence[Dict], path: str | os.PathLike, *, caption: Optional[str] = None) -> Path:
    """``models``: dicts with ``label`` and ``distance_px`` (per layer, a list of per-head
    distances; layers may differ in head count, as Swin stages do), optionally ``patch_size`` /
    ``grid`` for the panel title and, for windowed models, ``windowed`` with ``layer_patch_px`` and
    ``layer_window`` (dotted lines separate stages)."""
    plt = pyplot()
    n = len(models)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.4), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [torch.as_tensor(r, dtype=torch.float32).reshape(-1) for r in m["distance_px"]]  # L x (H_l,)
        L = len(rows)
        xs = torch.cat([torch.full((r.numel(),), float(i + 1)) for i, r in enumerate(rows)])
        ax.scatter(xs, torch.cat(rows), s=14, alpha=0.75, color="#1f77b4", edgecolors="none", label="one head")
        ax.plot(range(1, L + 1), [float(r.mean()) for r in rows], color="#d62728", lw=1.0, alpha=0.8,
                label="mean over heads")
        ax.set_xlabel("layer")
        ax.set_xticks(range(1, L + 1) if L <= 16 else range(1, L + 1, max(1, L // 8)))
        heads = sorted({r.numel() for r in rows})
        head_txt = f"{heads[0]} heads" if len(heads) == 1 else f"{heads[0]}-{heads[-1]} heads"
        sub = ""
        if m.get("windowed"):
            stages = _stages(m.get("layer_patch_px") or [], m.get("layer_window") or [])
            for first, _, _ in stages[1:]:
                ax.axvline(first - 0.5, color="gray", lw=0.6, ls=":")
            sub = f"\n{_windows_text(stages)}, {head_txt}"
        elif m.get("patch_size") and m.get("grid"):
            g = m["grid"]
            sub = f"\n{m['patch_size']} px patches, {g[0]}x{g[1]} grid, {head_txt}"
        ax.set_title(_title(m["label"]) + sub, fontsize=9.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean attention distance (px)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=7.5, loc="lower right")
    _caption(fig, caption)
    return save_figure(fig, path)


def _windows_text(stages: list) -> str:
    """'7x7 windows, 4-32 px per token' (one window size) or '8x8 @ 4 px, 4x4 @ 8 px' (several)."""
    wins = {tuple(w) for _, _, w in stages if w}
    px = [p for _, p, w in stages if w]
    if len(wins) == 1 and px:
        w = next(iter(wins))
        step = f"{px[0]}" if px[0] == px[-1] else f"{px[0]}-{px[-1]}"
        return f"{w[0]}x{w[1]} windows, {step} px/token"
    return ", ".join(f"{w[0]}x{w[1]} @ {p} px" for _, p, w in stages if w)


def _stages(patch_px: Sequence, windows: Sequence) -> list:
    """(first layer, 1-based; pixels per token; window) for each run of layers sharing both."""
    out = []
    for i, (px, w) in enumerate(zip(patch_px, windows)):
        if not out or out[-1][1:] != (px, w):
            out.append((i + 1, px, w))
    return out


def plot_attention_maps(models: Sequence[Dict], path: str | os.PathLike, *, caption: Optional[str] = None,
                        clip_quantile: float = 0.99) -> Path:
    """``models``: dicts with ``label``, ``maps`` ({1-based layer: (T, T)}) and
    ``num_prefix_tokens`` (one number, or {1-based layer: number}), optionally ``windowed`` (the
    layers whose map is one window's). Each panel's colour scale runs from 0 to the
    ``clip_quantile`` of its values (the [CLS] column would otherwise wash out the patch structure)."""
    plt = pyplot()
    rows = len(models)
    cols = max(len(m["maps"]) for m in models)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 0.4, 2.75 * rows + 0.3), squeeze=False)
    for r, m in enumerate(models):
        items = sorted(m["maps"].items())
        prefix = m.get("num_prefix_tokens", 0)
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(items):
                ax.axis("off")
                continue
            layer, a = items[c]
            P = int(prefix.get(layer, 0) if isinstance(prefix, dict) else prefix)
            a = torch.as_tensor(a, dtype=torch.float32)
            vmax = float(torch.quantile(a.flatten()[:: max(1, a.numel() // 200_000)], clip_quantile))
            im = ax.imshow(a.numpy(), cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-12), interpolation="nearest")
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            cb.ax.tick_params(labelsize=6.5)
            cb.locator = pyplot().MaxNLocator(3)
            cb.update_ticks()
            if P > 0:  # separate prefix tokens from patches
                ax.axhline(P - 0.5, color="white", lw=0.5, alpha=0.7)
                ax.axvline(P - 0.5, color="white", lw=0.5, alpha=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"layer {layer}" + (" (one window)" if layer in m.get("windowed", ()) else ""), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{_title(m['label'], 30)}\nquery token", fontsize=8.5)
            if r == rows - 1:
                ax.set_xlabel("key token", fontsize=8.5)
    _caption(fig, caption)
    return save_figure(fig, path)


def plot_loss_landscape(models: Sequence[Dict], path: str | os.PathLike, *, caption: Optional[str] = None) -> Path:
    """``models``: dicts with ``label``, ``alphas``, ``seeds``, ``loss`` and ``accuracy`` (one list
    per direction, accuracy in [0, 1])."""
    plt = pyplot()
    n = len(models)
    fig, axes = plt.subplots(2, n, figsize=(3.8 * n + 0.6, 6.0), sharex=True, sharey="row", squeeze=False)
    colors = plt.get_cmap("tab10")
    for c, m in enumerate(models):
        a = m["alphas"]
        for i, seed in enumerate(m["seeds"]):
            loss = [_finite_or_nan(v) for v in m["loss"][i]]  # a diverged point leaves a gap
            axes[0][c].plot(a, loss, color=colors(i % 10), lw=1.3, label=f"direction seed {seed}")
            axes[1][c].plot(a, [100.0 * v for v in m["accuracy"][i]], color=colors(i % 10), lw=1.3)
        axes[0][c].set_title(_title(m["label"]), fontsize=9.5)
        for ax in (axes[0][c], axes[1][c]):
            ax.axvline(0.0, color="gray", lw=0.6, ls=":")
            ax.grid(alpha=0.3)
        axes[1][c].set_xlabel(r"$\alpha$ (step along a filter-normalised direction)")
    # the loss often spans decades (a few tenths at the minimum, 1e5+ far out when BatchNorm statistics
    # no longer fit the moved weights): then a log axis keeps the basin readable
    vals = [v for m in models for curve in m["loss"] for v in curve if v is not None and 0 < v < float("inf")]
    log_y = bool(vals) and max(vals) / min(vals) > 20
    if log_y:
        axes[0][0].set_yscale("log")
    for ax in axes.flat[0 if not log_y else n:]:
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[0][0].set_ylabel("cross-entropy loss" + (" (log scale)" if log_y else ""))
    axes[1][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper center")
    _caption(fig, caption)
    return save_figure(fig, path)


def figure_png_ok(path: str | os.PathLike) -> bool:
    """True if ``path`` is a readable PNG (used by tests and the report)."""
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _finite_or_nan(v) -> float:
    return float("nan") if v is None or not math.isfinite(v) else float(v)


def _json_safe(obj):
    """Non-finite floats -> None (strict JSON has no NaN / Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def save_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as strict JSON (non-finite numbers become null) atomically."""
    from ..io import atomic_write_json

    return atomic_write_json(path, _json_safe(obj), indent=1, strict=True)

