"""The FD student: a ViT with a [CLS] token and one relative-position-bias table shared by all
layers (paper Sec. 3.2, "shared relative position bias"), built on timm's BEiT.

timm's :class:`~timm.models.beit.Beit` already has everything the paper's student needs
(shared or per-layer relative position bias, layer scale, drop path, attention through
``F.scaled_dot_product_attention`` with the bias passed as an additive mask, gradient
checkpointing). We subclass it only to add what FD needs on top:

* a learned mask token for student input masking (paper Table 5), random or block-wise;
* an MAE-style path that drops masked tokens from the encoder (cost falls with the ratio);
* ``forward_tokens`` returning the full normalised token map (B, 1+N, C), at the student's own
  input size or at any other multiple of the patch size (multi-resolution training, RADIO v2.5);

The CPU speed paths that keep the values (``FDAttention``, ``FDBlock``) live in
:mod:`fdistill.speed`, behind its one switch; :func:`create_student` applies them.

Because the parameters keep BEiT's names, an exported student loads with
``timm.create_model("beit_*", ...)`` (see :func:`timm_model_args`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.beit import Beit
from torch.utils.checkpoint import checkpoint

from ..speed import apply_student_speed_paths

POS_EMBEDS = ("shared_rpb", "rpb", "ape")
#: ``official``: the FD/BEiT initialisation (:meth:`FDStudent.official_init_`); ``timm``: timm's Beit
INITS = ("official", "timm")

#: Standard ViT widths (embed_dim, depth, num_heads), as in timm / DeiT / BEiT.
STUDENT_SIZES: Dict[str, Tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


def _pos_embed_flags(pos_embed: str) -> dict:
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"unknown pos_embed {pos_embed!r}; expected one of {POS_EMBEDS}")
    return dict(
        use_abs_pos_emb=pos_embed == "ape",
        use_rel_pos_bias=pos_embed == "rpb",
        use_shared_rel_pos_bias=pos_embed == "shared_rpb",
    )


def clipped_relative_position_index(table_window: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """Index (1+N, 1+N) into a BEiT relative-position table made for ``table_window`` of the
    token pairs of a ``grid`` of N patches, [CLS] first.

    Offsets are counted in patches, as at the table's own size, and clipped to the largest the
    table holds (Shaw et al. 2018, "clipping" relative positions beyond a maximum distance).
    At ``grid == table_window`` this is timm's ``gen_relative_position_index``; a smaller grid
    reads a sub-table, so a multi-resolution step trains the very entries the base resolution
    uses (an interpolated table would mix them; timm's ``resize_rel_pos_bias_table``, BEiT's
    geometric interpolation, runs head by head on the CPU and is meant for loading checkpoints);
    a larger grid reuses the edge entries for the longer distances. The three [CLS] entries are
    the table's last three rows, as in timm."""
    th, tw = table_window
    gh, gw = grid
    num_distance = (2 * th - 1) * (2 * tw - 1) + 3
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (N,)
    dy = (ys[:, None] - ys[None, :]).clamp(-(th - 1), th - 1) + th - 1  # (N, N)
    dx = (xs[:, None] - xs[None, :]).clamp(-(tw - 1), tw - 1) + tw - 1
    n = gh * gw
    index = torch.zeros((n + 1, n + 1), dtype=torch.long)
    index[1:, 1:] = dy * (2 * tw - 1) + dx
    index[0, 0:] = num_distance - 3  # cls -> token
    index[0:, 0] = num_distance - 2  # token -> cls
    index[0, 0] = num_distance - 1  # cls -> cls
    return index


