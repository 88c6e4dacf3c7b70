"""Multi-level features of any backbone, for dense decoders (UPerNet, DPT, Mask R-CNN's FPN).

A plain ViT has one stride (its patch size, 16) at every block; the paper's dense settings (Sec. 5,
following BEiT and ViTDet) take four blocks (4/6/8/12 of ViT-B) and turn them into strides 4, 8,
16 and 32: two 2x transposed convolutions for 4, one for 8, the map as it is for 16, a 2x2 max-pool
for 32 (BEiT's ``fpn1..fpn4``). Hierarchical backbones (Swin) already give their stages at those
strides and are used as they are.

The maps come from timm's ``forward_intermediates`` contract (ViT, BEiT and the FD student, Swin,
EVA, ..., and open_clip's visual towers, which follow it), the one place they are taken. The pyramid itself is written here because neither timm
nor torchvision ships the ViT-to-pyramid neck (torchvision's ``FeaturePyramidNetwork`` is the
top-down FPN that comes after it; mmsegmentation's ``MultiLevelNeck`` does not install against this
torch).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import FdistillError

__all__ = ["DenseError", "default_block_indices", "intermediate_maps", "ViTPyramid"]


class DenseError(FdistillError):
    """A backbone or a recipe that a dense task cannot use, said before any data is read."""


def default_block_indices(depth: int, levels: int = 4) -> List[int]:
    """The blocks (0-based) a plain ViT gives to the pyramid: BEiT's 4/6/8/12 of 12 (1-based),
    i.e. [3, 5, 7, 11], and the same fractions (1/3, 1/2, 2/3, 1) of other depths."""
    if depth < levels:
        raise DenseError(f"a backbone of {depth} blocks cannot give {levels} levels")
    if levels != 4:
        return [round((i + 1) * depth / levels) - 1 for i in range(levels)]
    picks = [round(depth / 3), round(depth / 2), round(2 * depth / 3), depth]  # 1-based, BEiT's 4/6/8/12
    out = []
    for p in picks:  # distinct and increasing on shallow models
        p = max(p, (out[-1] + 2) if out else 1)
        out.append(min(p, depth) - 1)
    if len(set(out)) != levels:
        out = list(range(depth - levels, depth))
    return out


def _module(backbone: nn.Module) -> nn.Module:
    """The network inside an fdistill adapter (``.model``), or the module itself."""
    for name in ("model", "visual", "student"):
        inner = getattr(backbone, name, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "forward_intermediates"):
            return inner
    return backbone


def intermediate_maps(backbone: nn.Module, x: torch.Tensor, indices: Optional[Sequence[int]] = None
                      ) -> List[torch.Tensor]:
    """Maps ``(B, C_i, H_i, W_i)`` of the given blocks (ViT) or of every stage (hierarchical
    backbones, ``indices=None``), through timm's ``forward_intermediates``."""
    net = _module(backbone)
    if not hasattr(net, "forward_intermediates"):
        raise DenseError(f"{type(net).__name__} has no forward_intermediates (timm's contract for "
                         "intermediate feature maps); dense tasks need a timm-style backbone")
    idx = list(indices) if indices is not None else 4
    maps = net.forward_intermediates(x, indices=idx, output_fmt="NCHW", intermediates_only=True)
    if isinstance(maps, dict):  # open_clip's visual towers: {"image_intermediates": [...]}
        maps = maps.get("image_intermediates", [])
    if any(m.ndim != 4 for m in maps):
        raise DenseError(f"{type(net).__name__} gave maps of shapes {[tuple(m.shape) for m in maps]}, not (B, C, H, W)")
    return list(maps)


def _up2(dim: int, norm: bool) -> List[nn.Module]:
    layers: List[nn.Module] = [nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)]
    if norm:
        layers += [nn.BatchNorm2d(dim), nn.GELU()]
    return layers


class ViTPyramid(nn.Module):
    """Four stride-``patch`` maps -> strides ``patch/4``, ``patch/2``, ``patch``, ``2 patch`` (BEiT's
    neck: 4, 8, 16, 32 for patch 16). Channels are kept (``embed_dim`` at every level).

    >>> neck = ViTPyramid(768)
    >>> outs = neck([torch.zeros(1, 768, 32, 32)] * 4)   # 512 px / 16
    >>> [tuple(o.shape[-2:]) for o in outs]
    [(128, 128), (64, 64), (32, 32), (16, 16)]
    """

    def __init__(self, embed_dim: int, *, norm: bool = True):
        super().__init__()
        self.embed_dim = embed_dim
        self.up4 = nn.Sequential(*_up2(embed_dim, norm), nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2))
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    @property
    def out_channels(self) -> List[int]:
        return [self.embed_dim] * 4

    def forward(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(maps) != 4:
            raise DenseError(f"ViTPyramid takes 4 maps (one per level), got {len(maps)}")
        shapes = {tuple(m.shape[-3:]) for m in maps}
        if len(shapes) != 1 or maps[0].shape[1] != self.embed_dim:
            raise DenseError(f"ViTPyramid({self.embed_dim}) takes 4 maps of one shape (B, {self.embed_dim}, h, w); "
                             f"got {[tuple(m.shape) for m in maps]}")
        return [self.up4(maps[0]), self.up2(maps[1]), self.same(maps[2]), self.down2(maps[3])]
