"""Any timm backbone with a token map as an FD student (``student.arch: timm:<model>``).

The paper also distils into a Swin student (EsViT Swin-B -> Swin-B, Table 1; official config
``fd_pretrain__esvit_swin_base__img224__300ep.yaml``, a SwinV2-B with window 14). Such
networks have no [CLS] token, so :meth:`TimmStudent.forward_tokens` puts the global average
of the final map first (what Swin classifies from) and keeps the (B, 1+N, C) layout of the
ViT student: with a prefix-free teacher the distiller leaves that token out of the loss
(``cls_target: auto``), or trains it on the teacher's average token (``cls_target: gap``).
Input masking needs a mask token and is refused.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..teachers.base import tokens_from_map


class TimmStudent(nn.Module):
    """A timm model whose ``forward_features`` gives a token map (NHWC, NCHW or NLC)."""

    def __init__(self, model: nn.Module, *, name: str):
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = int(model.num_features)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self._fmt = getattr(model, "output_fmt", "NCHW")
        size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg.get("input_size", (3, 224, 224))[-2:]
        self._img_size = (int(size[0]), int(size[1]))
        self._grid = self._probe_grid()

    def _probe_grid(self) -> Tuple[int, int]:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                _, grid = self._tokens(torch.zeros(1, 3, *self._img_size))
        finally:
            self.model.train(was)
        return grid

    @property
    def grid_size(self) -> Tuple[int, int]:
        return self._grid

    @property
    def img_size(self) -> Tuple[int, int]:
        return self._img_size

    @property
    def patch_size(self) -> int:
        return self._img_size[0] // self._grid[0]

    def _tokens(self, x: torch.Tensor):
        f = self.model.forward_features(x)
        if f.dim() == 4:
            return tokens_from_map(f, self._fmt if self._fmt in ("NHWC", "NCHW") else "NCHW")
        if f.dim() == 3:  # NLC without prefix tokens
            n = f.shape[1]
            side = int(round(n ** 0.5))
            return f, (side, n // side)
        raise ValueError(f"{self.name}: forward_features gave {tuple(f.shape)}; expected a token map")

    def forward_tokens(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       drop_masked: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1+N, C): the map's average, then its tokens."""
        if mask is not None:
            raise ValueError(f"{self.name} has no mask token: input masking needs the FD ViT student")
        tokens, _ = self._tokens(x)  # (B, N, C)
        return torch.cat((tokens.mean(dim=1, keepdim=True), tokens), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)

    @torch.jit.ignore
    def no_weight_decay(self):
        inner = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in inner}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)
        elif enable:
            raise ValueError(f"{self.name} does not support activation checkpointing")

    def timm_model(self) -> nn.Module:
        """The wrapped timm model (what an export saves)."""
        return self.model


def create_timm_student(name: str, *, img_size: Optional[int] = None, drop_path_rate: float = 0.0,
                        grad_checkpointing: bool = False, **model_kwargs) -> TimmStudent:
    """A randomly initialised timm backbone as an FD student, e.g.
    ``create_timm_student("swinv2_base_window16_256", img_size=224, window_size=14, drop_path_rate=0.3)``."""
    import timm

    kw = dict(model_kwargs)
    if img_size is not None:
        kw["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"timm has no model named {name!r} (see timm.list_models())") from e
        raise
    student = TimmStudent(model, name=f"timm:{name}")
    if grad_checkpointing:
        student.set_grad_checkpointing(True)
    student.arch = f"timm:{name}"
    return student