class FDStudent(Beit):
    """BEiT-style ViT student. ``forward_tokens(x, mask)`` -> (B, 1+N, C) after the final norm."""

    def __init__(self, *, pos_embed: str = "shared_rpb", **kwargs):
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("global_pool", "token")  # keeps the final norm on the token map
        super().__init__(**_pos_embed_flags(pos_embed), **kwargs)
        self.pos_embed_type = pos_embed
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        self._timm_args: dict = {}
        self._rel_index_cache: Dict[Tuple[int, int], torch.Tensor] = {}  # grid -> (1+N, 1+N), CPU

    # -- geometry -------------------------------------------------------------------------
    @property
    def grid_size(self) -> Tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return int(self.patch_embed.patch_size[0])

    @property
    def img_size(self) -> Tuple[int, int]:
        return tuple(self.patch_embed.img_size)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set(super().no_weight_decay()) | {"mask_token"}

    @torch.no_grad()
    def official_init_(self) -> "FDStudent":
        """Re-initialise as the official FD student (``models/feature_distillation.py``
        ``VisionTransformerForFD`` on ``models/vision_transformer.py``, BEiT's scheme).

        Every Linear and the patch-embedding Conv2d: normal(0, 0.02) truncated at plus/minus one
        std (``VisionTransformerForFD._trunc_normal_`` passes ``a=-std, b=std``), biases 0;
        LayerNorm 1 / 0; [CLS] (and the mask token) the same truncated normal; relative-position
        tables and q/v biases stay 0, layer scale stays ``init_values``; then ``fix_init_weight``:
        each block's ``attn.proj`` and ``mlp.fc2`` weights divided by sqrt(2 * layer), layers
        counted from 1. timm's Beit differs in two ways this undoes: its truncation bounds are
        plus/minus 2 (absolute: 100 std, so effectively untruncated) and it leaves the
        patch-embedding conv at PyTorch's default (Kaiming-uniform)."""
        std = 0.02

        def tn(t: torch.Tensor) -> None:
            trunc_normal_(t, std=std, a=-std, b=std)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                tn(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for t in (self.cls_token, self.pos_embed, self.mask_token):
            if t is not None:
                tn(t)
        for layer_id, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
        return self

    # -- other input sizes --------------------------------------------------------------
    def input_grid(self, hw) -> Tuple[int, int]:
        """The token grid of an (H, W) input: the student's own, or (H / p, W / p) for another
        size (each a multiple of the patch size p)."""
        hw = (int(hw[0]), int(hw[1]))
        if hw == self.img_size:
            return self.grid_size
        p = self.patch_size
        if hw[0] % p or hw[1] % p:
            raise ValueError(f"input size {hw[0]}x{hw[1]} is not a multiple of the patch size {p}")
        if self.pos_embed_type == "rpb":
            raise ValueError(f"input size {hw[0]}x{hw[1]} differs from the student's {self.img_size[0]}x"
                             f"{self.img_size[1]}: other sizes need pos_embed 'shared_rpb' or 'ape' (one table "
                             "per layer ('rpb') is not resized)")
        return hw[0] // p, hw[1] // p

    def _embed_patches(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C). timm's PatchEmbed checks the input size it was built for;
        at another size its own projection and norm run directly (the same weights)."""
        if grid == self.grid_size:
            return self.patch_embed(x)
        pe = self.patch_embed
        return pe.norm(pe.proj(x).flatten(2).transpose(1, 2))  # (B, N, C)

    def rel_pos_bias_at(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The shared relative position bias (H, 1+N, 1+N) for a ``grid`` of patches, from the
        one table (:func:`clipped_relative_position_index`; timm's own at the base grid)."""
        rpb = self.rel_pos_bias
        if tuple(grid) == tuple(rpb.window_size):
            return rpb()
        index = self._rel_index_cache.get(tuple(grid))
        if index is None:
            index = clipped_relative_position_index(tuple(rpb.window_size), tuple(grid))
            self._rel_index_cache[tuple(grid)] = index
        table = rpb.relative_position_bias_table  # (num_distance, H)
        T = index.shape[0]
        bias = table[index.to(table.device).view(-1)].view(T, T, -1)  # (1+N, 1+N, H)
        return bias.permute(2, 0, 1).contiguous()  # (H, 1+N, 1+N)

    def pos_embed_at(self, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
        """The absolute position embedding (1, 1+N, C) for a ``grid`` (``ape`` only): bicubic
        resampling of the learned one, differentiable (timm's ``resample_abs_pos_embed``)."""
        if self.pos_embed is None or tuple(grid) == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.grid_size),
                                      num_prefix_tokens=1).to(self.pos_embed.dtype)

    # -- forward --------------------------------------------------------------------------
    def _run_blocks(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor]) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return x

    def forward_tokens(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, drop_masked: bool = False,
        num_visible: Optional[int] = None,
    ) -> torch.Tensor:
        """Token map of normalised images.

        Args:
            x: (B, 3, H, W) images normalised with ``self.mean`` / ``self.std``.
            mask: optional (B, N) bool, True where a patch is masked.
            drop_masked: if True, masked patches are removed from the encoder (MAE-style)
                instead of being replaced by the mask token; every row of ``mask`` must mask
                the same number of patches. The output then holds [CLS] + the visible patches
                in their original order: (B, 1 + N_visible, C).
            num_visible: with ``drop_masked``, the number of unmasked patches per image when
                the caller knows it (it saves reading the mask back from the device).

        Returns:
            (B, 1 + N, C) tokens after the final norm ([CLS] first).
        """
        grid = self.input_grid(x.shape[-2:])
        x = self._embed_patches(x, grid)  # (B, N, C)
        B, N, C = x.shape
        if mask is not None:
            if mask.shape != (B, N):
                raise ValueError(f"mask must be (B, N) = {(B, N)}, got {tuple(mask.shape)}")
            mask = mask.to(torch.bool)
        # (1, H, 1+N, 1+N): 4-d so that SDPA's CPU flash kernel accepts it (a 3-d mask sends it to
        # the math path); without gradient it serves every block through the fused kernels
        rel_pos_bias = self.rel_pos_bias_at(grid).unsqueeze(0) if self.rel_pos_bias is not None else None
        pos_embed = self.pos_embed_at(grid)

        if mask is not None and drop_masked:
            keep = visible_index(mask, num_visible)  # (B, Nv)
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, C))
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1+Nv, C)
            idx = torch.cat((keep.new_zeros(B, 1), keep + 1), dim=1)  # token ids incl. [CLS]
            if pos_embed is not None:
                pos = pos_embed.expand(B, -1, -1)
                x = x + torch.gather(pos, 1, idx.unsqueeze(-1).expand(-1, -1, C))
            if any(getattr(b.attn, "relative_position_bias_table", None) is not None for b in self.blocks):
                raise ValueError("drop_masked needs pos_embed 'shared_rpb' or 'ape' (per-layer 'rpb' is not supported)")
            if rel_pos_bias is not None:
                # (H, T, T) -> (B, H, T', T'): rows and columns of the kept tokens
                H = rel_pos_bias.shape[-3]
                b = rel_pos_bias.expand(B, -1, -1, -1)
                rows = idx[:, None, :, None].expand(-1, H, -1, b.shape[-1])
                b = torch.gather(b, 2, rows)
                cols = idx[:, None, None, :].expand(-1, H, idx.shape[1], -1)
                rel_pos_bias = torch.gather(b, 3, cols)  # (B, H, 1+Nv, 1+Nv)
        else:
            if mask is not None:
                w = mask.unsqueeze(-1).to(x.dtype)
                x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1+N, C)
            if pos_embed is not None:
                x = x + pos_embed
        x = self.pos_drop(x)
        if rel_pos_bias is not None and x.device.type == "cuda":
            rel_pos_bias = sdpa_ready_bias(rel_pos_bias)
        x = self._run_blocks(x, rel_pos_bias)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_tokens(x, mask)

    def timm_model_args(self) -> dict:
        """Keyword arguments for ``timm.create_model('beit_base_patch16_224', **args)`` that
        rebuild this network (without the mask token) from its exported weights."""
        return dict(self._timm_args)


