"""``Backbone``: any model fdistill can load, behind one interface, whatever library it comes from.

A backbone wraps a network (a timm, open_clip, Hugging Face or user model, an FD student, an
exported student) and exposes what distillation, evaluation and diagnostics need: its width
``embed_dim``, its ``patch_size`` (stride of the output grid), its ``num_prefix_tokens``, its
input ``mean``/``std``, the token grid for a given image size, and the output token map:

* ``forward_tokens(images)`` -> :class:`TokenMap` (prefix and patch tokens split, with the grid);
* timm's contract: ``forward_features(images)`` -> (B, P+N, C), the final token map after the
  norm, and ``forward_head(features, pre_logits=False)`` -> (B, C), the pooled feature (a
  backbone has no classifier, as a timm model with ``num_classes=0``). ``forward`` is
  ``forward_features``: a backbone's output is its token map.

A **teacher** is a use of a backbone: frozen. A backbone comes frozen, as loaded pre-trained
weights are: parameters never require grad, ``train()`` keeps it in eval mode (no dropout, no
drop path, BatchNorm uses its running statistics), and the distiller never hands it to an
optimizer. :meth:`Backbone.unfreeze` makes it an ordinary trainable network (fine-tuning, the
dense probes); the classifier over it is :class:`fdistill.eval.classifier.Classifier`.

This module imports nothing from the rest of the package but the error hierarchy and the image
normaliser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import TeacherError
from .images import normalize_images

__all__ = ["Backbone", "TokenMap", "Size2", "to_2tuple", "tokens_from_map", "pool_tokens", "GLOBAL_POOLS",
           "UNKNOWN_LICENSE"]

#: the licence when neither the library, a model card, nor the user says anything (a bare backbone
#: reports it; :func:`fdistill.teachers.provenance.make_provenance` fills in the real one)
UNKNOWN_LICENSE = "unknown"
#: timm's names for pooling a token map: mean of the patch tokens, or the first prefix token
GLOBAL_POOLS = ("avg", "token")

Size2 = Tuple[int, int]


def to_2tuple(x) -> Size2:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


@dataclass
class TokenMap:
    """A backbone's output token map.

    prefix: (B, P, C) prefix tokens ([CLS], distillation, register tokens), or None (P = 0).
    patches: (B, N, C) patch tokens in row-major grid order, N = grid[0] * grid[1].
    grid: (H, W) token grid of ``patches``.
    """

    prefix: Optional[torch.Tensor]
    patches: torch.Tensor
    grid: Size2

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    def full(self) -> torch.Tensor:
        """(B, P+N, C) with prefix tokens first."""
        return self.patches if self.prefix is None else torch.cat((self.prefix, self.patches), dim=1)

    @classmethod
    def from_full(cls, x: torch.Tensor, num_prefix_tokens: int) -> "TokenMap":
        """(B, P+N, C) -> the split map (views, no copy). A flat sequence does not say its grid:
        it is (1, N), fit for pooling only."""
        P = int(num_prefix_tokens)
        return cls(x[:, :P] if P else None, x[:, P:], (1, x.shape[1] - P))


def pool_tokens(tokens: TokenMap, pool: str) -> torch.Tensor:
    """(B, D) features of a token map: ``cls`` (timm's ``token``) | ``avg`` | ``cls+avg`` (concatenated)."""
    if pool == "avg":
        return tokens.patches.mean(dim=1)
    if pool in ("cls", "token", "cls+avg"):
        if tokens.prefix is None:
            raise TeacherError("this model has no [CLS] / prefix token; use pool 'avg'")
        cls = tokens.prefix[:, 0]
        return cls if pool != "cls+avg" else torch.cat((cls, tokens.patches.mean(dim=1)), dim=1)
    raise ValueError(f"unknown pool {pool!r}; expected cls, avg, cls+avg or last<n>")




class Backbone(nn.Module):
    """Base class of every model adapter (see module docstring). Subclasses implement
    :meth:`_forward_tokens`. Built frozen; :meth:`unfreeze` to train it."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        embed_dim: int,
        patch_size: Optional[int],
        num_prefix_tokens: int,
        mean: Sequence[float],
        std: Sequence[float],
        img_size: int | Size2,
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = int(embed_dim)
        self.patch_size = None if patch_size is None else int(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.img_size = to_2tuple(img_size)
        #: whether the teacher accepts input sizes other than ``img_size``
        self.dynamic_img_size = bool(dynamic_img_size)
        self._grid_cache: Dict[Size2, Size2] = {}
        #: which weights this is and under which licence (see :func:`make_provenance`); the
        #: factories fill it in, a bare adapter says "unknown"
        self.provenance: Dict[str, Any] = {"spec": name, "weights": None, "license": UNKNOWN_LICENSE,
                                           "license_source": None}
        self.frozen = True
        self.freeze()

    # -- frozen (a teacher) or trainable (fine-tuning) -----------------------------------
    def freeze(self) -> "Backbone":
        """No gradients, eval mode, and ``train()`` is ignored from now on."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        super().train(False)
        return self

    def unfreeze(self) -> "Backbone":
        """Make the wrapped model trainable (fine-tuning, dense probes)."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> "Backbone":  # noqa: D401 - nn.Module API
        """A frozen backbone stays in eval mode whatever the caller asks."""
        return super().train(False if getattr(self, "frozen", True) else mode)

    # -- geometry -------------------------------------------------------------------------------
    def grid_size(self, img_size: int | Size2 | None = None) -> Size2:
        """(H, W) of the patch-token grid for an input of ``img_size`` (default: ``self.img_size``).

        Found once per size by running a single zero image through the network, so it is right
        for any architecture (ViT, Swin, CNN)."""
        size = to_2tuple(img_size if img_size is not None else self.img_size)
        if size not in self._grid_cache:
            p = next(self.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
            was_training = self.model.training
            self.model.eval()  # never touch BatchNorm statistics with the probe
            try:
                with torch.inference_mode():
                    out = self._forward_tokens(torch.zeros(1, 3, *size, device=device, dtype=dtype))
            finally:
                self.model.train(was_training)
            self._grid_cache[size] = tuple(out.grid)
        return self._grid_cache[size]

    def accepts_size(self, img_size: int | Size2) -> bool:
        return self.dynamic_img_size or to_2tuple(img_size) == self.img_size

    # -- forward --------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> normalised with the backbone's own mean/std."""
        return normalize_images(images, self.mean, self.std)

    def _forward_tokens(self, images: torch.Tensor) -> TokenMap:
        raise NotImplementedError

    def forward_tokens(self, images: torch.Tensor) -> TokenMap:
        """Token map of images normalised with ``self.mean``/``self.std``: (B, 3, H, W) ->
        :class:`TokenMap`. A frozen teacher runs without gradients, in eval mode."""
        if self.frozen:
            with torch.no_grad():
                return self._checked_forward(images)
        return self._checked_forward(images)

    def _checked_forward(self, images: torch.Tensor) -> TokenMap:
        if images.dim() != 4 or images.shape[1] != 3:
            raise TeacherError(f"{self.name}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        if not self.accepts_size(images.shape[-2:]):
            raise TeacherError(
                f"{self.name} takes {self.img_size[0]}x{self.img_size[1]} inputs only, got "
                f"{images.shape[-2]}x{images.shape[-1]}"
            )
        out = self._forward_tokens(images)
        n = out.grid[0] * out.grid[1]
        if out.patches.shape[1] != n:
            raise TeacherError(f"{self.name}: {out.patches.shape[1]} patch tokens do not fill a {out.grid} grid")
        return out

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm's contract: (B, 3, H, W) normalised images -> (B, P+N, C) final token map."""
        return self.forward_tokens(images).full()

    @property
    def global_pool(self) -> str:
        """timm's pooling of this backbone: ``token`` ([CLS]) where it has a prefix token, else ``avg``."""
        return "token" if self.num_prefix_tokens > 0 else "avg"

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's contract: (B, P+N, C) ``forward_features`` output -> (B, C) pooled feature
        (:attr:`global_pool`). A backbone has no classifier, so ``pre_logits`` changes nothing."""
        return pool_tokens(TokenMap.from_full(x, self.num_prefix_tokens), self.global_pool)  # (B, C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, P+N, C) full token map (``forward_features``)."""
        return self.forward_features(images)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, img_size={self.img_size}")


def tokens_from_map(feat: torch.Tensor, fmt: str = "NCHW") -> Tuple[torch.Tensor, Size2]:
    """A spatial feature map -> (B, H*W, C) tokens (row-major) and its (H, W) grid."""
    if feat.dim() != 4:
        raise TeacherError(f"expected a 4-d feature map, got {tuple(feat.shape)}")
    if fmt == "NHWC":
        B, H, W, C = feat.shape
        return feat.reshape(B, H * W, C), (H, W)
    if fmt == "NCHW":
        B, C, H, W = feat.shape
        return feat.flatten(2).transpose(1, 2), (H, W)
    raise ValueError(f"unknown feature map format {fmt!r}")
