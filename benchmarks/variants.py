"""The two ways of running one FD step that the benchmark compares.

* ``fast`` -- what ``fdistill distill`` runs: :class:`~fdistill.engine.step.TrainStep` over a
  :class:`~fdistill.FeatureDistiller`; attention through ``scaled_dot_product_attention``
  (timm's default; on CPU the student's attention with its trainable bias takes the explicit
  path, faster there, and its blocks skip the samples drop path drops), autocast in the config's precision with the teacher's weights cast to that
  dtype once and run outside autocast, the teacher under ``inference_mode``, fused AdamW that
  skips a non-finite step on a device flag; optionally ``torch.compile``, channels-last
  inputs and weights, MAE-style dropping of masked tokens, activation checkpointing.
* ``baseline`` -- the same step the straightforward way (the official code's way): timm's plain
  BEiT blocks (drop path computes the samples it drops), explicit softmax attention with the
  bias added (timm's ``fused_attn = False``), fp16 autocast with a
  loss scaler on GPU / fp32 on CPU, the teacher in fp32 under ``no_grad`` (under autocast on
  GPU), a for-loop AdamW (``foreach=False, fused=False``), no compile, masked tokens (if any)
  replaced by the mask token rather than dropped. Activation checkpointing is a memory
  setting, not a speed path: both variants use the same.

Both start from the same seed, so they hold identical weights.

A config with several teachers (``BenchConfig.teachers``) builds a
:class:`~fdistill.multi.MultiTeacherDistiller` instead (the one ``fdistill distill`` builds for a
``teachers:`` config): both variants apply the switches above to every teacher; the baseline is
then the straightforward multi-teacher step -- a plain loop over the teachers, each in fp32 under
``no_grad`` with explicit attention, one student pass, the heads, the for-loop AdamW. Dropping
masked tokens is a single-teacher option (the multi-teacher distiller has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

from fdistill import FeatureDistiller, create_student, create_teacher
from fdistill.distiller import TeacherTargets
from fdistill.engine.optim import create_adamw, no_weight_decay_patterns
from fdistill.engine.step import TrainStep
from fdistill.multi.distiller import MultiTeacherDistiller, TeacherSpec

from .configs import BenchConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Options:
    """The fast path's switches (the baseline ignores all but ``mask_ratio`` and ``grad_ckpt``)."""

    compile: bool = False
    channels_last: bool = False
    mask_ratio: float = 0.0
    drop_masked: bool = False
    grad_ckpt: bool = False
    teacher_dtype: Optional[str] = None  # fast path; default: the precision's dtype
    seed: int = 0
    lr: Optional[float] = None  # default: the recipes' 3e-4 per 512 images


@dataclass
class Variant:
    name: str
    distiller: Union[FeatureDistiller, MultiTeacherDistiller]
    optimizer: torch.optim.Optimizer
    train_step: TrainStep
    images: torch.Tensor  # (B, 3, H, W) uint8 on the device
    precision: str

    def step(self):
        """One optimizer step on the fixed batch (returns the step's outputs, not synced)."""
        return self.train_step([self.images])

    @property
    def compiled(self) -> bool:
        return self.train_step.forward is not self.distiller


def use_explicit_attention(model: nn.Module) -> int:
    """Switch every timm attention module to its explicit path (``q k^T * scale + bias``,
    softmax, ``@ v``); returns how many were switched."""
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
            n += 1
    return n


def use_plain_timm_blocks(student: nn.Module) -> None:
    """Give the FD student timm's own BEiT block and attention classes back (no CPU speed paths:
    dropped samples computed, SDPA's math path for a trainable bias on CPU)."""
    from timm.models.beit import Attention, Block

    for blk in student.blocks:
        blk.__class__ = Block
        blk.attn.__class__ = Attention


def teacher_targets(distiller: nn.Module) -> List[TeacherTargets]:
    """The distiller's teacher side(s): its one :class:`~fdistill.distiller.TeacherTargets`, or
    one per teacher of a :class:`~fdistill.multi.MultiTeacherDistiller` (in its order)."""
    if isinstance(distiller, MultiTeacherDistiller):
        return [distiller.targets[n] for n in distiller.names]
    return [distiller.targets]


