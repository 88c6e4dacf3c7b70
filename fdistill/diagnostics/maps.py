"""Per-layer attention maps averaged over heads and images (paper Sec. 4.2, Figure 4).

A map is (T, T) with queries as rows and keys as columns, prefix tokens first and patches in
row-major order, exactly as the model orders its tokens. Averaging probabilities keeps rows summing
to 1. Two patterns are worth telling apart (paper Fig. 4): a *diagonal* band (each query attends
to patches at fixed relative offsets: relative-position, translation-equivariant attention) and
*vertical bars* (every query attends to the same few keys: a global, position-independent
pattern). The paper finds FD students show more of the former and fewer of the latter.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


def default_layers(depth: int) -> List[int]:
    """First, second and last three layers (0-based), clipped to the model's depth (Fig. 4)."""
    return sorted({i for i in (0, 1, depth - 3, depth - 2, depth - 1) if 0 <= i < depth})


def select_layers(depth: int, layers: Optional[Sequence[int]] = None) -> List[int]:
    """0-based layer indices from 1-based layer numbers (negative ones count from the end, -1 =
    last), deduplicated and sorted. ``None``: :func:`default_layers`."""
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}")
    if layers is None:
        return default_layers(depth)
    out = set()
    for k in layers:
        k = int(k)
        if k == 0 or abs(k) > depth:
            raise ValueError(f"layer {k} does not exist in a {depth}-layer model (use 1..{depth} or -1..-{depth})")
        out.add(k - 1 if k > 0 else depth + k)
    return sorted(out)


class AttentionMapMeter:
    """Streaming mean attention map per chosen layer: (T, T) sums in float64 on the device."""

    def __init__(self, layers: Optional[Sequence[int]] = None):
        #: 0-based layers to keep (None: all)
        self.layers = None if layers is None else set(int(i) for i in layers)
        self._sums: Dict[int, torch.Tensor] = {}
        self._counts: Dict[int, int] = {}

    def update(self, layer: int, attn: torch.Tensor) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"attention must be (B, H, T, T), got {tuple(attn.shape)}")
        s = attn.detach().sum(dim=(0, 1), dtype=torch.float64)  # (T, T) over images and heads
        n = attn.shape[0] * attn.shape[1]
        if layer in self._sums:
            self._sums[layer] += s
            self._counts[layer] += n
        else:
            self._sums[layer] = s
            self._counts[layer] = n

    def compute(self) -> Dict[int, torch.Tensor]:
        """{0-based layer: (T, T) float32 mean map on the CPU}."""
        if not self._sums:
            raise RuntimeError("AttentionMapMeter has seen no attention")
        if self.layers is not None and set(self._sums) != self.layers:
            missing = sorted(self.layers - set(self._sums))
            raise RuntimeError(f"no attention seen for layers {[i + 1 for i in missing]} (1-based)")
        return {i: (self._sums[i] / self._counts[i]).float().cpu() for i in sorted(self._sums)}


def mean_attention_map(attn: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) -> (T, T) map averaged over images and heads (one batch, one layer)."""
    m = AttentionMapMeter()
    m.update(0, attn)
    return m.compute()[0]
