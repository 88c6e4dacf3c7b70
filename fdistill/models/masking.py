"""Student input masks (paper Table 5): exactly ``round(ratio * N)`` patches per image, chosen
at random or in blocks (BEiT's block-wise masking, topped up / trimmed to the exact count)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

MASK_TYPES = ("random", "block")


def num_masked(num_patches: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    return int(round(ratio * num_patches))


def random_mask(batch: int, grid: Tuple[int, int], ratio: float, *, device=None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, H*W) bool, True = masked; exactly ``round(ratio * H * W)`` per row, uniformly at random."""
    n = grid[0] * grid[1]
    k = num_masked(n, ratio)
    noise = torch.rand(batch, n, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise
    return ranks < k


def block_mask(batch: int, grid: Tuple[int, int], ratio: float, *, min_block: int = 4,
               generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """(B, H*W) bool block-wise masks (BEiT, Bao et al. 2022, Alg. 1) with an exact count.

    Rectangles of area >= ``min_block`` patches and aspect ratio in [0.3, 1/0.3] are added until
    the target count is reached; any overshoot is removed at random among the masked patches so
    every image has exactly ``round(ratio * H * W)`` masked patches.
    """
    H, W = grid
    n = H * W
    k = num_masked(n, ratio)
    out = torch.zeros(batch, H, W, dtype=torch.bool)
    log_ar = (math.log(0.3), math.log(1 / 0.3))

    def rand() -> float:
        return float(torch.rand((), generator=generator))

    for b in range(batch):
        m = out[b]
        tries = 0
        while int(m.sum()) < k and tries < 10 * n:
            tries += 1
            remaining = k - int(m.sum())
            area = min_block + rand() * max(remaining - min_block, 0) if remaining > min_block else remaining
            ar = math.exp(log_ar[0] + rand() * (log_ar[1] - log_ar[0]))
            h = max(1, min(H, int(round(math.sqrt(area * ar)))))
            w = max(1, min(W, int(round(math.sqrt(area / ar)))))
            top = int(rand() * (H - h + 1))
            left = int(rand() * (W - w + 1))
            m[top:top + h, left:left + w] = True
        flat = m.view(-1)
        extra = int(flat.sum()) - k
        if extra > 0:  # trim the overshoot at random
            idx = flat.nonzero().view(-1)
            drop = idx[torch.randperm(idx.numel(), generator=generator)[:extra]]
            flat[drop] = False
        elif extra < 0:  # not reached within the tries (tiny grids): fill at random
            idx = (~flat).nonzero().view(-1)
            flat[idx[torch.randperm(idx.numel(), generator=generator)[:-extra]]] = True
    return out.view(batch, n).to(device)


def make_mask(kind: str, batch: int, grid: Tuple[int, int], ratio: float, *, device=None,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if kind == "random":
        return random_mask(batch, grid, ratio, device=device, generator=generator)
    if kind == "block":
        return block_mask(batch, grid, ratio, device=device, generator=generator)
    raise ValueError(f"unknown mask_type {kind!r}; expected one of {MASK_TYPES}")
