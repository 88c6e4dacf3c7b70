"""A plain ViT as a detection backbone, ViTDet style (Li et al., "Exploring Plain Vision Transformer
Backbones for Object Detection", ECCV 2022; Li et al., "Benchmarking Detection Transfer Learning
with Vision Transformers", 2021), the setting of the paper's COCO benchmark (Sec. 5).

* :class:`WindowedViT` runs a pre-trained ViT at detection resolution (1024 / 16 = a 64 x 64 grid):
  patch embedding, the absolute position embedding interpolated to the grid, the prefix tokens
  ([CLS], registers) dropped (ViTDet does), then every block on window-partitioned tokens -- a
  block is per-token except its attention, so running the whole block on ``(B * nW, ws * ws, C)``
  windows *is* windowed attention -- and one freshly initialised block with global attention on
  top (the paper's "window attention with window 14, plus one global block"). Hand-written because
  timm has no windowed-attention wrapper for a plain ViT (its windowed models -- Swin, ViTDet-style
  ``vit_*_samvit`` -- are separate architectures that a CLIP/BEiT/FD checkpoint does not load into).
* :class:`SimpleFeaturePyramid` is ViTDet's simple pyramid (Sec. 3 "Simple feature pyramid", its
  Fig. 2c) from the last map: strides 4, 8, 16, 32 and a stride-64 ``pool`` level, as the dict
  torchvision's detectors take. Hand-written because torchvision has no ViT simple pyramid (its
  ``FeaturePyramidNetwork`` is the top-down FPN over a hierarchical backbone).

Relative position bias (BEiT, the FD student): the tables are indexed for the window a block
actually attends over, the [CLS] rows and columns left out. A table is resized once, at
construction, with timm's ``resize_rel_pos_bias_table`` (BEiT's interpolation) when a block attends
over a larger window than it was pre-trained on: the windowed blocks' table to the window (a model
pre-trained at 224 / 16 = 14 fits window 14 as it is), a global block's table to the grid of
``img_size``. A shared table (the FD student's) serves every windowed block; a global block gets
its own copy resized to the grid (BEiT's fine-tuning likewise expands the shared table into every
block), the added block a zero table (timm's initialisation). At run time a smaller window or grid
takes the table's central entries exactly; a larger one (an input beyond ``img_size``) clamps
the offsets to the table's edge.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .pyramid import DenseError, _module

__all__ = ["WindowedViT", "SimpleFeaturePyramid", "window_partition", "window_unpartition",
           "window_rel_pos_bias", "backbone_mean_std"]

Size2 = Tuple[int, int]


# -- windows ------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: Size2) -> Tuple[torch.Tensor, Size2]:
    """(B, H, W, C) -> (B * nW, wh * ww, C) windows, the grid zero-padded (bottom/right) to a
    multiple of the window as in ViTDet; returns the padded (Hp, Wp) too."""
    B, H, W, C = x.shape
    wh, ww = window
    ph, pw = (-H) % wh, (-W) % ww
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, nh, nw, wh, ww, C)
    return x.reshape(-1, wh * ww, C), (Hp, Wp)


def window_unpartition(x: torch.Tensor, window: Size2, padded: Size2, size: Size2) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, wh * ww, C) -> (B, H, W, C), padding removed."""
    wh, ww = window
    Hp, Wp = padded
    nh, nw = Hp // wh, Wp // ww
    B = x.shape[0] // (nh * nw)
    x = x.view(B, nh, nw, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :size[0], :size[1]]


# -- relative position bias ---------------------------------------------------------------------
def window_rel_pos_bias(table: torch.Tensor, table_window: Sequence[int], window: Size2) -> torch.Tensor:
    """BEiT's relative position bias among the ``window`` tokens (no [CLS]): (num_heads, N, N),
    N = wh * ww, row-major like the tokens.

    ``table``: (num_rel, num_heads), timm/BEiT's flat layout -- the (2 Th - 1) x (2 Tw - 1) offsets
    row-major, then 3 [CLS] entries (ignored here). Offset (dy, dx) reads entry
    ``(dy + Th - 1) * (2 Tw - 1) + dx + Tw - 1`` (timm's ``gen_relative_position_index``);
    offsets beyond the table's window are clamped to its edge. Differentiable in ``table``."""
    Th, Tw = int(table_window[0]), int(table_window[1])
    wh, ww = window
    nH = table.shape[-1]
    grid = table[:(2 * Th - 1) * (2 * Tw - 1)].view(2 * Th - 1, 2 * Tw - 1, nH)
    ry = torch.arange(wh, device=table.device)
    rx = torch.arange(ww, device=table.device)
    iy = (ry[:, None] - ry[None, :]).clamp(-(Th - 1), Th - 1) + Th - 1  # (wh, wh): query row - key row
    ix = (rx[:, None] - rx[None, :]).clamp(-(Tw - 1), Tw - 1) + Tw - 1  # (ww, ww)
    bias = grid[iy[:, None, :, None], ix[None, :, None, :]]  # (wh, ww, wh, ww, nH): (qy, qx, ky, kx)
    N = wh * ww
    return bias.reshape(N, N, nH).permute(2, 0, 1).contiguous()  # (nH, N, N)


