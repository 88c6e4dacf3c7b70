"""Config schemas of the evaluation commands (``fdistill finetune | linprobe | knn | zeroshot |
segprobe``). They only describe: :mod:`fdistill.eval.builders` turns each into the plain keyword
arguments of a library function in :mod:`fdistill.eval`.

Fine-tuning defaults reproduce the official FD fine-tuning recipe for CLIP ViT-B/16
(SwinTransformer/Feature-Distillation, ``config.py`` + ``configs/finetune/
fd_finetune__clip_vit_base__img224__300ep.yaml``, ``main_finetune.py``): AdamW (0.9, 0.999),
eps 1e-8, weight decay 0.05, base lr 1.25e-3 per 512 images, layer decay 0.6, drop path 0.3,
100 epochs with 20 warm-up epochs from 2.5e-7, cosine to 2.5e-7, gradient clipping 5.0,
label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment ``rand-m9-mstd0.5-inc1``, colour
jitter 0.4, random erasing 0.25, bicubic, mean pooling, per-layer relative position bias.

Linear probing follows MAE's ``main_linprobe.py`` (He et al., CVPR 2022, Appendix A.2): LARS,
base lr 0.1 per 256 images, weight decay 0, 90 epochs (10 warm-up), batch 16384,
RandomResizedCrop + flip, BatchNorm without affine before the linear head. k-NN follows DINO.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

from .core import ConfigError

__all__ = [
    "EvalDataConfig", "AugConfig", "FinetuneOptimConfig", "FinetuneConfig", "LinprobeConfig", "SweepConfig",
    "KnnConfig", "ZeroshotConfig", "resolve_finetune_lr",
]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cuda", "cpu"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class EvalDataConfig:
    #: input size; null = the model's own (``img_size`` of the loaded model)
    img_size: Optional[int] = None
    #: images per process per step (the global batch is this x processes)
    batch_size: int = 128
    num_workers: int = 8
    #: evaluation centre-crop fraction; null = 0.875, or 1.0 for images of 32 px or less
    crop_pct: Optional[float] = None
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    #: let torchvision download a named dataset (``cifar10``...) into the data root
    download: bool = False

    def __post_init__(self):
        _check(self.img_size is None or self.img_size > 0, f"data.img_size must be > 0, got {self.img_size}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.crop_pct is None or 0 < self.crop_pct <= 1, f"data.crop_pct must be in (0, 1], got {self.crop_pct}")


@dataclass
class AugConfig:
    """Fine-tuning augmentation (official FD / BEiT ``AUG``)."""

    #: timm RandAugment policy; "none" turns it off
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    #: random-erasing probability (mode ``pixel``, one box)
    re_prob: float = 0.25
    #: RandomResizedCrop area range (images of 32 px or less use RandomCrop(padding=4) instead)
    scale: Tuple[float, float] = (0.08, 1.0)
    #: mixup alpha / cutmix alpha (0 turns each off); label smoothing is applied inside mixup
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1

    def __post_init__(self):
        _check(0 <= self.re_prob <= 1, f"aug.re_prob is a probability, got {self.re_prob}")
        _check(self.mixup >= 0 and self.cutmix >= 0, "aug.mixup and aug.cutmix must be >= 0")
        _check(0 <= self.label_smoothing < 1, f"aug.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(0 < self.scale[0] <= self.scale[1] <= 1, f"aug.scale must be 0 < min <= max <= 1, got {self.scale}")


@dataclass
class FinetuneOptimConfig:
    """AdamW + layer-wise lr decay, warm-up + cosine per step (official ``lr_scheduler.py``)."""

    #: lr per ``lr_batch_denominator`` images: lr = base_lr * global_batch / denominator
    base_lr: float = 1.25e-3
    #: absolute peak lr; when set, base_lr is ignored and warmup_lr/min_lr are absolute too
    lr: Optional[float] = None
    lr_batch_denominator: int = 512
    warmup_lr: float = 2.5e-7
    min_lr: float = 2.5e-7
    weight_decay: float = 0.05
    #: lr scale of layer i = layer_decay ** (L + 1 - i); 1.0 turns it off
    layer_decay: float = 0.6
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    #: max global gradient norm; 0 turns clipping off
    clip_grad: float = 5.0
    #: weight decay on the (2-d) relative-position-bias tables: the official ``optimizer.py``
    #: decays every >= 2-d tensor not named by ``no_weight_decay()`` ({pos_embed, cls_token}), so
    #: true; false exempts them (BEiT's fine-tuning, timm's Beit)
    decay_rel_pos_bias: bool = True

    def __post_init__(self):
        _check(self.base_lr > 0 and (self.lr is None or self.lr > 0), "optim.base_lr / optim.lr must be > 0")
        _check(0 < self.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.clip_grad >= 0, "optim.clip_grad must be >= 0 (0 = off)")
        _check(self.lr_batch_denominator > 0, "optim.lr_batch_denominator must be > 0")


@dataclass
class FinetuneModelConfig:
    #: ``avg`` = mean of the patch tokens + fc_norm (official FD); ``token`` = [CLS]
    global_pool: Literal["avg", "token"] = "avg"
    drop_path: float = 0.3

    def __post_init__(self):
        _check(0 <= self.drop_path < 1, f"model.drop_path must be in [0, 1), got {self.drop_path}")


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999

    def __post_init__(self):
        _check(0 < self.decay < 1, f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    epochs: int = 100
    warmup_epochs: float = 20.0
    #: stop after this many optimizer steps (smoke tests); the schedule then spans them
    max_steps: Optional[int] = None
    #: evaluate (and checkpoint) every this many epochs, and after the last
    eval_interval: int = 1
    #: also checkpoint every this many optimizer steps (null: at epoch ends only); a crash then
    #: loses at most this many steps of a long epoch. May change on resume
    ckpt_interval: Optional[int] = None
    #: checkpoints kept in OUTPUT/checkpoints (the newest). May change on resume
    keep_last: int = 2
    #: a step with a non-finite loss or gradient is skipped; this many in a row stop the run
    #: (the engine's policy, as train.max_nonfinite for distillation). May change on resume
    max_nonfinite: int = 20
    #: also write the training records to OUTPUT/tensorboard (pip install 'fdistill[tensorboard]')
    tensorboard: bool = False
    log_interval: int = 50
    precision: Precision = "auto"
    device: Device = "auto"
    seed: int = 0

    def __post_init__(self):
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(0 <= self.warmup_epochs <= self.epochs, f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        _check(self.eval_interval >= 1 and self.log_interval >= 1, "eval_interval and log_interval must be >= 1")
        _check(self.ckpt_interval is None or self.ckpt_interval >= 1, f"ckpt_interval must be >= 1, got {self.ckpt_interval}")
        _check(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        _check(self.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {self.max_nonfinite}")


@dataclass
class SweepConfig:
    """Fast linear probe: features extracted once, every (feature, lr) head trained in one pass."""

    #: token features: ``cls``, ``avg``, ``cls+avg``, ``last<n>`` (concatenated [CLS] of the last n blocks)
    features: List[str] = field(default_factory=lambda: ["cls", "avg", "cls+avg", "last4"])
    #: base learning rates (per 256 images; SGD + momentum, DINOv2-style) tried for every feature
    base_lrs: List[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3])
    epochs: int = 50
    warmup_epochs: float = 5.0
    batch_size: int = 1024

    def __post_init__(self):
        _check(0 <= self.warmup_epochs <= self.epochs, "sweep.warmup_epochs must be in [0, sweep.epochs]")
        _check(bool(self.features) and bool(self.base_lrs), "sweep.features and sweep.base_lrs must not be empty")
        _check(all(lr > 0 for lr in self.base_lrs), "sweep.base_lrs must be > 0")
        _check(self.epochs >= 1 and self.batch_size >= 1, "sweep.epochs and sweep.batch_size must be >= 1")


@dataclass
class LinprobeConfig:
    #: ``standard``: MAE's recipe (augmented images through the frozen model every epoch);
    #: ``fast``: cached features, a sweep of heads (see ``sweep``)
    mode: Literal["standard", "fast"] = "standard"
    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(batch_size=16384))
    #: standard mode: ``cls`` | ``avg`` | ``cls+avg`` | ``last<n>``; ``auto`` = cls, or avg without [CLS]
    feature: str = "auto"
    epochs: int = 90
    warmup_epochs: float = 10.0
    base_lr: float = 0.1
    lr: Optional[float] = None
    lr_batch_denominator: int = 256
    weight_decay: float = 0.0
    momentum: float = 0.9
    #: RandomResizedCrop + flip on the training images (MAE); off = the evaluation view
    augment: bool = True
    sweep: SweepConfig = field(default_factory=SweepConfig)
    precision: Precision = "auto"
    device: Device = "auto"
    seed: int = 0

    def __post_init__(self):
        _check(self.epochs >= 1, "epochs must be >= 1")
        _check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be in [0, epochs]")
        _check(self.base_lr > 0 and (self.lr is None or self.lr > 0), "base_lr / lr must be > 0")


@dataclass
class KnnConfig:
    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(batch_size=256))
    #: ``auto`` = [CLS] (DINO), or the mean patch token for models without one
    feature: str = "auto"
    #: neighbour counts; the first one gives top1/top5, all are reported (DINO: 10, 20, 100, 200)
    k: List[int] = field(default_factory=lambda: [20])
    temperature: float = 0.07
    precision: Precision = "auto"
    device: Device = "auto"

    def __post_init__(self):
        _check(bool(self.k) and all(k >= 1 for k in self.k), "k must be a non-empty list of positive integers")
        _check(self.temperature > 0, "temperature must be > 0")


@dataclass
class ZeroshotConfig:
    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(batch_size=256))
    #: ``openai`` (the 80 ImageNet prompts), ``simple`` (a short built-in set), or a text file (one per line, ``{}``)
    templates: str = "openai"
    #: a text file of class names, one per line (default: the dataset's folder names, ImageNet
    #: synsets mapped to readable names)
    classnames: Optional[str] = None
    #: text tower for a model without one (a timm CLIP image tower): ``open_clip:<arch>/<tag>``
    text_model: Optional[str] = None
    text_model_kwargs: Dict[str, Any] = field(default_factory=dict)
    #: teacher of an FD student (default: the run's own teacher spec and kwargs)
    teacher: Optional[str] = None
    teacher_kwargs: Dict[str, Any] = field(default_factory=dict)
    #: also evaluate the teacher next to an FD student
    with_teacher: bool = True
    precision: Precision = "auto"
    device: Device = "auto"


@dataclass
class SegprobeConfig:
    """Linear semantic segmentation probe (DINOv2's linear evaluation; :mod:`fdistill.eval.segmentation`)."""

    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(batch_size=16, interpolation="bilinear"))
    #: classes; null = from the dataset (``classes.txt`` of an ADE20K-style folder, 11 for synthetic)
    num_classes: Optional[int] = None
    #: ADE20K's convention: label 0 ("other") ignored, 1..K -> 0..K-1
    reduce_zero_label: bool = False
    epochs: int = 20
    #: stop after this many steps (null: ``epochs`` full epochs)
    max_steps: Optional[int] = None
    warmup_epochs: float = 1.0
    #: AdamW peak learning rate (warm-up + cosine, per step)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: training crops: RandomResizedCrop scale range (+ horizontal flip); evaluation resizes the whole image
    scale: List[float] = field(default_factory=lambda: [0.5, 1.0])
    #: stop after this many optimizer steps in a row with a non-finite loss (each is skipped)
    max_nonfinite: int = 20
    precision: Precision = "auto"
    device: Device = "auto"
    seed: int = 0

    def __post_init__(self):
        _check(self.num_classes is None or self.num_classes >= 2, "num_classes must be >= 2")
        _check(self.max_nonfinite >= 1, "max_nonfinite must be >= 1")
        _check(self.epochs >= 1, "epochs must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        _check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be in [0, epochs]")
        _check(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0")
        _check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
               f"scale must be [min, max] with 0 < min <= max <= 1, got {self.scale}")


# -- derived values ----------------------------------------------------------------------------------
def resolve_finetune_lr(optim: FinetuneOptimConfig, global_batch: int) -> Tuple[float, float, float]:
    """(peak lr, warm-up start lr, final lr) for ``global_batch`` images per step: the official
    ``main_finetune.py`` scales all three by ``global_batch / 512``; an absolute ``optim.lr``
    takes them as given."""
    if optim.lr is not None:
        return optim.lr, optim.warmup_lr, optim.min_lr
    s = global_batch / optim.lr_batch_denominator
    return optim.base_lr * s, optim.warmup_lr * s, optim.min_lr * s
