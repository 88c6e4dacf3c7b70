"""Mask R-CNN on a plain ViT, the paper's COCO setting (Sec. 5, after ViTDet and "Benchmarking
Detection Transfer Learning with Vision Transformers"): :class:`~fdistill.dense.vitdet.WindowedViT`
(window-14 attention + one added global block) -> ViTDet's simple feature pyramid (strides 4-64)
-> torchvision's Mask R-CNN.

The detector is torchvision's ``MaskRCNN`` (RPN, RoIAlign, box and mask heads, losses, resizing and
batching of images). Only the parts ViTDet changes are set here: one anchor size per level
(32 ... 512, aspect ratios 0.5 / 1 / 2), a 2-conv RPN head, the 4-conv + 1-fc box head and the 4-conv
mask head with LayerNorm (ViTDet's ``norm="LN"`` heads), and the image normalisation of the
backbone (its own mean/std, not torchvision's ImageNet default). Any of them can be overridden
through ``**kwargs`` (they go to ``MaskRCNN``).

Layer-wise lr decay (:func:`fdistill.eval.layer_decay.param_groups_layer_decay`) finds the ViT's
blocks as ``backbone.body.blocks.N`` (the added global block is the last of them), so the patch
embedding gets layer 0, block i layer i + 1, the added block depth + 1, and the pyramid and the
detection heads depth + 2 (see the test).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch.nn as nn

from .pyramid import DenseError
from .vitdet import SimpleFeaturePyramid, WindowedViT, backbone_mean_std

__all__ = ["ViTDetBackbone", "ViTDetMaskRCNN", "build_maskrcnn"]


class ViTDetBackbone(nn.Module):
    """``body`` (:class:`WindowedViT`, (B, C, H/16, W/16)) + ``fpn`` (:class:`SimpleFeaturePyramid`):
    images -> ``OrderedDict`` ``"0"``-``"3"``, ``"pool"`` at strides 4, 8, 16, 32, 64 with
    ``out_channels`` channels, what torchvision's detectors take as a backbone."""

    def __init__(self, body: WindowedViT, fpn: SimpleFeaturePyramid):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def forward(self, x):
        return self.fpn(self.body(x))  # (B, 3, H, W) -> {level: (B, out_channels, H / s, W / s)}


def _mask_rcnn_class():
    from torchvision.models.detection import MaskRCNN

    class ViTDetMaskRCNN(MaskRCNN):
        """torchvision's ``MaskRCNN`` that names the ViT's no-weight-decay parameters (position
        embedding, relative-position tables) for the optimizer's parameter groups."""

        def no_weight_decay(self) -> set:
            return {f"backbone.body.{n}" for n in self.backbone.body.no_weight_decay()}

    return ViTDetMaskRCNN


ViTDetMaskRCNN = _mask_rcnn_class()


def build_maskrcnn(backbone: nn.Module, num_classes: int, *, window_size: int = 14,
                   global_blocks: Iterable[int] = (), add_global_block: bool = True,
                   min_size: int = 1024, max_size: int = 1024, img_size: Optional[Sequence[int]] = None,
                   out_channels: int = 256, final_norm: bool = False, grad_checkpointing: bool = False,
                   train_backbone: bool = True, anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                   **kwargs) -> "ViTDetMaskRCNN":
    """Mask R-CNN (torchvision) on a ViTDet-style plain-ViT backbone.

    Args:
        backbone: a timm ViT / Beit / FD student, or an fdistill adapter around one
            (:func:`fdistill.models.loading.load_model`, unfrozen for fine-tuning). Anything else
            raises :class:`DenseError` here, before any data is read.
        num_classes: object categories (COCO: 80); the model predicts ``num_classes + 1`` with
            label 0 the background, so targets' labels are 1 ... ``num_classes``.
        window_size, global_blocks, add_global_block, final_norm, grad_checkpointing: see
            :class:`WindowedViT` (defaults: the paper's window 14 + one added global block).
        min_size, max_size: torchvision's resizing (short side to ``min_size`` unless the long side
            passes ``max_size``); 1024 / 1024 puts the long side at 1024 as ViTDet's 1024 x 1024
            input. The transform pads a batch to a multiple of 32, so the grid is H / 16 x W / 16.
        img_size: (H, W) of the largest padded input, sizing the global blocks' relative position
            tables (default ``max_size`` rounded up to 32, square).
        out_channels: the pyramid's and the heads' convolution width (256, ViTDet's).
        anchor_sizes: one anchor size (pixels of the resized image) per level, strides 4 ... 64
            (ViTDet's 32 ... 512 for COCO; smaller for small images).
        train_backbone: make every backbone parameter trainable (the paper fine-tunes it end to
            end; an adapter from ``load_model`` comes frozen); False leaves them as they are.
        **kwargs: any further ``torchvision.models.detection.MaskRCNN`` argument (e.g.
            ``box_detections_per_img``, ``fixed_size``, ``rpn_head``) -- they override the defaults here.
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    from .vitdet import _ln

    if num_classes < 1:
        raise DenseError(f"num_classes must be at least 1 (object categories, background excluded), got {num_classes}")
    if img_size is None:
        side = -(-int(max_size) // 32) * 32
        img_size = (side, side)
    body = WindowedViT(backbone, window_size=window_size, global_blocks=global_blocks,
                       add_global_block=add_global_block, img_size=tuple(img_size), final_norm=final_norm,
                       grad_checkpointing=grad_checkpointing)
    if train_backbone:
        body.requires_grad_(True)
    patch = body.patch_size[0]
    if body.patch_size[0] != body.patch_size[1] or patch not in (4, 8, 16):
        raise DenseError(f"the simple pyramid's strides 4 ... 64 need a square patch of 4, 8 or 16 pixels; "
                         f"this ViT's is {body.patch_size}")
    # strides 4, 8, 16, 32 from the stride-``patch`` map: ViTDet's (4, 2, 1, 0.5) for patch 16
    fpn = SimpleFeaturePyramid(body.out_channels, out_channels, scales=tuple(patch / s for s in (4, 8, 16, 32)),
                               top_block=True)
    net = ViTDetBackbone(body, fpn)
    mean, std = backbone_mean_std(backbone)
    levels = ["0", "1", "2", "3"]
    if len(anchor_sizes) != 5:
        raise DenseError(f"anchor_sizes needs one size per pyramid level (5: strides 4 ... 64), got {anchor_sizes}")
    anchors = AnchorGenerator(sizes=tuple((int(a),) for a in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    defaults = dict(
        min_size=min_size, max_size=max_size, image_mean=list(mean), image_std=list(std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=7, sampling_ratio=2),
        box_head=FastRCNNConvFCHead((out_channels, 7, 7), [out_channels] * 4, [1024], norm_layer=_ln),
        box_predictor=FastRCNNPredictor(1024, num_classes + 1),
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(out_channels, [out_channels] * 4, 1, norm_layer=_ln),
        mask_predictor=MaskRCNNPredictor(out_channels, 256, num_classes + 1),
    )
    defaults.update(kwargs)
    return ViTDetMaskRCNN(net, num_classes=None, **defaults)