def build_models(cfg: BenchConfig, opts: Options, device: torch.device, *, drop_masked: bool):
    """Teacher(s) + student + distiller of ``cfg`` (random weights from ``opts.seed``), on ``device``:
    a :class:`~fdistill.FeatureDistiller`, or with ``cfg.teachers`` a
    :class:`~fdistill.multi.MultiTeacherDistiller` with FD's linear head and loss per teacher."""
    if cfg.multi and drop_masked:
        raise SystemExit(f"--drop-masked is a single-teacher option; {cfg.name} has {len(cfg.teachers)} teachers")
    torch.manual_seed(opts.seed)
    if cfg.multi:
        teachers = [TeacherSpec(name=t.name, teacher=create_teacher(f"timm:{t.model}", pretrained=False, **t.kwargs),
                                weight=t.weight) for t in cfg.teachers]
    else:
        teacher = create_teacher(f"timm:{cfg.teacher}", pretrained=False, **cfg.teacher_kwargs)
    student = create_student(cfg.student_arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                             drop_path_rate=cfg.drop_path_rate, grad_checkpointing=opts.grad_ckpt,
                             **cfg.student_kwargs)
    if cfg.multi:
        distiller = MultiTeacherDistiller(teachers, student, cls_weight=cfg.cls_weight, mask_ratio=opts.mask_ratio)
    else:
        distiller = FeatureDistiller(teacher, student, cls_weight=cfg.cls_weight, mask_ratio=opts.mask_ratio,
                                     drop_masked=drop_masked)
    if opts.mask_ratio == 0 or drop_masked:  # as the engine: the unused mask token is frozen
        distiller.student.mask_token.requires_grad_(False)
    return distiller.to(device).train()


def make_images(cfg: BenchConfig, device: torch.device, *, channels_last: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (cfg.batch, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8, generator=g)
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def lr_for(cfg: BenchConfig, opts: Options) -> float:
    return opts.lr if opts.lr is not None else 3e-4 * cfg.batch / 512  # the recipes' linear scaling rule


def build_fast(cfg: BenchConfig, opts: Options, device: torch.device) -> Variant:
    distiller = build_models(cfg, opts, device, drop_masked=opts.drop_masked)
    tdtype = DTYPES[opts.teacher_dtype or cfg.precision]
    for tt in teacher_targets(distiller):
        tt.teacher.to(dtype=tdtype)  # cast once (the engine's teacher.dtype: auto)
    if opts.channels_last:
        distiller.to(memory_format=torch.channels_last)  # the patch-embedding convolutions
    optimizer = create_adamw(distiller.branch, lr=lr_for(cfg, opts), weight_decay=0.05)
    step = TrainStep(distiller, optimizer, precision=cfg.precision, clip_grad=cfg.clip_grad, compile=opts.compile)
    images = make_images(cfg, device, channels_last=opts.channels_last, seed=opts.seed)
    return Variant("fast", distiller, optimizer, step, images, cfg.precision)


def baseline_precision(device: torch.device) -> str:
    """The official code's precision: fp16 autocast with a loss scaler on GPU, fp32 on CPU."""
    return "fp16" if device.type == "cuda" else "fp32"


def build_baseline(cfg: BenchConfig, opts: Options, device: torch.device, *, precision: Optional[str] = None) -> Variant:
    distiller = build_models(cfg, opts, device, drop_masked=False)
    use_plain_timm_blocks(distiller.student)
    use_explicit_attention(distiller)
    for tt in teacher_targets(distiller):
        tt.teacher_inference_mode = False  # plain no_grad
    groups = param_groups_weight_decay(distiller.branch, 0.05,
                                       no_weight_decay_list=no_weight_decay_patterns(distiller.branch))
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_for(cfg, opts), weight_decay=0.05,
                                  foreach=False, fused=False)
    precision = precision or baseline_precision(device)
    step = TrainStep(distiller, optimizer, precision=precision, clip_grad=cfg.clip_grad)
    images = make_images(cfg, device, seed=opts.seed)
    return Variant("baseline", distiller, optimizer, step, images, precision)