def _table_rows(window: Size2) -> int:
    return (2 * window[0] - 1) * (2 * window[1] - 1) + 3


def _resized_table(table: torch.Tensor, old: Size2, new: Size2) -> torch.Tensor:
    """timm's (BEiT's) interpolation of a flat table from window ``old`` to ``new`` (done once)."""
    from timm.layers import resize_rel_pos_bias_table

    if tuple(old) == tuple(new):
        return table.detach().clone()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # timm's interpolation helper warns about its own indexing
        return resize_rel_pos_bias_table(table.detach(), new_window_size=tuple(new),
                                         new_bias_shape=(_table_rows(new), table.shape[-1]),
                                         old_window_size=tuple(old)).to(table.dtype)


class _WindowBias:
    """Mixed into a BEiT attention module: its own table is read for ``self.attn_window`` (set by
    :class:`WindowedViT` before each call) instead of the pre-training grid with [CLS]."""

    attn_window: Size2

    def _get_rel_pos_bias(self) -> torch.Tensor:
        return window_rel_pos_bias(self.relative_position_bias_table, self.window_size, self.attn_window).unsqueeze(0)


def _window_bias_class(cls: type) -> type:
    """``cls`` (timm's BEiT ``Attention``, the FD student's ``FDAttention``, ...) with
    :class:`_WindowBias` in front; registered in this module so the model still pickles."""
    if issubclass(cls, _WindowBias):
        return cls
    name = f"Windowed{cls.__name__}"
    made = globals().get(name)
    if made is None or made.__mro__[2] is not cls:
        made = type(name, (_WindowBias, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = made
    return made


def _set_table(attn: nn.Module, table: torch.Tensor, window: Size2) -> None:
    """Give ``attn`` its own table for ``window`` (its pre-training index is dropped: unused)."""
    attn.relative_position_bias_table = nn.Parameter(table)
    attn.window_size = tuple(window)
    if "relative_position_index" in attn._buffers:
        attn._buffers["relative_position_index"] = None
    else:
        attn.relative_position_index = None


# -- the backbone -------------------------------------------------------------------------------
def backbone_mean_std(backbone: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Input mean/std of an fdistill adapter (``.mean``/``.std``), an FD student, or a timm model
    (``pretrained_cfg``); ImageNet's when none says."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    for m in (backbone, _module(backbone), getattr(backbone, "model", None)):
        if m is None:
            continue
        if getattr(m, "mean", None) is not None and getattr(m, "std", None) is not None:
            return tuple(float(v) for v in m.mean), tuple(float(v) for v in m.std)
        cfg = getattr(m, "pretrained_cfg", None) or {}
        if cfg.get("mean") is not None and cfg.get("std") is not None:
            return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def _plain_vit(backbone: nn.Module) -> nn.Module:
    """The timm ViT / BEiT (FD student) inside ``backbone``, or a :class:`DenseError`."""
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    candidates = [_module(backbone)] + [getattr(backbone, n, None) for n in ("model", "student")]
    candidates += [getattr(c, "trunk", None) for c in candidates[1:]]  # an open_clip tower on a timm trunk
    for net in candidates:
        if type(net).__name__ == "VisionTransformer" and type(net).__module__.startswith("open_clip"):
            # open_clip's own ViT tower: the same weights as a timm ViT, whose blocks can be windowed
            from ..teachers.open_clip_teacher import timm_vit_from_open_clip

            net = timm_vit_from_open_clip(net)
        if isinstance(net, (VisionTransformer, Beit)):
            pe = getattr(net, "patch_embed", None)
            if not isinstance(getattr(pe, "proj", None), nn.Conv2d) or hasattr(pe, "backbone"):
                raise DenseError(f"{type(net).__name__}: WindowedViT needs a convolutional patch embedding "
                                 "(no hybrid CNN stem)")
            return net
    net = candidates[0]
    kind = type(net).__name__
    hint = ""
    if "Eva" in kind:
        hint = " (EVA's rotary position embedding is not supported by WindowedViT)"
    elif not hasattr(net, "blocks"):
        hint = (" (hierarchical backbones such as Swin, CNNs, HF towers and python: models give no plain-ViT "
                "token map)")
    raise DenseError(f"{kind} is not a plain ViT: ViTDet's windowed backbone takes a timm VisionTransformer "
                     f"(incl. CLIP-style), an open_clip ViT tower or Beit (incl. the FD student){hint}")


def _child(net: nn.Module, name: str) -> nn.Module:
    m = getattr(net, name, None)
    return m if isinstance(m, nn.Module) else nn.Identity()


def _reinit_block(blk: nn.Module, layer_scale_init: float) -> nn.Module:
    """Fresh parameters for a copied block (timm's ViT/BEiT initialisation): Linear weights
    N(0, 0.02) truncated, biases (incl. BEiT's q/v biases) and relative-position tables 0,
    LayerNorms 1/0, layer-scale ``layer_scale_init``."""
    from timm.layers import trunc_normal_

    for m in blk.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "gamma_1", "gamma_2"):  # timm LayerScale / BEiT layer scale
                p.fill_(layer_scale_init)
            elif leaf in ("q_bias", "v_bias", "relative_position_bias_table"):
                p.zero_()
    return blk


class WindowedViT(nn.Module):
    """A plain ViT run ViTDet-style: windowed blocks + global blocks, prefix tokens dropped.

    Args:
        backbone: a timm ``VisionTransformer`` (CLIP-style ``norm_pre`` included), a timm ``Beit``
            (the FD student included) or an fdistill adapter around one. Its patch embedding,
            blocks and norms are taken over (shared, not copied); [CLS], head and pooling are not.
        window_size: the attention window in tokens (14 in ViTDet and the paper). Where the grid
            is smaller than the window in a dimension, the window is the grid there (no padding),
            so a window at least the grid's size is global attention.
        global_blocks: indices of the existing blocks that attend globally (ViTDet: 2, 5, 8, 11);
            default none, as the paper says.
        add_global_block: append one new block with global attention (same class and width as
            the last block, freshly initialised): the paper's COCO setting.
        img_size: (H, W) of the largest input expected (after the detector's resizing and padding);
            sizes the global blocks' relative position tables. Any input size runs.
        final_norm: apply the ViT's final norm to the output (ViTDet does not; the simple
            pyramid has its own LayerNorms).
        layer_scale_init: the added block's layer-scale value, when the architecture has one.
        grad_checkpointing: recompute each block in the backward pass (saves memory at 1024 px).

    ``forward(x)``: (B, 3, H, W) normalised images -> (B, C, H / p, W / p), p the patch size
    (inputs not divisible by p are zero-padded at the bottom/right first).
    """

    def __init__(self, backbone: nn.Module, window_size: int | Size2 = 14, global_blocks: Iterable[int] = (),
                 add_global_block: bool = True, img_size: int | Size2 = (1024, 1024), *,
                 final_norm: bool = False, layer_scale_init: float = 0.1, grad_checkpointing: bool = False):
        super().__init__()
        from timm.models.beit import Beit

        net = _plain_vit(backbone)
        self.is_beit = isinstance(net, Beit)
        pe = net.patch_embed
        self.patch_size: Size2 = tuple(int(p) for p in pe.patch_size)
        self.pretrain_grid: Size2 = tuple(int(g) for g in pe.grid_size)
        self.window: Size2 = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size: Size2 = (int(img_size[0]), int(img_size[1]))
        self.grid: Size2 = tuple(math.ceil(s / p) for s, p in zip(self.img_size, self.patch_size))
        self.embed_dim = int(net.embed_dim)
        self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 1))
        self.grad_checkpointing = bool(grad_checkpointing)

        # -- embeddings (names chosen so fdistill.eval.layer_decay gives them layer 0) ----------------
        self.patch_embed = pe
        pos = getattr(net, "pos_embed", None)
        if pos is not None:
            skip = 0 if getattr(net, "no_embed_class", False) else self.num_prefix_tokens
            pos = pos[:, skip:].detach().clone()  # (1, N0, C): the patch positions only (ViTDet drops [CLS]'s)
            if pos.shape[1] != self.pretrain_grid[0] * self.pretrain_grid[1]:
                raise DenseError(f"position embedding of {pos.shape[1]} patches does not fill the "
                                 f"{self.pretrain_grid} grid")
            self.pos_embed = nn.Parameter(pos)
        else:
            self.pos_embed = None
        self.pos_drop = _child(net, "pos_drop")
        self.ln_pre = _child(net, "norm_pre")  # CLIP-style pre-norm; named ln_pre so layer decay gives it layer 0
        self.rel_pos_bias = getattr(net, "rel_pos_bias", None) if self.is_beit else None

        # -- blocks -------------------------------------------------------------------------------
        blocks = list(net.blocks)
        depth = len(blocks)
        self.global_blocks = sorted({int(i) for i in global_blocks})
        if any(i < 0 or i >= depth for i in self.global_blocks):
            raise DenseError(f"global_blocks {self.global_blocks} outside the backbone's {depth} blocks")
        if add_global_block:
            blocks.append(_reinit_block(copy.deepcopy(blocks[-1]), layer_scale_init))
            self.global_blocks.append(depth)
        self.blocks = nn.ModuleList(blocks)
        self.depth = depth  # pre-trained blocks (the added one is blocks[depth])
        self.norm = _child(net, "norm") if final_norm else nn.Identity()
        self.uses_shared = [False] * len(self.blocks)
        if self.is_beit:
            self._prepare_rel_pos_bias(add_global_block)

    @property
    def out_channels(self) -> int:
        return self.embed_dim

    def _win(self) -> Size2:
        """The windowed blocks' window for the ``img_size`` grid."""
        return min(self.window[0], self.grid[0]), min(self.window[1], self.grid[1])

    def _prepare_rel_pos_bias(self, added: bool) -> None:
        """Tables sized once for the window / grid each block attends over (module docstring);
        ``self.uses_shared[i]``: whether block i takes the shared table."""
        win, shared = self._win(), self.rel_pos_bias
        self.uses_shared = [False] * len(self.blocks)
        if shared is not None:
            old = tuple(shared.window_size)
            new = (max(old[0], win[0]), max(old[1], win[1]))
            if new != old:  # timm's own resize, as at a new fine-tuning resolution
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # timm's interpolation helper's own indexing
                    shared.set_window_size(new)
        for i, blk in enumerate(self.blocks):
            attn = blk.attn
            is_global, fresh = i in self.global_blocks, added and i == self.depth
            want = self.grid if is_global else win
            own = getattr(attn, "relative_position_bias_table", None)
            src, src_win = (own, tuple(attn.window_size)) if own is not None else (None, None)
            if own is None and shared is not None and is_global:  # a global block's own copy of the shared table
                src, src_win = shared.relative_position_bias_table, tuple(shared.window_size)
            elif shared is not None:
                self.uses_shared[i] = True
            if src is None:
                continue
            size = (max(src_win[0], want[0]), max(src_win[1], want[1]))  # never shrink: smaller windows index it
            if fresh:  # the added block: a zero table, as timm initialises one
                _set_table(attn, src.new_zeros(_table_rows(want), src.shape[-1]), want)
            elif src is not own or size != src_win:
                _set_table(attn, _resized_table(src, src_win, size), size)
            attn.__class__ = _window_bias_class(type(attn))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Position embedding and relative-position tables (timm/BEiT keep them out of weight decay)."""
        out = {"pos_embed"} if self.pos_embed is not None else set()
        return out | {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    def _pos(self, grid: Size2, dtype: torch.dtype) -> torch.Tensor:
        """(1, h, w, C) absolute position embedding interpolated to ``grid`` (bicubic, ViTDet's
        ``get_abs_pos``; timm's ``resample_abs_pos_embed``)."""
        from timm.layers import resample_abs_pos_embed

        pos = resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.pretrain_grid),
                                     num_prefix_tokens=0)
        return pos.to(dtype).view(1, grid[0], grid[1], -1)

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block on the windows of ``x`` (B, h, w, C) -> (B, h, w, C)."""
        h, w = x.shape[1:3]
        if i in self.global_blocks:
            win = (h, w)
        else:
            win = (min(self.window[0], h), min(self.window[1], w))
        t, padded = window_partition(x, win)  # (B * nW, wh * ww, C)
        kwargs: Dict[str, torch.Tensor] = {}
        if self.is_beit:
            if getattr(blk.attn, "relative_position_bias_table", None) is not None:
                blk.attn.attn_window = win  # its own table, read for this window (_WindowBias)
            if self.uses_shared[i]:
                rp = self.rel_pos_bias
                bias = window_rel_pos_bias(rp.relative_position_bias_table, rp.window_size, win).unsqueeze(0)
                if bias.device.type == "cuda":
                    from ..models.student import sdpa_ready_bias

                    bias = sdpa_ready_bias(bias)
                kwargs["shared_rel_pos_bias"] = bias  # (1, nH, N, N)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            t = checkpoint(blk, t, use_reentrant=False, **kwargs)
        else:
            t = blk(t, **kwargs)
        return window_unpartition(t, win, padded, (h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise DenseError(f"WindowedViT takes (B, 3, H, W) images, got {tuple(x.shape)}")
        ph, pw = (-x.shape[-2]) % self.patch_size[0], (-x.shape[-1]) % self.patch_size[1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        t = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        t = self.patch_embed.norm(t)
        if self.pos_embed is not None:
            t = t + self._pos(tuple(t.shape[1:3]), t.dtype)
        t = self.ln_pre(self.pos_drop(t))
        for i, blk in enumerate(self.blocks):
            t = self._run_block(i, blk, t)
        t = self.norm(t)
        return t.permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)


# -- the simple feature pyramid -----------------------------------------------------------------
def _ln(c: int) -> nn.Module:
    from timm.layers import LayerNorm2d

    return LayerNorm2d(c, eps=1e-6)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (its Sec. 3, ``SimpleFeaturePyramid`` in detectron2): from
    the last stride-16 map, scale 4 = deconv 2x2/2 + LN + GELU + deconv 2x2/2 (C -> C/2 -> C/4),
    2 = deconv (C -> C/2), 1 = the map, 0.5 = 2x2 max-pool (0.25, 0.125: 4x4, 8x8, for patch 4 / 8); each then 1x1 conv + LN + 3x3 conv + LN
    to ``out_channels`` (convs without bias, as with a norm). ``top_block``: a stride-64 ``pool``
    level by stride-2 subsampling of the last level (torchvision's / detectron2's ``LastLevelMaxPool``).

    ``forward(x)``: (B, C, h, w) -> ``OrderedDict`` ``"0"`` ... ``"3"`` (strides 4, 8, 16, 32 for
    patch 16) and ``"pool"``, each (B, out_channels, ., .), the form torchvision's FPN gives.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 top_block: bool = True):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.in_channels, self.out_channels, self.scales = int(in_channels), int(out_channels), tuple(scales)
        dim = self.in_channels
        towers: List[nn.Module] = []
        for s in self.scales:
            if s == 4.0:
                layers, c = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), _ln(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)], dim // 4
            elif s == 2.0:
                layers, c = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif s == 1.0:
                layers, c = [], dim
            elif s in (0.5, 0.25, 0.125):
                # 0.25 / 0.125 are not ViTDet's: they give a patch-4 / patch-8 ViT (the CPU-sized
                # models) the same strides 4 ... 32, by a wider max-pool as ViTDet's 0.5 does
                k = int(round(1 / s))
                layers, c = [nn.MaxPool2d(kernel_size=k, stride=k)], dim
            else:
                raise DenseError(f"SimpleFeaturePyramid scale {s} is not one of 4, 2, 1, 0.5, 0.25, 0.125")
            layers += [nn.Conv2d(c, out_channels, 1, bias=False), _ln(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), _ln(out_channels)]
            towers.append(nn.Sequential(*layers))
        self.simfp = nn.ModuleList(towers)  # not "layers"/"blocks": layer decay's block finder looks for those
        self.top_block = LastLevelMaxPool() if top_block else None

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise DenseError(f"SimpleFeaturePyramid({self.in_channels}) takes (B, {self.in_channels}, h, w), "
                             f"got {tuple(x.shape)}")
        outs = [tower(x) for tower in self.simfp]  # (B, out, 4h, 4w), (B, out, 2h, 2w), ...
        names = [str(i) for i in range(len(outs))]
        if self.top_block is not None:
            outs, names = self.top_block(outs, [], names)  # + "pool": (B, out, h/4, w/4)
        return OrderedDict(zip(names, outs))