def sdpa_ready_bias(bias: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """The attention bias (..., T, T) as the fused CUDA kernels want it, made once per forward
    instead of once per block.

    * In the autocast dtype when autocast is on: SDPA's autocast would cast it in every block.
    * Row stride a multiple of ``multiple`` elements: the memory-efficient kernel (the one that
      takes an additive bias and returns its gradient) otherwise pads a copy of the bias in
      every block, and that copy -- expanded to (B, H, T, T) -- is kept for the backward pass.
      Here the bias is padded once and sliced back to (..., T, T), so the blocks get a view
      with aligned strides.
    """
    if torch.is_autocast_enabled(bias.device.type):
        bias = bias.to(torch.get_autocast_dtype(bias.device.type))
    T = bias.shape[-1]
    pad = (-T) % multiple
    if pad == 0 and bias.stride(-2) % multiple == 0:
        return bias
    return torch.nn.functional.pad(bias, (0, pad))[..., :T]


def visible_index(mask: torch.Tensor, num_visible: Optional[int] = None) -> torch.Tensor:
    """(B, N) bool mask -> (B, N_visible) sorted indices of the unmasked patches.

    Every row must mask the same number of patches (``mask_ratio`` masks an exact count).
    ``num_visible``: that count when the caller knows it; given, the mask is not read back to
    the host (no device sync) and not checked."""
    if num_visible is not None:
        order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
        return order[:, :int(num_visible)]
    counts = (~mask).sum(dim=1)
    n_vis = int(counts[0])
    if not torch.equal(counts, counts.new_full(counts.shape, n_vis)):
        raise ValueError("drop_masked needs the same number of masked patches in every image")
    # stable sort puts visible (False=0) first, each group in index order
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, :n_vis]


def create_student(
    arch: str = "vit_base",
    *,
    img_size: int | Tuple[int, int] = 224,
    patch_size: int = 16,
    pos_embed: str = "shared_rpb",
    drop_path_rate: float = 0.1,
    init_values: Optional[float] = 0.1,
    embed_dim: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    grad_checkpointing: bool = False,
    init: str = "official",
) -> FDStudent:
    """Build a randomly initialised FD student.

    ``arch`` is one of :data:`STUDENT_SIZES` (``vit_tiny`` ... ``vit_huge``); ``embed_dim``,
    ``depth`` and ``num_heads`` override its widths (tiny test models). Defaults follow the
    official FD configs: shared relative position bias, layer scale 0.1, qkv bias, LN eps 1e-6,
    the official initialisation (``init="official"``, :meth:`FDStudent.official_init_`;
    ``"timm"`` keeps timm's Beit initialisation).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if arch not in STUDENT_SIZES:
        raise ValueError(f"unknown student arch {arch!r}; expected one of {sorted(STUDENT_SIZES)}")
    d, L, h = STUDENT_SIZES[arch]
    d, L, h = embed_dim or d, depth or L, num_heads or h
    if d % h:
        raise ValueError(f"embed_dim {d} is not divisible by num_heads {h}")
    args = dict(
        img_size=img_size, patch_size=patch_size, embed_dim=d, depth=L, num_heads=h,
        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values, drop_path_rate=drop_path_rate,
    )
    model = FDStudent(pos_embed=pos_embed, **args)
    apply_student_speed_paths(model)  # fdistill.speed: CPU paths with the same values (off: FDISTILL_SPEED_PATHS=0)
    if init == "official":
        model.official_init_()
    model.set_grad_checkpointing(grad_checkpointing)
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()}
    model._timm_args = dict(args, num_classes=0, global_pool="token", **_pos_embed_flags(pos_embed))
    model.arch = arch
    return model
