"""``FeatureDistiller``: a frozen teacher, a student and a projector, and the FD loss.

One training step (paper Fig. 2): both networks see the same augmented view; the teacher's
full output token map is the target; the student's tokens go through the per-token projector;
the loss is smooth-L1 against the standardised target, [CLS] weighted (losses/feature_distill.py).

Images enter as pixels in [0, 1] (or uint8); each network normalises them with its own mean/std,
so CLIP's statistics reach the CLIP teacher while the student keeps ImageNet's.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import GRANULARITIES, NORMS, feature_distill_loss_parts
from .models.masking import MASK_TYPES, make_mask, num_masked
from .images import normalize_images, to_float_images  # (normalize_images re-exported here)
from .models.projector import TokenProjector
from .models.student import visible_index
from .teachers.base import Teacher, TeacherError, to_2tuple

ALIGN_MODES = ("auto", "resize", "interpolate", "none")
CLS_TARGETS = ("auto", "teacher", "gap", "none")


def register_input_stats(module: nn.Module, who: str, mean, std) -> None:
    """Give ``module`` the non-persistent (1, 3, 1, 1) buffers ``_{who}_mean`` / ``_{who}_std``:
    they move with the module, so normalising makes no host-to-device copy (no sync) per step."""
    module.register_buffer(f"_{who}_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                           persistent=False)
    module.register_buffer(f"_{who}_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                           persistent=False)


def normalize_with(module: nn.Module, who: str, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ``(x - mean) / std`` with ``module``'s ``who`` buffers
    (:func:`register_input_stats`), in the images' dtype; the values of :func:`normalize_images`."""
    return normalize_images(images, getattr(module, f"_{who}_mean"), getattr(module, f"_{who}_std"))


def student_mask(mask_type: str, batch: int, grid: Tuple[int, int], ratio: float, device) -> Optional[torch.Tensor]:
    """The student's input mask of one step (None without masking)."""
    if ratio <= 0:
        return None
    if mask_type == "block" and torch.device(device).type == "cuda":
        # block masks are drawn by a Python loop on the host; a plain .to(cuda) of pageable
        # memory would block until the GPU's queue drains: pinned + non_blocking does not
        m = make_mask("block", batch, grid, ratio)
        return m.pin_memory().to(device, non_blocking=True)
    return make_mask(mask_type, batch, grid, ratio, device=device)


class StudentBranch(nn.Module):
    """The trainable part: student + projector. This (not the teacher) is what DDP wraps."""

    def __init__(self, student: nn.Module, projector: nn.Module):
        super().__init__()
        self.student = student
        self.projector = projector

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                drop_masked: bool = False, num_visible: Optional[int] = None) -> torch.Tensor:
        if drop_masked:  # num_visible (known on the host) spares the student a device sync
            kw = {} if num_visible is None else {"num_visible": num_visible}
            tokens = self.student.forward_tokens(images, mask, drop_masked, **kw)
        else:
            tokens = self.student.forward_tokens(images, mask)  # (B, 1+N, Cs)
        return self.projector(tokens)  # (B, 1+N, Ct)


def resample_patch_grid(patches: torch.Tensor, grid, new_grid, *, antialias: bool = False) -> torch.Tensor:
    """(B, N, C) patch tokens on ``grid`` -> (B, N', C) on ``new_grid`` (bilinear, float32)."""
    B, _, C = patches.shape
    fmap = patches.transpose(1, 2).reshape(B, C, *grid).float()  # (B, C, H, W)
    fmap = F.interpolate(fmap, size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=antialias)
    return fmap.flatten(2).transpose(1, 2)  # (B, N', C)


