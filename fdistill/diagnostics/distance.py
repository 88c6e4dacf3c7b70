"""Mean attention distance per head (paper Sec. 4.1, Figure 3; the measure of Dosovitskiy et al.,
ViT, Figure 7 / Appendix D.7).

For a query patch q and the patches k it attends to, the attention distance is
``sum_k a_qk * d(q, k)`` with ``d`` the Euclidean distance between the two patches' grid
positions times the patch size (pixels). It is averaged over query patches and images, one
number per head. Heads whose number stays small attend locally; a layer whose heads all give the
same number has "collapsed" (paper Fig. 3: deep layers of CLIP collapse, FD keeps them diverse).

Two choices decide what the weights ``a_qk`` are:

* prefix tokens ([CLS], registers) are never keys or queries: they have no grid position;
* ``exclude_self`` drops the query's own patch (its distance is 0 anyway, so it matters only
  with renormalisation);
* ``renormalize`` divides the kept weights by their sum, so each query's number is an
  expectation under a proper distribution over the kept patches. Without it, weight on prefix
  tokens (and on the query itself) counts as distance 0, and a head that sends most of its mass
  to [CLS] looks "local" whatever it does with the rest. The default is ``True``.

Windowed attention (Swin, Swin V2) has no global map: each layer attends within windows of its
stage's token grid. There the same measure is taken inside every window, with the window as the grid
and the stage's pixels per token (image size / stage grid: 4, 8, 16, 32 px for Swin at 224) as the
patch size, so a layer's number is bounded by its window's extent in pixels. Shifted windows need no
special case: tokens from different image regions get -100 before the softmax (weight ~e^-100), and
tokens of one region are contiguous in the image as in the window.

Worked oracles (4x4 grid of 16-px patches, see tests): attention spread uniformly over the 16
patches, or over all 17 tokens with renormalisation, gives 32.1282 px with the query kept; over
the 15 other patches (``exclude_self=True, renormalize=True``) 34.2701 px = 32.1282 * 16/15.
With ``renormalize=False`` uniform attention over the 16 patches gives 32.1282 px with or
without ``exclude_self``. Identity attention gives 0; with ``exclude_self`` and renormalisation
a query with no mass left contributes 0 (no division by zero).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

Size2 = Tuple[int, int]

#: the library's default for ``renormalize`` (stated in every output of the CLI)
DEFAULT_RENORMALIZE = True


@lru_cache(maxsize=16)
def _grid_distances_cpu(gh: int, gw: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack((ys.reshape(-1), xs.reshape(-1)), dim=1)  # (N, 2) row-major, like patch tokens
    return torch.cdist(pos, pos)  # (N, N) in patches


def grid_distances(grid_size: Size2, patch_size: float | Size2, *, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """(N, N) pixel distances between the patches of a row-major ``grid_size`` token grid.

    ``patch_size`` may be a pair (height, width) for non-square patches."""
    gh, gw = int(grid_size[0]), int(grid_size[1])
    ph, pw = (patch_size, patch_size) if not isinstance(patch_size, (tuple, list)) else patch_size
    if ph == pw:
        d = _grid_distances_cpu(gh, gw) * float(ph)
    else:
        ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64) * ph,
                                torch.arange(gw, dtype=torch.float64) * pw, indexing="ij")
        pos = torch.stack((ys.reshape(-1), xs.reshape(-1)), dim=1)
        d = torch.cdist(pos, pos)
    return d.to(device=device, dtype=dtype)


def _check(attn: torch.Tensor, grid_size: Size2, num_prefix_tokens: int) -> int:
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (B, H, T, T), got {tuple(attn.shape)}")
    n = int(grid_size[0]) * int(grid_size[1])
    if attn.shape[-1] != num_prefix_tokens + n:
        raise ValueError(
            f"attention over {attn.shape[-1]} tokens does not match {num_prefix_tokens} prefix tokens + a "
            f"{grid_size[0]}x{grid_size[1]} grid ({num_prefix_tokens + n} tokens)")
    return n


def attention_distance_sum(
    attn: torch.Tensor,
    distances: torch.Tensor,
    *,
    num_prefix_tokens: int = 1,
    exclude_self: bool = True,
    renormalize: bool = DEFAULT_RENORMALIZE,
) -> torch.Tensor:
    """Per-head SUM over images and query patches of the per-query attention distance (H,).

    The streaming building block of :func:`attention_distance` (divide by ``B * N``). ``distances``
    is :func:`grid_distances` for the grid, on ``attn``'s device. Runs in float32 at least."""
    P = int(num_prefix_tokens)
    a = attn[:, :, P:, P:]  # (B, H, N, N): patch queries -> patch keys
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    d = distances.to(a.dtype)
    num = (a * d).sum(-1)  # (B, H, N); self has distance 0, so excluding it changes nothing here
    if not renormalize:
        return num.sum(dim=(0, 2))
    mass = a.sum(-1)  # (B, H, N)
    if exclude_self:
        mass = mass - torch.diagonal(a, dim1=-2, dim2=-1)
    # no mass left (e.g. identity attention without self): the query contributes 0
    per_query = torch.where(mass > 0, num / mass.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(num))
    return per_query.sum(dim=(0, 2))


