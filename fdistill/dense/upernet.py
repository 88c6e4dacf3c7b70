"""UPerNet on any backbone fdistill loads (the paper's ADE20K setting, Sec. 5, after BEiT):
multi-level maps (:mod:`fdistill.dense.pyramid`: four ViT blocks through BEiT's neck, or a
hierarchical backbone's own stages) -> UPerNet's PPM + FPN head, plus the auxiliary FCN head on
the stride-16 level, both upsampled to the input size.

The heads are transformers' ``UperNetHead`` / ``UperNetFCNHead`` (the mmsegmentation design);
only the glue from a backbone to their inputs is written here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pyramid import DenseError, ViTPyramid, _module, default_block_indices, intermediate_maps

__all__ = ["UperNetSegmenter"]


class UperNetSegmenter(nn.Module):
    """``backbone`` + (ViT: BEiT's pyramid neck) + UPerNet (+ auxiliary FCN head).

    Args:
        backbone: a timm-style network or an fdistill adapter (``forward_intermediates``).
        num_classes: segmentation classes (ADE20K: 150).
        img_size: (H, W) of a probe input used once to find the maps' shapes.
        indices: ViT blocks to take (default: BEiT's, :func:`default_block_indices`); ignored
            for hierarchical backbones, which give their stages.
        channels: UPerNet's width (512 in BEiT's ADE20K recipe); ``aux_channels``: the FCN head's (256).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, img_size: Sequence[int] = (512, 512),
                 indices: Optional[Sequence[int]] = None, channels: int = 512, aux_channels: int = 256,
                 aux: bool = True):
        super().__init__()
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

        self.backbone = backbone
        net = _module(backbone)
        blocks = getattr(net, "blocks", None)
        if indices is None and isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            indices = default_block_indices(len(blocks))
        self.indices = list(indices) if indices is not None else None
        with torch.no_grad():
            was = backbone.training
            backbone.eval()
            probe = intermediate_maps(backbone, torch.zeros(1, 3, *img_size), self.indices)
            backbone.train(was)
        if len(probe) != 4:
            raise DenseError(f"UPerNet takes 4 levels; {type(net).__name__} gave {len(probe)}")
        same = len({tuple(m.shape[1:]) for m in probe}) == 1
        self.neck = ViTPyramid(probe[0].shape[1]) if same else nn.Identity()  # plain ViT: one stride at every block
        in_channels: List[int] = [int(m.shape[1]) for m in probe]
        cfg = UperNetConfig(hidden_size=channels, num_labels=num_classes, auxiliary_in_channels=in_channels[2],
                            auxiliary_channels=aux_channels, use_auxiliary_head=aux)
        self.decode_head = UperNetHead(cfg, in_channels=in_channels)
        self.aux_head = UperNetFCNHead(cfg, in_channels=in_channels, in_index=2) if aux else None
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x``: (B, 3, H, W) normalised images -> ``{"logits": (B, K, H, W)[, "aux_logits"]}``."""
        maps = intermediate_maps(self.backbone, x, self.indices)
        levels = self.neck(maps) if isinstance(self.neck, ViTPyramid) else maps  # strides 4, 8, 16, 32
        size = x.shape[-2:]
        out = {"logits": F.interpolate(self.decode_head(levels), size=size, mode="bilinear", align_corners=False)}
        if self.aux_head is not None:
            out["aux_logits"] = F.interpolate(self.aux_head(levels), size=size, mode="bilinear", align_corners=False)
        return out
