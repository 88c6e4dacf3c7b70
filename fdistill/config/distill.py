"""The distillation run's config schema (``fdistill distill``) and the values derived from it.

The schema is plain dataclasses (validated in ``__post_init__``; types and unknown keys are
checked by :func:`fdistill.config.build_config`). It describes and builds nothing: the
``build_*`` functions that turn it into models, data and optimizers live beside the loop, in
:mod:`fdistill.engine.builders`.

Defaults follow the official FD pre-training configs (SwinTransformer/Feature-Distillation,
``config.py`` + ``configs/pretrain/fd_pretrain__clip_vit_base__img224__300ep.yaml``):
AdamW (0.9, 0.999), eps 1e-8, weight decay 0.05, base lr 3e-4 per 512 images, warm-up 10
epochs from 5e-7, cosine to 5e-6, gradient clipping 3.0, batch 128 per GPU.

    cfg = build_config(DistillConfig, "configs/distill/tiny_cpu.yaml", ["optim.base_lr=1e-3"])
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

from .core import ConfigError

__all__ = [
    "TeacherConfig", "TeacherEntryConfig", "MultiTeacherConfig", "StudentConfig", "DistillLossConfig", "DataConfig",
    "OptimConfig", "TrainConfig", "teachers_description",
    "DistillConfig", "RESUME_SAFE_KEYS", "resolve_lr", "student_args_of", "data_img_size",
]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: the FD ViT students by name (their widths: ``fdistill.models.student.STUDENT_SIZES``; a test
#: keeps the two equal, so the schema needs no model code)
STUDENT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class TeacherConfig:
    #: a teacher spec: ``timm:<model>``, ``open_clip:<arch>/<tag>``, ``hf:<repo>``, ``python:<file>:<fn>``
    spec: str = "timm:vit_base_patch16_clip_quickgelu_224.openai"
    #: extra keyword arguments of the teacher factory (``checkpoint``, ``pretrained``, model sizes...)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    #: target = tokens after the teacher's final norm (official ``PRED_FEAT_AFTERNORM: True``)
    after_norm: bool = True
    #: teacher weights' dtype; ``auto`` follows ``train.precision`` (bf16 teacher in a bf16 run)
    dtype: Precision = "auto"

    def __post_init__(self):
        _check(isinstance(self.spec, str) and ":" in self.spec,
               f"teacher.spec {self.spec!r} must look like '<source>:<name>', e.g. 'timm:vit_base_patch16_clip_quickgelu_224.openai'")


@dataclass
class TeacherEntryConfig(TeacherConfig):
    """One teacher of a multi-teacher run (``teachers:``, :mod:`fdistill.multi`): the teacher
    (``spec``, ``kwargs``, ``after_norm``, ``dtype`` as ``teacher:``) and how the student learns it."""

    #: the teacher's name: its head, its losses in metrics.jsonl (default: t0, t1, ...)
    name: str = ""
    #: its loss weight (static balancing)
    weight: float = 1.0
    #: what is distilled: the ``full`` token map ([CLS] x distill.cls_weight + patches, FD),
    #: the ``summary`` token only, or the ``spatial`` patch tokens only
    targets: Literal["full", "summary", "spatial"] = "full"
    #: target normalisation: FD's per-token ``standardize``, per-channel ``stats`` (UNIC / Theia),
    #: ``phi_s`` (RADIO's PHI-S), ``l2``, ``none``; stats / phi_s are fitted before training
    norm: Literal["standardize", "stats", "phi_s", "l2", "none"] = "standardize"
    #: FD's ``smooth_l1`` (beta distill.beta) or ``cos_smooth_l1`` (cosine + smooth-L1, RADIO / UNIC)
    loss: Literal["smooth_l1", "cos_smooth_l1"] = "smooth_l1"
    #: the head from the student's tokens: FD's per-token ``linear`` or a 2-layer ``mlp`` (RADIO / UNIC)
    head: Literal["linear", "mlp"] = "linear"
    #: cls_target and grid alignment of this teacher (see distill.*)
    cls_target: Literal["auto", "teacher", "gap", "none"] = "auto"
    align: Literal["auto", "resize", "interpolate", "none"] = "auto"
    teacher_img_size: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        _check(math.isfinite(self.weight) and self.weight >= 0, f"teachers[].weight must be >= 0, got {self.weight}")


@dataclass
class MultiTeacherConfig:
    """How several teachers are balanced and their statistics gathered (:mod:`fdistill.multi`)."""

    #: images of the statistics pass that fits the stats / phi_s normalisers before training
    stats_images: int = 2048
    #: UNIC's teacher dropping: per sample, drop the losses of teachers the student already fits well
    teacher_dropping: bool = False
    #: divide each teacher's loss by its mean over the first N steps (0: off)
    normalize_by_initial_steps: int = 0
    #: multi-resolution training (RADIO v2.5): other student input sizes (pixels, multiples of the
    #: patch size) and the fraction of steps that use one of them; the teachers keep their size
    resolutions: List[int] = field(default_factory=list)
    resolution_fraction: float = 0.0

    def __post_init__(self):
        _check(self.stats_images >= 1, f"multi.stats_images must be >= 1, got {self.stats_images}")
        _check(self.normalize_by_initial_steps >= 0, "multi.normalize_by_initial_steps must be >= 0")
        _check(math.isfinite(self.resolution_fraction) and 0.0 <= self.resolution_fraction <= 1.0,
               f"multi.resolution_fraction must be in [0, 1], got {self.resolution_fraction}")
        _check(all(int(r) > 0 for r in self.resolutions), f"multi.resolutions must be positive, got {self.resolutions}")
        _check(self.resolution_fraction == 0.0 or bool(self.resolutions),
               "multi.resolution_fraction > 0 needs multi.resolutions (the other input sizes)")


@dataclass
class StudentConfig:
    #: ``vit_tiny|vit_small|vit_base|vit_large|vit_huge`` (the FD ViT with shared relative position
    #: bias), or ``timm:<model>`` for any timm backbone producing a token map (e.g. a Swin)
    arch: str = "vit_base"
    img_size: int = 224
    patch_size: int = 16
    pos_embed: Literal["shared_rpb", "rpb", "ape"] = "shared_rpb"
    drop_path_rate: float = 0.1
    #: layer-scale initial value (official ``INIT_VALUES: 0.1``); null turns layer scale off
    init_values: Optional[float] = 0.1
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    #: activation checkpointing (recompute blocks in backward: less memory, ~30% more compute)
    grad_checkpointing: bool = False
    #: ``official``: the official FD/BEiT initialisation (normal std 0.02 truncated at +-1 std, the
    #: patch-embedding conv included; ``fix_init_weight``), ``timm``: timm's Beit init. FD ViT only
    init: Literal["official", "timm"] = "official"
    #: extra ``timm.create_model`` arguments of a ``timm:`` student (e.g. ``window_size: 14``)
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check(self.arch in STUDENT_ARCHS or (self.arch.startswith("timm:") and len(self.arch) > 5),
               f"student.arch {self.arch!r} must be one of {sorted(STUDENT_ARCHS)} or 'timm:<model name>'")
        _check(self.img_size > 0 and self.patch_size > 0, "student.img_size and student.patch_size must be > 0")
        _check(self.img_size % self.patch_size == 0 or self.arch.startswith("timm:"),
               f"student.img_size {self.img_size} must be a multiple of student.patch_size {self.patch_size}")
        _check(0.0 <= self.drop_path_rate < 1.0, f"student.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        for k in ("embed_dim", "depth", "num_heads"):
            v = getattr(self, k)
            _check(v is None or v > 0, f"student.{k} must be > 0, got {v}")
        _check(not self.kwargs or self.arch.startswith("timm:"), "student.kwargs is only for 'timm:' students")


@dataclass
class DistillLossConfig:
    """The FD objective and its options (see :class:`fdistill.FeatureDistiller`)."""

    norm: Literal["standardize", "l2", "none"] = "standardize"
    beta: float = 2.0
    #: prefix-token weight in the loss: 10 in the paper's text, 1 in the official code
    cls_weight: float = 10.0
    granularity: Literal["full", "gap", "cls"] = "full"
    cls_target: Literal["auto", "teacher", "gap", "none"] = "auto"
    mask_ratio: float = 0.0
    mask_type: Literal["random", "block"] = "random"
    mask_teacher: bool = False
    drop_masked: bool = False
    align: Literal["auto", "resize", "interpolate", "none"] = "auto"
    teacher_img_size: Optional[int] = None

    def __post_init__(self):
        _check(self.beta > 0, f"distill.beta must be > 0, got {self.beta}")
        _check(self.cls_weight >= 0, f"distill.cls_weight must be >= 0, got {self.cls_weight}")
        _check(0.0 <= self.mask_ratio < 1.0, f"distill.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        _check(not self.drop_masked or self.mask_ratio > 0, "distill.drop_masked needs distill.mask_ratio > 0")
        _check(not self.mask_teacher or self.mask_ratio > 0, "distill.mask_teacher needs distill.mask_ratio > 0")


@dataclass
class DataConfig:
    #: an image folder (recursively), a webdataset shard pattern, or a dataset name the data layer
    #: knows (e.g. ``synthetic``); ``fdistill distill --data PATH`` sets it
    path: str = ""
    #: training crop size; null = the student's ``img_size``
    img_size: Optional[int] = None
    #: RandomResizedCrop area range (official 300-epoch configs: 0.08; 100-epoch: 0.67)
    scale: Tuple[float, float] = (0.08, 1.0)
    #: crop resampling: official ``data_fd.py`` uses ``T.RandomResizedCrop``'s default, bilinear
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    #: horizontal-flip probability
    hflip: float = 0.5
    #: images per GPU (per process) per micro-step
    batch_size: int = 128
    num_workers: int = 8
    #: epoch length in images for tar-shard streams, whose length is unknown (ImageNet-1k: 1281167);
    #: folders and ``synthetic:N`` know their length
    samples_per_epoch: Optional[int] = None
    #: extra keyword arguments of :func:`fdistill.data.build_distill_dataset` (e.g. ``interpolation``)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    #: decode JPEGs on the GPU (nvJPEG) and crop there: workers only read the files
    #: (:mod:`fdistill.data.gpu_decode`); image folders only. Same samples and crop draws as the CPU
    #: path; without CUDA the main process decodes on the CPU (same pixels as the CPU path)
    gpu_decode: bool = False

    def __post_init__(self):
        _check(self.img_size is None or self.img_size > 0, f"data.img_size must be > 0, got {self.img_size}")
        _check(0 < self.scale[0] <= self.scale[1] <= 1.0, f"data.scale must be 0 < min <= max <= 1, got {self.scale}")
        _check(0 < self.ratio[0] <= self.ratio[1], f"data.ratio must be 0 < min <= max, got {self.ratio}")
        _check(0.0 <= self.hflip <= 1.0, f"data.hflip is a probability, got {self.hflip}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.samples_per_epoch is None or self.samples_per_epoch > 0, "data.samples_per_epoch must be > 0")


@dataclass
class OptimConfig:
    """AdamW with warm-up + cosine, per optimizer step (official FD ``lr_scheduler.py``)."""

    #: learning rate per ``lr_batch_denominator`` images: lr = base_lr * total_batch / denominator,
    #: total_batch = batch_size * processes * accum_steps (the official linear scaling rule)
    base_lr: float = 3e-4
    #: absolute peak learning rate; when set, base_lr is ignored and warmup_lr/min_lr are absolute
    lr: Optional[float] = None
    lr_batch_denominator: int = 512
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 10.0
    #: warm-up start and cosine floor, scaled like base_lr (as the official code does) unless lr is set
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    #: max global gradient norm; 0 turns clipping off
    clip_grad: float = 3.0
    #: micro-batches per optimizer step (gradient accumulation)
    accum_steps: int = 1
    #: fused AdamW kernel; null = use it where torch has one (CUDA, CPU)
    fused: Optional[bool] = None
    #: weight decay on the shared relative-position-bias table: the official optimizer decays it
    #: (2-d, and not in the ViT's ``no_weight_decay()``); false exempts it (timm's Beit)
    decay_rel_pos_bias: bool = True

    def __post_init__(self):
        _check(self.base_lr > 0, f"optim.base_lr must be > 0, got {self.base_lr}")
        _check(self.lr is None or self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.lr_batch_denominator > 0, "optim.lr_batch_denominator must be > 0")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas must be in [0, 1), got {self.betas}")
        _check(self.eps > 0, "optim.eps must be > 0")
        _check(self.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.warmup_lr >= 0 and self.min_lr >= 0, "optim.warmup_lr and optim.min_lr must be >= 0")
        _check(self.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 = off), got {self.clip_grad}")
        _check(self.accum_steps >= 1, f"optim.accum_steps must be >= 1, got {self.accum_steps}")


@dataclass
class TrainConfig:
    epochs: float = 300.0
    #: stop after this many optimizer steps (the schedule still spans ``epochs``); 0 writes the
    #: initialised student as ``ckpt_00000000.pt`` and stops: the from-scratch baseline with the
    #: same architecture and initialisation (``train.seed``) as the FD students
    max_steps: Optional[int] = None
    #: ``auto``: bf16 autocast on a GPU that supports it, fp32 on CPU. ``fp16`` uses a loss scaler
    precision: Precision = "auto"
    #: torch.compile the training forward (falls back to eager, with a warning, if it fails)
    compile: bool = False
    seed: int = 0
    #: optimizer steps between metric lines / progress-bar updates (the only host syncs)
    log_interval: int = 50
    #: optimizer steps between checkpoints (one is also written at the end and on SIGTERM/SIGUSR1)
    ckpt_interval: int = 1000
    #: checkpoints kept in ``<output>/checkpoints`` (older ones are deleted)
    keep_last: int = 3
    #: stop with an error after this many non-finite losses in a row (each such step is skipped)
    max_nonfinite: int = 20
    tensorboard: bool = False
    output: str = "runs/distill"
    #: ``cuda`` | ``cpu`` | ``auto`` (cuda when available)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    #: intra-op threads of a CPU run (null: torch's default). Tiny models run fastest on 1, and
    #: several threads slow down badly when the cores are shared with other work
    cpu_threads: Optional[int] = None

    def __post_init__(self):
        _check(self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(self.log_interval >= 1, "train.log_interval must be >= 1")
        _check(self.ckpt_interval >= 1, "train.ckpt_interval must be >= 1")
        _check(self.keep_last >= 1, "train.keep_last must be >= 1")
        _check(self.max_nonfinite >= 1, "train.max_nonfinite must be >= 1")
        _check(bool(self.output), "train.output must name a folder")
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "train.cpu_threads must be >= 1")


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    #: several teachers at once (:mod:`fdistill.multi`); empty: the one ``teacher``
    teachers: List[TeacherEntryConfig] = field(default_factory=list)
    multi: MultiTeacherConfig = field(default_factory=MultiTeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillLossConfig = field(default_factory=DistillLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.teachers:
            if self.teacher != TeacherConfig():
                raise ConfigError("give either teacher: (one teacher) or teachers: (a list), not both")
            names = [t.name or f"t{i}" for i, t in enumerate(self.teachers)]
            for t, n in zip(self.teachers, names):
                t.name = n
            if len(set(names)) != len(names):
                raise ConfigError(f"teachers[].name must be unique, got {names}")
            if not any(t.weight > 0 for t in self.teachers):
                raise ConfigError("teachers: at least one weight must be > 0")
        if self.student.arch.startswith("timm:") and self.distill.mask_ratio > 0:
            raise ConfigError(
                f"distill.mask_ratio > 0 needs the FD ViT student; {self.student.arch} (a timm backbone) "
                "has no mask token: set distill.mask_ratio=0 or a student.arch like vit_base")


#: dotted config keys that may change when a run resumes (logging, length, where files go,
#: how fast it runs). Every other key changes the model, the data or the optimisation, and a
#: checkpoint written under another value is refused -- except :data:`RESUME_GLOBAL_BATCH_KEYS`.
#: (``data.num_workers`` is free for image folders and ``synthetic``; for tar shards the engine
#: refuses a change in the middle of an epoch, see :func:`fdistill.data.shards.check_resume_layout`.)
RESUME_SAFE_KEYS = (
    "train.epochs", "train.max_steps", "train.log_interval", "train.ckpt_interval", "train.keep_last",
    "train.max_nonfinite", "train.tensorboard", "train.output", "train.compile", "train.device", "train.cpu_threads",
    "data.path", "data.num_workers", "data.gpu_decode", "student.grad_checkpointing", "teacher.kwargs.checkpoint",
    "teacher.kwargs.license",
)

#: keys that may change on resume *only if the global batch stays equal*: ``data.batch_size x
#: processes x optim.accum_steps`` (images per optimizer step), e.g. half the processes with twice
#: the batch after a pre-emption. :func:`fdistill.engine.check_resume_compatible` checks it when
#: given both world sizes (and refuses any change of these keys when not).
RESUME_GLOBAL_BATCH_KEYS = ("data.batch_size", "optim.accum_steps")


def global_batch_of(config: Dict[str, Any], world_size: int) -> Tuple[int, int, int, int]:
    """``(global batch, data.batch_size, world_size, optim.accum_steps)`` of a config dict
    (:func:`fdistill.config.to_dict`, or a checkpoint's ``"config"``) run on ``world_size`` processes."""
    b, a, w = int(config["data"]["batch_size"]), int(config["optim"]["accum_steps"]), int(world_size)
    return b * w * a, b, w, a


# -- derived values ------------------------------------------------------------------------------
def resolve_lr(optim: OptimConfig, total_batch: int) -> Tuple[float, float, float]:
    """(peak lr, warm-up start lr, final lr) for a global batch of ``total_batch`` images.

    Official FD (``main_fd.py``) scales all three linearly by ``total_batch / 512``; an
    absolute ``optim.lr`` takes the three values as given."""
    if optim.lr is not None:
        return optim.lr, optim.warmup_lr, optim.min_lr
    s = total_batch / optim.lr_batch_denominator
    return optim.base_lr * s, optim.warmup_lr * s, optim.min_lr * s


def teachers_description(cfg: DistillConfig) -> str:
    """The teacher spec, or ``name=spec + name=spec`` of a ``teachers:`` run (logs, messages)."""
    return " + ".join(f"{t.name}={t.spec}" for t in cfg.teachers) if cfg.teachers else cfg.teacher.spec


def student_args_of(cfg: DistillConfig) -> Dict[str, Any]:
    """The ``create_student`` keyword arguments of this config (stored in every checkpoint)."""
    s = cfg.student
    if s.arch.startswith("timm:"):
        return dict(arch=s.arch, img_size=s.img_size, drop_path_rate=s.drop_path_rate,
                    grad_checkpointing=s.grad_checkpointing, **({"kwargs": dict(s.kwargs)} if s.kwargs else {}))
    return dict(arch=s.arch, img_size=s.img_size, patch_size=s.patch_size, pos_embed=s.pos_embed,
                drop_path_rate=s.drop_path_rate, init_values=s.init_values, embed_dim=s.embed_dim,
                depth=s.depth, num_heads=s.num_heads, grad_checkpointing=s.grad_checkpointing, init=s.init)


def data_img_size(cfg: DistillConfig) -> int:
    """The training crop size: ``data.img_size``, else the student's input size."""
    return cfg.data.img_size or cfg.student.img_size
