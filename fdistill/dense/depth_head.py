"""Monocular depth on any backbone fdistill loads (the paper's NYUv2 benchmark, Table 1: RMSE
0.416 for CLIP ViT-B/16 -> 0.352 after FD): multi-level maps (:mod:`fdistill.dense.pyramid`) -> a
DPT decoder (Ranftl et al., "Vision Transformers for Dense Prediction", ICCV 2021) -> depth in
metres at the input size.

What comes from where:

* the maps: timm's ``forward_intermediates`` through :func:`~fdistill.dense.pyramid.intermediate_maps`;
  a plain ViT gives four blocks (BEiT's choice, :func:`~fdistill.dense.pyramid.default_block_indices`)
  turned into strides 4/8/16/32 by BEiT's neck (:class:`~fdistill.dense.pyramid.ViTPyramid`); a
  hierarchical backbone (Swin) gives its four stages at those strides, used as they are.
* the decoder: transformers' ``DPTFeatureFusionStage`` (DPT's RefineNet-style fusion blocks, coarse
  to fine, each ending in a 2x upsampling) and ``DPTDepthEstimationHead`` (DPT's three-conv head).
  Not written here.
* written here (the glue): one 3x3 conv per level to the fusion width (what ``DPTNeck.convs`` is),
  and the output activation. ``DPTNeck`` itself is not used because its reassemble stage
  (``DPTReassembleStage``) takes token sequences *with* the CLS token of a ViT of known width
  (it strips ``hidden_state[:, 0]`` and reshapes the rest to a square or given grid) and does its own
  resampling; our maps are already ``(B, C, h, w)``, come from ViTs, BEiT-style students and Swin
  alike (Swin has no CLS token and different widths per stage), and are resampled by BEiT's neck as
  in the paper's other dense settings. transformers skips that stage only for a ``swinv2``
  ``backbone_config``, which is not a way to feed it maps from an arbitrary backbone.

The output: DPT's head ends in a ReLU (DPT predicts unbounded inverse depth, aligned by a scale and
shift for NYUv2). We replace that last ReLU with ``max_depth * sigmoid(.)``, the bounded metric
output of GLPDepth (Kim et al., "Global-Local Path Networks for Monocular Depth Estimation with
Vertical CutDepth", 2022: ``sigmoid(out) * max_depth``) and of the Monocular-Depth-Estimation-Toolbox's
depth heads with ``scale_up=True``: always in ``(0, max_depth)`` (up to float rounding at extreme
logits, where the loss clamps), so the log in the SiLog loss (:mod:`fdistill.dense.depth_loss`) is
finite from the first step, and no output ReLU can die at 0.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pyramid import DenseError, ViTPyramid, _module, default_block_indices, intermediate_maps

__all__ = ["DepthEstimator"]

#: decoders DepthEstimator builds (GLPDepth's decoder is not built: one good decoder is enough)
DECODERS = ("dpt",)


def _pair(v) -> Optional[Tuple[int, int]]:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return v if len(v) == 2 else None


def _patch_size(net: nn.Module) -> Optional[Tuple[int, int]]:
    """The stride of the backbone's patch embedding (16 for ViT-B/16, 4 for Swin), if it says."""
    pe = getattr(net, "patch_embed", None)
    p = getattr(pe, "patch_size", None) if pe is not None else None
    if p is None:
        p = getattr(net, "patch_size", None)  # open_clip's VisionTransformer
    return _pair(p)


def _fixed_size(net: nn.Module) -> Optional[Tuple[int, int]]:
    """The one input size a backbone accepts, where its patch embedding is strict (timm's default
    ViT and Swin; a timm ViT built with ``dynamic_img_size=True`` is not)."""
    pe = getattr(net, "patch_embed", None)
    if pe is None or not getattr(pe, "strict_img_size", False):
        return None
    return _pair(getattr(pe, "img_size", None))