def attention_distance(
    attn: torch.Tensor,
    grid_size: Size2,
    patch_size: float | Size2,
    *,
    num_prefix_tokens: int = 1,
    exclude_self: bool = True,
    renormalize: bool = DEFAULT_RENORMALIZE,
) -> torch.Tensor:
    """Mean attention distance in pixels per head, averaged over images and query patches.

    Args:
        attn: (B, H, T, T) attention probabilities (rows = queries), T = P + gh * gw with the
            ``num_prefix_tokens`` prefix tokens first and patches in row-major order.
        grid_size: (gh, gw) token grid.
        patch_size: pixels per patch (the distance unit: one grid step = ``patch_size`` px).
        num_prefix_tokens: P; prefix rows and columns are dropped (they have no position).
        exclude_self: drop each query's weight on its own patch.
        renormalize: divide the kept weights (patches, minus self if excluded) by their sum, so
            each query's distance is an expectation over the kept patches (default ``True``). See
            the module docstring for what each choice gives on uniform and identity attention.

    Returns:
        (H,) float32 tensor of mean distances in pixels.
    """
    n = _check(attn, grid_size, num_prefix_tokens)
    d = grid_distances(grid_size, patch_size, device=attn.device)
    s = attention_distance_sum(attn, d, num_prefix_tokens=num_prefix_tokens, exclude_self=exclude_self,
                               renormalize=renormalize)
    return (s / (attn.shape[0] * n)).float()


class AttentionDistanceMeter:
    """Streaming per-layer, per-head mean attention distance: feed (B, H, T, T) attention one
    layer at a time with :meth:`update`, read (L, H) with :meth:`compute` (or one (H_l,) tensor per
    layer with :meth:`compute_layers` when layers have different head counts, as Swin stages do).
    Keeps only (H,) sums per layer on the device (no host sync until reading).

    The constructor's geometry applies to every layer unless :meth:`update` is given a layer's own
    (windowed attention: the window as ``grid``, the stage's pixels per token as ``patch_size``, no
    prefix tokens)."""

    def __init__(self, grid_size: Size2, patch_size: float | Size2, *, num_prefix_tokens: int = 1,
                 exclude_self: bool = True, renormalize: bool = DEFAULT_RENORMALIZE):
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.patch_size = patch_size
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.exclude_self = bool(exclude_self)
        self.renormalize = bool(renormalize)
        self._sums: Dict[int, torch.Tensor] = {}
        self._counts: Dict[int, int] = {}
        self._dist: Dict[tuple, torch.Tensor] = {}  # (grid, patch size, device) -> (N, N) distances

    def _distances(self, grid: Size2, patch_size, device) -> torch.Tensor:
        ps = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else patch_size
        key = (tuple(grid), ps, str(device))
        if key not in self._dist:
            self._dist[key] = grid_distances(grid, patch_size, device=device)
        return self._dist[key]

    def update(self, layer: int, attn: torch.Tensor, *, grid_size: Optional[Size2] = None,
               patch_size: float | Size2 | None = None, num_prefix_tokens: Optional[int] = None) -> None:
        """Add one batch of ``layer``'s attention; ``grid_size`` / ``patch_size`` /
        ``num_prefix_tokens`` override the constructor's geometry for this call."""
        grid = self.grid_size if grid_size is None else (int(grid_size[0]), int(grid_size[1]))
        ps = self.patch_size if patch_size is None else patch_size
        P = self.num_prefix_tokens if num_prefix_tokens is None else int(num_prefix_tokens)
        n = _check(attn, grid, P)
        s = attention_distance_sum(attn.detach(), self._distances(grid, ps, attn.device), num_prefix_tokens=P,
                                   exclude_self=self.exclude_self, renormalize=self.renormalize)
        if layer in self._sums:
            if self._sums[layer].numel() != s.numel():
                raise ValueError(f"layer {layer} had {self._sums[layer].numel()} heads, now {s.numel()}")
            self._sums[layer] = self._sums[layer] + s.double()
            self._counts[layer] += attn.shape[0] * n
        else:
            self._sums[layer] = s.double()
            self._counts[layer] = attn.shape[0] * n

    def compute_layers(self) -> List[torch.Tensor]:
        """Mean distances in pixels, one (H_l,) float32 CPU tensor per layer in index order."""
        if not self._sums:
            raise RuntimeError("AttentionDistanceMeter has seen no attention")
        layers = sorted(self._sums)
        if layers != list(range(len(layers))):
            raise RuntimeError(f"attention seen for layers {layers}, expected 0..{len(layers) - 1}")
        return [(self._sums[i] / self._counts[i]).float().cpu() for i in layers]

    def compute(self) -> torch.Tensor:
        """(L, H) mean distances in pixels, layers in index order (on the CPU)."""
        per_layer = self.compute_layers()
        heads = {d.numel() for d in per_layer}
        if len(heads) != 1:
            raise RuntimeError(f"layers have different head counts {sorted(heads)}; use compute_layers()")
        return torch.stack(per_layer)