class TeacherTargets(nn.Module):
    """The teacher side of one FD step: a frozen teacher, how its grid is matched to the
    student's, and its raw token map on the student grid (:meth:`forward`).

    :class:`FeatureDistiller` holds one; :class:`fdistill.multi.MultiTeacherDistiller` one per
    teacher (every teacher then sees the same augmented view, resized to its own input size).

    Args:
        teacher: a :class:`~fdistill.teachers.Teacher` (frozen here).
        student_grid, student_img_size: the student's token grid and input size.
        cls_target: ``auto`` | ``teacher`` | ``gap`` | ``none`` (see :class:`FeatureDistiller`).
        granularity: only checked (``cls`` needs a [CLS] target).
        mask_teacher: hide the masked patches from the teacher too.
        align, teacher_img_size: see :class:`FeatureDistiller`.
    """

    #: run the teacher under ``torch.inference_mode`` (else ``torch.no_grad``)
    teacher_inference_mode: bool = True

    def __init__(self, teacher: Teacher, *, student_grid: Tuple[int, int], student_img_size,
                 cls_target: str = "auto", granularity: str = "full", mask_teacher: bool = False,
                 align: str = "auto", teacher_img_size: Optional[int | Tuple[int, int]] = None):
        super().__init__()
        if cls_target not in CLS_TARGETS:
            raise ValueError(f"cls_target must be one of {CLS_TARGETS}, got {cls_target!r}")
        if align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
        if not isinstance(teacher, Teacher):
            raise TypeError("teacher must be a fdistill Teacher (use fdistill.create_teacher)")
        self.teacher = teacher.freeze()
        self.mask_teacher = bool(mask_teacher)
        P_t = teacher.num_prefix_tokens
        if cls_target == "auto":
            cls_target = "teacher" if P_t > 0 else "none"
        if cls_target == "teacher" and P_t == 0:
            raise TeacherError(
                f"{teacher.name} has no prefix token to be the [CLS] target; use cls_target='gap' or 'none'")
        if granularity == "cls" and cls_target == "none":
            raise ValueError("granularity='cls' needs a [CLS] target: the teacher has no prefix token; set cls_target='gap'")
        self.cls_target = cls_target
        self.student_grid = tuple(student_grid)
        self._student_img_size = to_2tuple(student_img_size)
        self.align, self.teacher_img_size = self._plan_alignment(align, teacher_img_size)
        register_input_stats(self, "teacher", teacher.mean, teacher.std)

    @property
    def num_prefix_tokens(self) -> int:
        """P of the target map: 1 when the student's [CLS] has a target, else 0."""
        return 0 if self.cls_target == "none" else 1

    def _plan_alignment(self, align: str, teacher_img_size) -> Tuple[str, Tuple[int, int]]:
        t, sg = self.teacher, self.student_grid
        s_img = self._student_img_size
        if teacher_img_size is not None:
            size = to_2tuple(teacher_img_size)
            if not t.accepts_size(size):
                raise TeacherError(f"{t.name} cannot take teacher_img_size={size}; it takes {t.img_size} only")
        else:
            size = s_img if t.accepts_size(s_img) else t.img_size
        grid = t.grid_size(size)
        if grid == sg:
            return "none", size
        if align in ("auto", "resize") and t.dynamic_img_size and t.patch_size and teacher_img_size is None:
            cand = (sg[0] * t.patch_size, sg[1] * t.patch_size)
            if t.grid_size(cand) == sg:
                return "resize", cand
        if align == "resize":
            raise TeacherError(
                f"cannot align grids by resizing: teacher {t.name} gives a {grid[0]}x{grid[1]} grid at {size}, "
                f"student needs {sg[0]}x{sg[1]}, and the teacher "
                + ("has a fixed input size" if not t.dynamic_img_size else f"cannot reach it with patch size {t.patch_size}")
                + "; use align=interpolate or change the student's img_size/patch_size")
        if align in ("auto", "interpolate"):
            return "interpolate", size
        raise TeacherError(
            f"teacher grid {grid} (input {size}) differs from the student grid {sg} and align='none'; "
            "use align=resize or align=interpolate")

    def describe_alignment(self) -> str:
        t = self.teacher
        g = t.grid_size(self.teacher_img_size)
        how = {"none": "grids match", "resize": "teacher input resized",
               "interpolate": "teacher patch map interpolated"}[self.align]
        return (f"student {self.student_grid[0]}x{self.student_grid[1]} tokens; teacher input "
                f"{self.teacher_img_size[0]}x{self.teacher_img_size[1]} -> {g[0]}x{g[1]} tokens ({how})")

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_with(self, "teacher", images)

    def _run_teacher(self, x: torch.Tensor, dtype: torch.dtype):
        """The teacher's forward, without autograd (inference mode unless ``teacher_inference_mode``
        is off); outside autocast when its weights are already bf16/fp16. Plain ``with`` blocks:
        torch.compile traces them (it cannot trace an ExitStack holding an autocast context).
        Inside a compiled graph ``no_grad``: autograd's per-op bookkeeping, which inference mode
        saves, is gone there anyway, and dynamo mishandles inference tensors (torch 2.14: "Cannot
        set version_counter for inference tensor")."""
        t = self.teacher
        low = dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type)
        if self.teacher_inference_mode and not torch.compiler.is_compiling():
            with torch.inference_mode():
                if low:
                    with torch.autocast(x.device.type, enabled=False):
                        return t.forward_tokens(x)
                return t.forward_tokens(x)
        with torch.no_grad():
            if low:
                with torch.autocast(x.device.type, enabled=False):
                    return t.forward_tokens(x)
            return t.forward_tokens(x)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> (B, P+N, C_t) raw teacher tokens on the student grid,
        P = :attr:`num_prefix_tokens`. ``grid``: the student's grid of this step when it runs at
        another input size (multi-resolution training): the teacher's map is resampled to it."""
        grid = self.student_grid if grid is None else tuple(grid)
        t = self.teacher
        p = next(t.parameters(), None)
        tdtype = p.dtype if p is not None and p.is_floating_point() else images.dtype
        x = self._normalize(images.to(tdtype))
        if mask is not None and self.mask_teacher:
            x = x * (1.0 - self._pixel_mask(mask, x))  # masked patches -> the mean colour
        if tuple(x.shape[-2:]) != self.teacher_img_size:
            x = F.interpolate(x, size=self.teacher_img_size, mode="bicubic", align_corners=False, antialias=True)
        out = self._run_teacher(x, tdtype)
        patches = out.patches  # (B, Nt, C)
        if tuple(out.grid) != grid:
            if self.align != "interpolate" and grid == self.student_grid:
                raise TeacherError(f"teacher grid {out.grid} != student grid {self.student_grid}")
            patches = resample_patch_grid(patches, out.grid, grid).to(out.patches.dtype)
        if self.cls_target == "teacher":
            return torch.cat((out.prefix[:, :1], patches), dim=1)
        if self.cls_target == "gap":
            return torch.cat((patches.mean(dim=1, keepdim=True), patches), dim=1)
        # an inference-mode tensor cannot be saved for backward by the caller's loss: copy it out
        return patches.clone() if patches.is_inference() else patches

    def _pixel_mask(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B = mask.shape[0]
        m = mask.view(B, 1, *self.student_grid).to(x.dtype)
        return F.interpolate(m, size=x.shape[-2:], mode="nearest")


class FeatureDistiller(nn.Module):
    """Feature distillation of ``teacher`` into ``student``.

    Args:
        teacher: a frozen :class:`~fdistill.teachers.Teacher` (see ``create_teacher``).
        student: a network with ``forward_tokens(images, mask=None)`` -> (B, 1+N, C), attributes
            ``embed_dim``, ``grid_size``, ``img_size``, ``mean``, ``std`` (``create_student``).
        norm: target normalisation: ``standardize`` (paper) | ``l2`` | ``none``.
        beta: smooth-L1 beta (paper 2.0).
        cls_weight: prefix-token weight in the token-weighted mean (paper 10; official code 1).
        granularity: ``full`` | ``gap`` | ``cls`` (paper Table 4).
        cls_target: what the student's [CLS] learns: ``auto`` (the teacher's first prefix token
            if it has one, else nothing), ``teacher``, ``gap`` (the teacher's average patch token),
            ``none`` (the [CLS] is left out of the loss).
        mask_ratio, mask_type: student input masking (paper Table 5), ``random`` | ``block``.
        mask_teacher: also hide the masked patches from the teacher (set to the mean colour).
        drop_masked: drop masked patches from the student's encoder (MAE-style) instead of
            replacing them by the mask token; the loss then covers [CLS] + visible patches.
        align: how a teacher grid that differs from the student's is matched: ``resize`` the
            teacher's input so the grids agree, ``interpolate`` the teacher's patch map,
            ``auto`` (resize when the teacher takes other sizes, else interpolate), ``none``.
        teacher_img_size: explicit teacher input size (overrides the automatic choice).

    Speed (no effect on the values): the teacher runs under ``torch.inference_mode`` (set
    ``teacher_inference_mode = False`` for plain ``no_grad``), and a teacher whose weights are
    already bf16/fp16 runs outside autocast, in its own dtype (autocast would only add casts,
    e.g. of every LayerNorm to fp32 and back). The mean/std tensors live on the device as
    buffers, so normalising makes no host-to-device copy (and no sync) per step.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        *,
        norm: str = "standardize",
        beta: float = 2.0,
        cls_weight: float = 10.0,
        granularity: str = "full",
        cls_target: str = "auto",
        mask_ratio: float = 0.0,
        mask_type: str = "random",
        mask_teacher: bool = False,
        drop_masked: bool = False,
        align: str = "auto",
        teacher_img_size: Optional[int | Tuple[int, int]] = None,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if drop_masked and mask_ratio <= 0:
            raise ValueError("drop_masked needs mask_ratio > 0")
        if mask_teacher and mask_ratio <= 0:
            raise ValueError("mask_teacher needs mask_ratio > 0")
        self.targets = TeacherTargets(teacher, student_grid=tuple(student.grid_size), student_img_size=student.img_size,
                                      cls_target=cls_target, granularity=granularity, mask_teacher=mask_teacher,
                                      align=align, teacher_img_size=teacher_img_size)
        self.branch = StudentBranch(student, TokenProjector(student.embed_dim, teacher.embed_dim))
        self.norm, self.beta, self.cls_weight, self.granularity = norm, float(beta), float(cls_weight), granularity
        self.mask_ratio, self.mask_type = float(mask_ratio), mask_type
        self.mask_teacher, self.drop_masked = bool(mask_teacher), bool(drop_masked)
        self.student_grid = tuple(student.grid_size)
        register_input_stats(self, "student", student.mean, student.std)

    # -- set-up -----------------------------------------------------------------------------------
    @property
    def teacher(self) -> Teacher:
        return self.targets.teacher

    @property
    def cls_target(self) -> str:
        return self.targets.cls_target

    @property
    def align(self) -> str:
        return self.targets.align

    @property
    def teacher_img_size(self) -> Tuple[int, int]:
        return self.targets.teacher_img_size

    @property
    def teacher_inference_mode(self) -> bool:
        """Run the teacher under ``torch.inference_mode`` (else ``torch.no_grad``)."""
        return self.targets.teacher_inference_mode

    @teacher_inference_mode.setter
    def teacher_inference_mode(self, value: bool) -> None:
        self.targets.teacher_inference_mode = bool(value)

    def describe_alignment(self) -> str:
        return self.targets.describe_alignment()

    @property
    def student(self) -> nn.Module:
        b = self.branch.module if hasattr(self.branch, "module") else self.branch  # DDP-wrapped or not
        return b.student

    @property
    def projector(self) -> nn.Module:
        b = self.branch.module if hasattr(self.branch, "module") else self.branch
        return b.projector

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student + projector parameters (never the teacher's)."""
        return (p for p in self.branch.parameters() if p.requires_grad)

    # -- the step -------------------------------------------------------------------------------
    def make_mask(self, batch: int, device) -> Optional[torch.Tensor]:
        return student_mask(self.mask_type, batch, self.student_grid, self.mask_ratio, device)

    def _normalize(self, images: torch.Tensor, who: str = "student") -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> ``(x - mean) / std`` of the student (the teacher's is
        :class:`TeacherTargets`'), in the images' dtype; the values of :func:`normalize_images`."""
        return self.targets._normalize(images) if who == "teacher" else normalize_with(self, "student", images)

    def checkpoint_parts(self) -> Dict[str, nn.Module]:
        """The modules a checkpoint stores (``model.<part>``): the student and the projector."""
        return {"student": self.student, "projector": self.projector}

    def teacher_targets(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> (B, P+N, C_t) raw teacher tokens on the student grid,
        P = 1 when the student's [CLS] has a target, else 0 (:class:`TeacherTargets`)."""
        return self.targets(images, mask)

    def student_tokens(self, images: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[int]]:
        """(B, 3, H, W) pixels -> the branch's output (B, 1+N(v), C) and, with ``drop_masked``,
        the number of visible patches."""
        xs = self._normalize(images, "student")
        if self.drop_masked:  # every mask hides exactly num_masked patches: known without a sync
            n = self.student_grid[0] * self.student_grid[1]
            n_vis = n - num_masked(n, self.mask_ratio)
            return self.branch(xs, mask, True, n_vis), n_vis
        return self.branch(xs, mask), None

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One FD step's forward: (B, 3, H, W) pixels in [0, 1] (or uint8) -> ``loss`` and parts."""
        if images.dtype == torch.uint8:
            images = to_float_images(images)
        B = images.shape[0]
        mask = self.make_mask(B, images.device)
        target = self.teacher_targets(images, mask)  # (B, P+N, Ct)
        pred, n_vis = self.student_tokens(images, mask)
        P = self.targets.num_prefix_tokens
        if P == 0:
            pred = pred[:, 1:]
        if self.drop_masked:
            keep = visible_index(mask, n_vis)  # (B, Nv): the student computed only these patches
            C = target.shape[-1]
            tp = torch.gather(target[:, P:], 1, keep.unsqueeze(-1).expand(-1, -1, C))
            target = torch.cat((target[:, :P], tp), dim=1)
        parts = feature_distill_loss_parts(
            pred, target, beta=self.beta, norm=self.norm, cls_weight=self.cls_weight,
            num_prefix_tokens=P, granularity=self.granularity,
        )
        if mask is not None:
            parts["mask_fraction"] = mask.float().mean().detach()
        return parts