class DepthEstimator(nn.Module):
    """``backbone`` + (ViT: BEiT's pyramid neck) + DPT's fusion decoder and head -> depth in metres.

    Args:
        backbone: a timm-style network or an fdistill adapter (``forward_intermediates``).
        max_depth: the output bound in metres (NYUv2: 10); depth is ``max_depth * sigmoid(.)``.
        img_size: (H, W) of a probe input used once to check the size and find the maps' shapes
            (default: the 480 x 640 NYUv2 frame). Sizes must be multiples of the patch size.
        indices: ViT blocks to take (default: BEiT's, :func:`default_block_indices`); ignored for
            hierarchical backbones, which give their stages.
        decoder: ``"dpt"`` (the only one built).
        features: DPT's fusion width (256 in DPT; ``DPTConfig.fusion_hidden_size``).
        use_batch_norm: batch norm in the fusion blocks' residual units (DPT: off for depth).

    ``forward(x)``: ``x`` (B, 3, H, W) normalised images -> ``{"depth": (B, 1, H, W)}``, in
    ``(0, max_depth)``.
    """

    def __init__(self, backbone: nn.Module, *, max_depth: float = 10.0, img_size: Sequence[int] = (480, 640),
                 indices: Optional[Sequence[int]] = None, decoder: str = "dpt", features: int = 256,
                 use_batch_norm: bool = False):
        super().__init__()
        from transformers import DPTConfig
        from transformers.models.dpt.modeling_dpt import DPTDepthEstimationHead, DPTFeatureFusionStage

        if decoder not in DECODERS:
            raise DenseError(f"decoder {decoder!r} is not built; choose one of {DECODERS}")
        if not max_depth > 0:
            raise DenseError(f"max_depth must be > 0 (metres), got {max_depth}")
        if features < 2 or features % 2:
            raise DenseError(f"features must be an even number >= 2 (DPT's head halves it), got {features}")
        size = _pair(img_size)
        if size is None:
            raise DenseError(f"img_size must be (H, W), got {img_size!r}")
        self.backbone = backbone
        self.max_depth = float(max_depth)
        self.img_size = size
        net = _module(backbone)
        self._name = type(net).__name__
        self.patch_size = _patch_size(net)
        blocks = getattr(net, "blocks", None)
        if indices is None and isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            indices = default_block_indices(len(blocks))
        self.indices = list(indices) if indices is not None else None

        self.check_size(*size)  # before any data is read
        with torch.no_grad():
            was = backbone.training
            backbone.eval()
            try:
                probe = intermediate_maps(backbone, torch.zeros(1, 3, *size), self.indices)
            except DenseError:
                raise
            except (AssertionError, RuntimeError, ValueError) as e:
                raise DenseError(f"{self._name} cannot take a {size[0]}x{size[1]} input: {e}") from e
            finally:
                backbone.train(was)
        if len(probe) != 4:
            raise DenseError(f"the DPT decoder takes 4 levels; {self._name} gave {len(probe)}")
        plain = len({tuple(m.shape[1:]) for m in probe}) == 1  # a plain ViT: one stride at every block
        self.neck = ViTPyramid(int(probe[0].shape[1])) if plain else nn.Identity()
        in_channels: List[int] = [int(m.shape[1]) for m in probe]

        cfg = DPTConfig(neck_hidden_sizes=in_channels, fusion_hidden_size=features, head_in_index=-1,
                        add_projection=False, use_batch_norm_in_fusion_residual=use_batch_norm)
        # DPTNeck's ``convs``: each level to the fusion width (3x3, no bias), strides 4, 8, 16, 32
        self.project = nn.ModuleList(nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False)
                                     for c in in_channels)
        self.fusion = DPTFeatureFusionStage(cfg)  # coarse to fine; outputs at strides 16, 8, 4, 2
        self.head = DPTDepthEstimationHead(cfg)  # stride 2 -> conv, 2x up, conv, ReLU, 1x1 conv
        if not isinstance(self.head.head[-1], nn.ReLU):
            raise DenseError("transformers' DPTDepthEstimationHead no longer ends in a ReLU; "
                             "DepthEstimator's output activation needs checking")
        self.head.head[-1] = nn.Identity()  # the logit; max_depth * sigmoid in forward (module doc)
        self.features = features

    def check_size(self, h: int, w: int) -> None:
        """:class:`DenseError` unless the backbone takes an ``h`` x ``w`` input."""
        p = self.patch_size
        if p is not None and (h % p[0] or w % p[1]):
            raise DenseError(f"DepthEstimator: input size {h}x{w} is not divisible by the patch size "
                             f"{p[0]}x{p[1]} of {self._name}; crop or resize to multiples of {p[0]}x{p[1]}")
        fixed = _fixed_size(_module(self.backbone))
        if fixed is not None and fixed != (h, w):
            raise DenseError(f"DepthEstimator: {self._name} takes {fixed[0]}x{fixed[1]} inputs only (a fixed "
                             f"img_size), got {h}x{w}; build it with img_size=({h}, {w}) or, for a timm ViT, "
                             "dynamic_img_size=True")

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x``: (B, 3, H, W) normalised images -> ``{"depth": (B, 1, H, W)}`` in metres."""
        if x.ndim != 4:
            raise DenseError(f"DepthEstimator takes (B, C, H, W) images, got shape {tuple(x.shape)}")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        self.check_size(*size)
        maps = intermediate_maps(self.backbone, x, self.indices)  # 4 x (B, C_i, h_i, w_i)
        levels = self.neck(maps) if isinstance(self.neck, ViTPyramid) else maps  # strides 4, 8, 16, 32
        feats = [proj(m) for proj, m in zip(self.project, levels)]  # 4 x (B, features, h_i, w_i)
        fused = self.fusion(feats)  # [(B, F, H/16, W/16), ..., (B, F, H/2, W/2)]
        logit = self.head(fused).unsqueeze(1)  # (B, 1, H', W'): (H, W) when the stride-32 level is exact
        if logit.shape[-2:] != x.shape[-2:]:  # an odd grid at stride 16 (e.g. 7 -> max-pool 3 -> ... 6 x 16)
            logit = F.interpolate(logit, size=size, mode="bilinear", align_corners=False)
        return {"depth": self.max_depth * torch.sigmoid(logit)}  # (B, 1, H, W), in (0, max_depth)
