"""The ``build_*`` functions of a distillation run: a :class:`~fdistill.config.distill.DistillConfig`
(which only describes) -> teacher(s), student, distiller, optimizer, schedule, dataset, loader.

These are the only readers of a ``DistillConfig`` outside the schema; everything they call takes
plain arguments. ``validate_without_building`` checks what the schema cannot without building a
model (the teacher's source is known, timm names exist, the data folder exists).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from ..config import ConfigError
from ..config.distill import DataConfig, DistillConfig, TeacherConfig, data_img_size, resolve_lr, student_args_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = ["build_teacher", "build_student", "build_distiller", "build_optimizer", "build_scheduler", "build_dataset",
           "build_batch_view", "build_loader", "validate_without_building"]


def build_teacher(cfg: DistillConfig, *, device=None, precision: str = "fp32", entry: Optional[TeacherConfig] = None):
    """The frozen teacher of ``cfg.teacher`` (or of ``entry``, one of ``cfg.teachers``), on
    ``device``, in the dtype ``teacher.dtype`` asks (``auto``: the run's autocast dtype, so a
    bf16 run keeps a bf16 teacher)."""
    import torch

    from ..teachers import TeacherError, create_teacher

    tc = entry if entry is not None else cfg.teacher
    kwargs = dict(tc.kwargs)
    if not tc.after_norm:
        kwargs["after_norm"] = False
    try:
        teacher = create_teacher(tc.spec, **kwargs)
    except TypeError as e:  # a factory that does not take a kwarg given in the config
        raise TeacherError(f"teacher {tc.spec}: {e} (check teacher.kwargs / teacher.after_norm)") from e
    dtype = tc.dtype if tc.dtype != "auto" else precision
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return teacher.to(device=device, dtype=torch_dtype)


def build_student(cfg: DistillConfig):
    """The randomly initialised student of ``cfg.student``."""
    from ..models.student import create_student

    args = student_args_of(cfg)
    if args["arch"].startswith("timm:"):
        from ..models.timm_student import create_timm_student

        return create_timm_student(args.pop("arch")[5:], **{**args.pop("kwargs", {}), **args})
    return create_student(**args)


def build_distiller(cfg: DistillConfig, *, device=None, precision: str = "fp32", teacher=None):
    """Teacher + student + projector + loss (:class:`fdistill.FeatureDistiller`) of ``cfg``;
    with ``teachers:``, every teacher + the student + one head each
    (:class:`fdistill.multi.MultiTeacherDistiller`)."""
    from ..distiller import FeatureDistiller

    if cfg.teachers:
        return _build_multi_distiller(cfg, device=device, precision=precision)
    teacher = teacher if teacher is not None else build_teacher(cfg, device=device, precision=precision)
    student = build_student(cfg)
    d = cfg.distill
    try:
        distiller = FeatureDistiller(
            teacher, student, norm=d.norm, beta=d.beta, cls_weight=d.cls_weight, granularity=d.granularity,
            cls_target=d.cls_target, mask_ratio=d.mask_ratio, mask_type=d.mask_type, mask_teacher=d.mask_teacher,
            drop_masked=d.drop_masked, align=d.align, teacher_img_size=d.teacher_img_size,
        )
    except ValueError as e:  # option combinations the distiller refuses
        raise ConfigError(f"distill: {e}") from e
    if d.mask_ratio == 0 or d.drop_masked:
        # the mask token takes no part in the loss: freeze it so DDP needs no unused-parameter search
        mt = getattr(distiller.student, "mask_token", None)
        if mt is not None:
            mt.requires_grad_(False)
    return distiller.to(device) if device is not None else distiller


def _build_multi_distiller(cfg: DistillConfig, *, device=None, precision: str = "fp32"):
    from ..multi.distiller import MultiTeacherDistiller, TeacherSpec

    d = cfg.distill
    if d.drop_masked or d.mask_teacher or d.granularity != "full" or d.norm != "standardize":
        raise ConfigError("with teachers:, set the target norm per teacher (teachers[].norm) and what is "
                          "distilled per teacher (teachers[].targets); distill.drop_masked / mask_teacher / "
                          "granularity / norm are single-teacher options")
    specs = [TeacherSpec(name=t.name, teacher=build_teacher(cfg, device=device, precision=precision, entry=t),
                         weight=t.weight, targets=t.targets, norm=t.norm, loss=t.loss, head=t.head,
                         cls_target=t.cls_target, align=t.align, teacher_img_size=t.teacher_img_size)
             for t in cfg.teachers]
    m = cfg.multi
    try:
        distiller = MultiTeacherDistiller(specs, build_student(cfg), beta=d.beta, cls_weight=d.cls_weight,
                                          mask_ratio=d.mask_ratio, mask_type=d.mask_type,
                                          teacher_dropping=m.teacher_dropping,
                                          normalize_initial_steps=m.normalize_by_initial_steps,
                                          resolutions=m.resolutions, resolution_fraction=m.resolution_fraction,
                                          seed=cfg.train.seed)
    except ValueError as e:
        raise ConfigError(f"teachers: {e}") from e
    mt = getattr(distiller.student, "mask_token", None)
    if mt is not None and d.mask_ratio == 0:
        mt.requires_grad_(False)
    return distiller.to(device) if device is not None else distiller


def build_optimizer(cfg: DistillConfig, model, *, total_batch: int):
    """AdamW over the trainable parameters of ``model`` (student + projector), see
    :func:`fdistill.engine.optim.create_adamw`."""
    from .optim import create_adamw

    o = cfg.optim
    lr, _, _ = resolve_lr(o, total_batch)
    return create_adamw(model, lr=lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, fused=o.fused,
                        decay_rel_pos_bias=o.decay_rel_pos_bias)


def build_scheduler(cfg: DistillConfig, optimizer, *, steps_per_epoch: int, total_batch: int):
    """Per-step warm-up + cosine of ``cfg.optim`` over ``cfg.train.epochs`` epochs."""
    from .schedule import create_warmup_cosine

    o = cfg.optim
    lr, warmup_lr, min_lr = resolve_lr(o, total_batch)
    total = max(1, int(round(cfg.train.epochs * steps_per_epoch)))
    warmup = min(int(round(o.warmup_epochs * steps_per_epoch)), total)
    return create_warmup_cosine(optimizer, peak_lr=lr, total_steps=total, warmup_steps=warmup,
                                warmup_lr=warmup_lr, min_lr=min_lr)


def build_dataset(cfg: DistillConfig):
    """The training dataset of ``cfg.data`` (uint8 crops, augmentation a pure function of
    (seed, epoch, index)); see :func:`fdistill.data.build_distill_dataset`."""
    from ..data import build_distill_dataset

    d = cfg.data
    if not d.path:
        raise ConfigError("no training data: set data.path or pass --data PATH")
    if d.gpu_decode:
        return _build_encoded_dataset(d)
    return build_distill_dataset(d.path, img_size=data_img_size(cfg), scale=tuple(d.scale), ratio=tuple(d.ratio),
                                 hflip=d.hflip, seed=cfg.train.seed, **_view_kwargs(d))


def _view_kwargs(d: DataConfig) -> Dict[str, Any]:
    """``data.kwargs`` with ``data.interpolation`` (a ``kwargs.interpolation`` of an older recipe wins)."""
    return {"interpolation": d.interpolation, **d.kwargs}


def _build_encoded_dataset(d: DataConfig):
    """``data.gpu_decode``: the folder read as encoded bytes (the crop happens on the device)."""
    from ..data.gpu_decode import EncodedImageFolder

    p = d.path
    if not Path(p).expanduser().is_dir():  # synthetic:N, tar shards, a missing path
        raise ConfigError(f"data.gpu_decode needs an image folder; data.path={p!r} is not one (tar shards and "
                          "synthetic data are decoded by the loader workers: set data.gpu_decode=false)")
    unknown = set(d.kwargs) - {"interpolation"}
    if unknown:
        raise ConfigError(f"data.kwargs {sorted(unknown)} are not supported with data.gpu_decode (only 'interpolation')")
    return EncodedImageFolder(Path(p).expanduser())


def build_batch_view(cfg: DistillConfig, device) -> Callable[[dict], torch.Tensor]:
    """``batch -> uint8 images (B, 3, H, W) on device``: a plain copy of the loader's crops, or
    with ``data.gpu_decode`` the decode + FD view on the device (:class:`fdistill.data.gpu_decode.
    DeviceDistillView`, same per-sample draws as the CPU view; it counts undecodable images in
    ``batch["skipped"]``)."""
    d = cfg.data
    if not d.gpu_decode:
        return lambda batch: batch["images"].to(device, non_blocking=True)
    from ..data.gpu_decode import DeviceDistillView

    if getattr(device, "type", str(device)) != "cuda":
        log.warning("data.gpu_decode without a CUDA device: JPEGs are decoded on the CPU in the training process")
    view = DeviceDistillView(data_img_size(cfg), scale=tuple(d.scale), ratio=tuple(d.ratio), hflip=d.hflip,
                             seed=cfg.train.seed, **_view_kwargs(d))
    return lambda batch: view(batch, device)


def build_loader(cfg: DistillConfig, dataset, *, num_replicas: int, rank: int, epoch: int = 0,
                 start_index: int = 0, pin_memory: bool = False):
    """This process's loader over ``dataset`` (see :func:`fdistill.data.build_distill_loader`;
    with ``data.gpu_decode``, :func:`fdistill.data.gpu_decode.build_encoded_loader`, same sampler);
    the loop moves it with ``loader.set_epoch(epoch, start_index)``, ``start_index`` being the
    samples this rank had consumed in the epoch, so a resumed run sees exactly what it would
    have seen. Turn a batch into images with :func:`build_batch_view`."""
    from ..data import build_distill_loader

    d = cfg.data
    if d.gpu_decode:
        from ..data.gpu_decode import build_encoded_loader

        return build_encoded_loader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, seed=cfg.train.seed,
                                    epoch=epoch, start_index=start_index, num_replicas=num_replicas, rank=rank,
                                    drop_last=True, pin_memory=pin_memory)
    return build_distill_loader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, seed=cfg.train.seed,
                                epoch=epoch, start_index=start_index, num_replicas=num_replicas, rank=rank,
                                drop_last=True, pin_memory=pin_memory)


def validate_without_building(cfg: DistillConfig) -> None:
    """Checks beyond the schema that need no model: the teacher's source is known, timm model
    names exist, a local data folder exists. Raises ConfigError."""
    from ..teachers.registry import TEACHER_SOURCES, _CUSTOM
    import timm

    known = set(TEACHER_SOURCES) | set(_CUSTOM)
    entries = [(f"teachers[{i}] ({t.name}).spec", t.spec) for i, t in enumerate(cfg.teachers)] or \
        [("teacher.spec", cfg.teacher.spec)]
    for where, spec in entries:
        source, _, name = spec.partition(":")
        if source not in known:
            raise ConfigError(f"{where}: unknown source {source!r}; expected one of {sorted(known)}")
        if source == "timm" and not timm.is_model(name.split(".")[0]):
            raise ConfigError(f"{where}: timm has no model {name!r}")
    if cfg.student.arch.startswith("timm:") and not timm.is_model(cfg.student.arch[5:]):
        raise ConfigError(f"student.arch: timm has no model {cfg.student.arch[5:]!r}")
    p = cfg.data.path
    if p and not p.startswith("synthetic") and ".tar" not in p and "://" not in p:
        from pathlib import Path

        if not Path(p).expanduser().exists():
            raise ConfigError(f"data.path {p!r} does not exist")
