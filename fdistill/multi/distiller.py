"""``MultiTeacherDistiller``: several frozen teachers distilled into one student at once.

FD (Wei et al. 2023) is the single-teacher case; AM-RADIO (Ranzinger et al. 2024), UNIC
(Sariyildiz et al. 2024) and Theia (Shang et al. 2024) distil several foundation models into one
backbone through one *head* (adaptor) per teacher. One step:

- every teacher sees the same augmented view, resized to its own input size, and gives its token
  map on the student's grid (:class:`fdistill.distiller.TeacherTargets`, FD's alignment);
- the student runs once; each head maps its tokens to one teacher's width
  (:class:`TeacherHead`: FD's per-token linear projector, or a 2-layer MLP as RADIO / UNIC);
- each teacher's target is normalised its own way (:mod:`fdistill.multi.normalize`: FD's
  per-token standardisation, per-channel ``stats``, RADIO's ``phi_s``), and its loss is FD's
  smooth-L1 (beta 2, [CLS] x ``cls_weight``) or cosine + smooth-L1, on the ``full`` map, the
  ``summary`` token or the ``spatial`` patches;
- the total is ``sum_t weight_t x loss_t`` (:mod:`fdistill.multi.balance`: optionally each loss
  divided by its initial value, and UNIC's per-sample teacher dropping);
- optionally a fraction of the steps shows the student another input size
  (:mod:`fdistill.multi.resolution`, RADIO v2.5's multi-resolution training).

With one teacher, ``standardize``, a linear head and smooth-L1 this is exactly
:class:`fdistill.FeatureDistiller` (loss and gradients; tested). The fitted normalisers live in
the heads (``state_dict`` of :attr:`projector`), so checkpoints and exports carry them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from ..distiller import TeacherTargets, normalize_with, register_input_stats, student_mask
from ..images import to_float_images
from ..losses import feature_distill_loss_parts
from ..models.masking import MASK_TYPES
from ..models.projector import TokenProjector
from ..teachers.base import Teacher
from .balance import InitialLossNormalizer, apply_teacher_dropping, check_weights
from .normalize import FeatureStats, build_target_norm
from .resolution import ResolutionSchedule

__all__ = ["TeacherSpec", "TeacherHead", "MultiStudentBranch", "MultiTeacherDistiller", "HEAD_KINDS",
           "TARGET_KINDS", "LOSS_KINDS"]

HEAD_KINDS = ("linear", "mlp")
TARGET_KINDS = ("full", "summary", "spatial")
LOSS_KINDS = ("smooth_l1", "cos_smooth_l1")
#: the normalisations the FD loss applies itself (per token, nothing to fit)
_LOSS_NORMS = ("standardize", "l2", "none")


@dataclass
class TeacherSpec:
    """One teacher of a :class:`MultiTeacherDistiller` and how the student learns it."""

    name: str
    teacher: Teacher
    weight: float = 1.0
    targets: str = "full"
    norm: str = "standardize"
    loss: str = "smooth_l1"
    head: str = "linear"
    cls_target: str = "auto"
    align: str = "auto"
    teacher_img_size: Optional[int] = None


class TeacherHead(nn.Module):
    """Student tokens (B, T, C_s) -> one teacher's normalised feature space (B, T, C_t), and that
    teacher's target normaliser (``norm``, with its fitted statistics as buffers).

    ``linear``: FD's per-token projector (:class:`~fdistill.models.projector.TokenProjector`);
    ``mlp``: Linear -> GELU -> Linear with hidden width ``max(C_s, C_t)`` (timm's ``Mlp``; the
    2-layer adaptor of RADIO / UNIC)."""

    def __init__(self, in_dim: int, out_dim: int, *, kind: str = "linear", norm: str = "standardize"):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {kind!r}")
        if kind == "linear":
            self.proj = TokenProjector(in_dim, out_dim)
        else:
            from timm.layers import Mlp

            self.proj = Mlp(in_dim, hidden_features=max(in_dim, out_dim), out_features=out_dim)
        self.kind, self.norm_kind = kind, norm
        self.norm = build_target_norm(norm, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)  # (B, T, C_t)


class MultiStudentBranch(nn.Module):
    """The trainable part: the student once, then every head; what DDP wraps."""

    def __init__(self, student: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.student = student
        self.heads = heads

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        tokens = self.student.forward_tokens(images, mask)  # (B, 1+N, C_s)
        return {name: head(tokens) for name, head in self.heads.items()}  # name -> (B, 1+N, C_t)


class MultiTeacherDistiller(nn.Module):
    """Distil every teacher of ``teachers`` (:class:`TeacherSpec`) into ``student``.

    Args:
        teachers: one :class:`TeacherSpec` per teacher (distinct names).
        student: as :class:`fdistill.FeatureDistiller`'s.
        beta, cls_weight: FD's smooth-L1 beta and [CLS] weight, for every teacher.
        mask_ratio, mask_type: student input masking (the teachers see the whole image).
        teacher_dropping: UNIC's per-sample teacher dropping (:func:`~fdistill.multi.balance.apply_teacher_dropping`).
        normalize_initial_steps: divide each teacher's loss by its mean over this many first
            steps (:class:`~fdistill.multi.balance.InitialLossNormalizer`; 0 = off).
        resolutions, resolution_fraction, seed: multi-resolution training
            (:class:`~fdistill.multi.resolution.ResolutionSchedule`): this fraction of the training
            steps runs the student at one of ``resolutions`` (pixels) instead of its own size.
    """

    def __init__(self, teachers: Sequence[TeacherSpec], student: nn.Module, *, beta: float = 2.0,
                 cls_weight: float = 10.0, mask_ratio: float = 0.0, mask_type: str = "random",
                 teacher_dropping: bool = False, normalize_initial_steps: int = 0,
                 resolutions: Sequence[int] = (), resolution_fraction: float = 0.0, seed: int = 0):
        super().__init__()
        if not teachers:
            raise ValueError("MultiTeacherDistiller needs at least one teacher")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"teacher names must be distinct and non-empty, got {names}")
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        for t in teachers:
            if t.targets not in TARGET_KINDS:
                raise ValueError(f"teacher {t.name}: targets must be one of {TARGET_KINDS}, got {t.targets!r}")
            if t.loss not in LOSS_KINDS:
                raise ValueError(f"teacher {t.name}: loss must be one of {LOSS_KINDS}, got {t.loss!r}")
        self.specs = list(teachers)
        self.names: List[str] = names
        self._spec = {t.name: t for t in teachers}
        grid = tuple(student.grid_size)
        self.student_grid = grid
        self.targets = nn.ModuleDict({
            t.name: TeacherTargets(t.teacher, student_grid=grid, student_img_size=student.img_size,
                                   cls_target=t.cls_target, granularity="cls" if t.targets == "summary" else "full",
                                   align=t.align, teacher_img_size=t.teacher_img_size) for t in teachers})
        heads = nn.ModuleDict({t.name: TeacherHead(student.embed_dim, t.teacher.embed_dim, kind=t.head, norm=t.norm)
                               for t in teachers})
        self.branch = MultiStudentBranch(student, heads)
        weights = torch.tensor([float(t.weight) for t in teachers], dtype=torch.float32)
        check_weights(weights)
        self.register_buffer("weights", weights, persistent=False)
        self.beta, self.cls_weight = float(beta), float(cls_weight)
        self.mask_ratio, self.mask_type = float(mask_ratio), mask_type
        self.teacher_dropping = bool(teacher_dropping)
        self.balance = InitialLossNormalizer(len(teachers), warmup_steps=max(1, normalize_initial_steps)) \
            if normalize_initial_steps > 0 else None
        self._balance_warm = False  # re-read from the buffers after a resume on the first step
        self.resolution = None
        if resolution_fraction > 0:
            img = tuple(student.img_size)
            if img[0] != img[1]:
                raise ValueError(f"multi-resolution training needs a square student input, got {img}")
            if not hasattr(student, "input_grid"):
                raise ValueError("multi-resolution training needs the FD ViT student (it resizes its position bias)")
            for size in resolutions:  # the student refuses sizes it cannot take, here rather than mid-run
                student.input_grid((int(size), int(size)))
            self.resolution = ResolutionSchedule(img[0], resolutions, resolution_fraction, seed=seed)
        register_input_stats(self, "student", student.mean, student.std)

    # -- parts ------------------------------------------------------------------------------------
    def _branch(self) -> MultiStudentBranch:
        return self.branch.module if hasattr(self.branch, "module") else self.branch  # DDP-wrapped or not

    @property
    def student(self) -> nn.Module:
        return self._branch().student

    @property
    def projector(self) -> nn.ModuleDict:
        """Every teacher's head (with its normaliser): the checkpoint's ``projector`` part."""
        return self._branch().heads

    @property
    def teacher(self) -> Teacher:
        """The first teacher (what single-teacher tools that ask for one see)."""
        return self.targets[self.names[0]].teacher

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.branch.parameters() if p.requires_grad)

    def checkpoint_parts(self) -> Dict[str, nn.Module]:
        """The modules a checkpoint stores (``model.<part>``)."""
        parts = {"student": self.student, "projector": self.projector}
        if self.balance is not None:
            parts["balance"] = self.balance
        if self.resolution is not None:
            parts["resolution"] = self.resolution
        return parts

    def describe_alignment(self) -> str:
        return "; ".join(f"{n}: {self.targets[n].describe_alignment()}" for n in self.names)

    # -- target statistics --------------------------------------------------------------------------
    def norms_to_fit(self) -> List[str]:
        """Names of the teachers whose normaliser still needs statistics."""
        return [n for n in self.names if self.projector[n].norm.needs_fit and not bool(self.projector[n].norm.fitted)]

    @torch.no_grad()
    def fit_target_norms(self, batches: Iterable[torch.Tensor], *, max_images: int, env=None) -> Dict[str, int]:
        """Fit the ``stats`` / ``phi_s`` normalisers on the teachers' tokens of ``max_images``
        images from ``batches`` (uint8 or [0, 1] (B, 3, H, W)), every token a sample; under DDP
        the statistics of all ranks are summed first, so every rank fits the same. Returns
        ``{teacher: tokens seen}``."""
        names = self.norms_to_fit()
        if not names:
            return {}
        stats = {n: FeatureStats(self.targets[n].teacher.embed_dim) for n in names}
        seen = 0
        for images in batches:
            if images.dtype == torch.uint8:
                images = to_float_images(images)
            for n in names:
                tokens = self.targets[n](images)  # (B, P+N, C)
                stats[n].update(self._target_tokens(n, tokens).float())
            seen += images.shape[0]
            if seen >= max_images:
                break
        out = {}
        for n in names:
            if env is not None and env.distributed:
                stats[n].all_reduce_(env)
            self.projector[n].norm.fit(stats[n])
            out[n] = int(stats[n].count)
        return out

    def _target_tokens(self, name: str, target: torch.Tensor) -> torch.Tensor:
        """The part of the (B, P+N, C) target map this teacher's loss uses."""
        spec, P = self._spec[name], self.targets[name].num_prefix_tokens
        if spec.targets == "summary":
            return target[:, :P]
        if spec.targets == "spatial":
            return target[:, P:]
        return target

    # -- the step -----------------------------------------------------------------------------------
    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_with(self, "student", images)

    def _teacher_loss(self, name: str, pred: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """FD's loss of one teacher: ``pred`` (B, 1+N, C) from its head, ``target`` (B, P+N, C) raw."""
        spec, P = self._spec[name], self.targets[name].num_prefix_tokens
        if P == 0:
            pred = pred[:, 1:]
        norm = spec.norm if spec.norm in _LOSS_NORMS else "none"
        if norm == "none" and spec.norm != "none":  # a fitted normaliser (stats / phi_s)
            target = self.projector[name].norm(target.float())
        granularity = "full"
        if spec.targets == "summary":
            granularity = "cls"
        elif spec.targets == "spatial":
            pred, target, P = pred[:, P:], target[:, P:], 0
        return feature_distill_loss_parts(pred, target, beta=self.beta, norm=norm, cls_weight=self.cls_weight,
                                          num_prefix_tokens=P, granularity=granularity, per_sample=True,
                                          cosine_weight=1.0 if spec.loss == "cos_smooth_l1" else 0.0)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One step's forward: (B, 3, H, W) pixels -> ``loss`` (the balanced total) and, per
        teacher ``t``, ``loss_t`` (its unweighted loss)."""
        if images.dtype == torch.uint8:
            images = to_float_images(images)
        B = images.shape[0]
        student_images, grid = images, self.student_grid
        if self.resolution is not None and self.training:
            size = self.resolution.next_size()
            if size != tuple(images.shape[-2:]):
                # the same view at this step's size; the teachers keep theirs (module doc)
                student_images = torch.nn.functional.interpolate(images, size=size, mode="bicubic",
                                                                 align_corners=False, antialias=True)
                grid = self.student.input_grid(size)
            out_size = size
        mask = student_mask(self.mask_type, B, grid, self.mask_ratio, images.device)
        targets = {n: self.targets[n](images, grid=grid) for n in self.names}  # n -> (B, P+N, C_n)
        preds = self.branch(self._normalize(student_images), mask)  # n -> (B, 1+N, C_n)
        parts = {n: self._teacher_loss(n, preds[n], targets[n]) for n in self.names}
        losses = torch.stack([parts[n]["loss"] for n in self.names])  # (T,)
        out: Dict[str, torch.Tensor] = {}
        scale = torch.ones_like(losses)
        if self.balance is not None:
            if self.training and not self._balance_warm:  # host-side flag: no sync once warm
                observed = losses.detach().clone()  # (T,)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # every rank records the same (global mean) initial losses, as one process would
                    torch.distributed.all_reduce(observed)
                    observed /= torch.distributed.get_world_size()
                self.balance.update(observed)
                self._balance_warm = self.balance.warm
            scale = self.balance(torch.ones_like(losses))  # 1 / initial loss per teacher
        w = self.weights.to(losses.device) * scale
        if self.teacher_dropping and self.training:
            per_sample = torch.stack([parts[n]["loss_per_sample"] for n in self.names], dim=1)  # (B, T)
            total, keep = apply_teacher_dropping(per_sample, w)
            out["kept_fraction"] = keep.float().mean().detach()
        elif len(self.names) == 1 and float(w[0]) == 1.0:
            total = losses[0]  # exactly FD's loss (no multiply: the same graph, the same gradients)
        else:
            total = (w * losses).sum()
        out["loss"] = total
        for n in self.names:
            out[f"loss_{n}"] = parts[n]["loss"].detach()
        if mask is not None:
            out["mask_fraction"] = mask.float().mean().detach()
        if self.resolution is not None and self.training:
            out["resolution_px"] = images.new_tensor(float(out_size[0]))  # its mean over a log interval
        return out

