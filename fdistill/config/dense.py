"""Config schemas of the dense fine-tuning benchmarks (``fdistill segment | depth | detect``, the
paper's Table 1 columns beyond ImageNet; Sec. 5). Schemas only: what builds from them lives in
:mod:`fdistill.dense.commands`.

The defaults are the paper's settings as the issue of record states them (ADE20K: UPerNet, AdamW
4e-4, weight decay 0.05, layer decay 0.65, drop path 0.2, 80k iterations at batch 32, 512 crops;
NYUv2: 480 crops, batch 24, max lr 5e-5 one-cycle, 25 epochs; COCO: Mask R-CNN 1x, multi-scale
480-800 / 1333, window 14 + one global block). The shipped recipes (``configs/segment``,
``configs/depth``, ``configs/detect``) comment each choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

from .core import ConfigError

__all__ = ["DenseOptimConfig", "SegmentDataConfig", "SegmentModelConfig", "SegmentConfig",
           "DepthDataConfig", "DepthModelConfig", "DepthConfig", "DetectDataConfig", "DetectModelConfig",
           "DetectConfig"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cuda", "cpu"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DenseOptimConfig:
    """AdamW over layer-decay groups (BEiT Sec. 2.5), per-step schedule with linear warm-up."""

    lr: float = 4e-4
    weight_decay: float = 0.05
    #: lr scale of layer i = layer_decay ** (L + 1 - i); the decoder trains at lr (id L + 1)
    layer_decay: float = 0.65
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    #: ``poly`` (power ``power``; mmsegmentation / BEiT ADE20K), ``cosine``, ``onecycle`` (GLPDepth's
    #: NYUv2 one-cycle: up from warmup_lr to lr over the first half of the steps, or over
    #: ``warmup_steps`` when set, then cosine down to min_lr), ``step`` (Mask R-CNN 1x: x0.1 at each
    #: of ``milestones``, in epochs)
    schedule: Literal["poly", "cosine", "onecycle", "step"] = "poly"
    power: float = 1.0
    milestones: List[float] = field(default_factory=lambda: [8.0, 11.0])
    #: linear warm-up from warmup_lr (optimizer steps)
    warmup_steps: int = 1500
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    #: max global gradient norm; 0 turns clipping off
    clip_grad: float = 0.0
    #: weight decay on relative-position-bias tables (BEiT's dense recipes: no)
    decay_rel_pos_bias: bool = False

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(0 < self.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        _check(self.weight_decay >= 0 and self.clip_grad >= 0, "optim.weight_decay and optim.clip_grad must be >= 0")
        _check(self.warmup_steps >= 0 and self.warmup_lr >= 0 and self.min_lr >= 0,
               "optim.warmup_steps, optim.warmup_lr and optim.min_lr must be >= 0")
        _check(self.power > 0, f"optim.power must be > 0, got {self.power}")
        _check(all(m > 0 for m in self.milestones), f"optim.milestones must be > 0, got {self.milestones}")


@dataclass
class _DenseRun:
    """What every dense command shares: length, evaluation, checkpoints, precision."""

    epochs: int = 100
    #: stop after this many optimizer steps (iteration-based recipes: ADE20K's 80k); the schedule spans them
    max_steps: Optional[int] = None
    #: evaluate (and checkpoint) every this many epochs, and after the last
    eval_interval: int = 1
    ckpt_interval: Optional[int] = None
    keep_last: int = 2
    max_nonfinite: int = 20
    tensorboard: bool = False
    log_interval: int = 50
    #: validation images drawn in OUTPUT/predictions.png (image, ground truth, prediction)
    figure_images: int = 4
    precision: Precision = "auto"
    device: Device = "auto"
    seed: int = 0

    def __post_init__(self):
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        _check(self.eval_interval >= 1 and self.log_interval >= 1, "eval_interval and log_interval must be >= 1")
        _check(self.ckpt_interval is None or self.ckpt_interval >= 1, "ckpt_interval must be >= 1")
        _check(self.keep_last >= 1 and self.max_nonfinite >= 1, "keep_last and max_nonfinite must be >= 1")
        _check(self.figure_images >= 0, "figure_images must be >= 0")


def _check_data(d) -> None:
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(d.crop_size >= 1, f"data.crop_size must be >= 1, got {d.crop_size}")


# -- ADE20K semantic segmentation ---------------------------------------------------------------------
@dataclass
class SegmentDataConfig:
    #: images per process per step
    batch_size: int = 32
    num_workers: int = 8
    #: training crops (and the sliding window) are crop_size x crop_size
    crop_size: int = 512
    #: the (short, long) box an image is rescaled to fit, keeping its aspect ratio (mmsegmentation's
    #: ADE20K ``scale=(2048, 512)``); training multiplies it by a ratio from ``ratio_range``
    img_scale: Tuple[int, int] = (512, 2048)
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    #: brightness / contrast / saturation / hue jitter (SSD's photometric distortion, as mmsegmentation)
    photometric: bool = True
    #: stride of the sliding-window inference (mmsegmentation's BEiT ADE20K: 341 for 512 crops)
    slide_stride: int = 341

    def __post_init__(self):
        _check_data(self)
        _check(min(self.img_scale) >= 1, f"data.img_scale must be positive, got {self.img_scale}")
        _check(0 < self.ratio_range[0] <= self.ratio_range[1], f"data.ratio_range must be 0 < min <= max, got {self.ratio_range}")
        _check(1 <= self.slide_stride <= self.crop_size, "data.slide_stride must be in [1, crop_size]")


@dataclass
class SegmentModelConfig:
    drop_path: float = 0.2
    #: ViT blocks (0-based) fed to the pyramid; null = BEiT's 4/6/8/12 of 12 (and the same fractions)
    indices: Optional[List[int]] = None
    #: UPerNet width (BEiT's ADE20K: 512) and the auxiliary FCN head's (256)
    channels: int = 512
    aux_channels: int = 256
    #: weight of the auxiliary head's loss (mmsegmentation: 0.4); 0 drops the head
    aux_weight: float = 0.4

    def __post_init__(self):
        _check(0 <= self.drop_path < 1, f"model.drop_path must be in [0, 1), got {self.drop_path}")
        _check(self.channels >= 1 and self.aux_channels >= 1, "model.channels and model.aux_channels must be >= 1")
        _check(self.aux_weight >= 0, "model.aux_weight must be >= 0")


@dataclass
class SegmentConfig(_DenseRun):
    data: SegmentDataConfig = field(default_factory=SegmentDataConfig)
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    optim: DenseOptimConfig = field(default_factory=DenseOptimConfig)
    #: classes; null = from the dataset (classes.txt of an ADE20K-style folder, 11 for synthetic)
    num_classes: Optional[int] = None
    #: ADE20K's convention: label 0 ("other") ignored, 1..K -> 0..K-1
    reduce_zero_label: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(self.num_classes is None or self.num_classes >= 2, "num_classes must be >= 2")


# -- NYUv2 depth --------------------------------------------------------------------------------------
@dataclass
class DepthDataConfig:
    batch_size: int = 24
    num_workers: int = 8
    #: random training crops crop_size x crop_size (+ flip); evaluation takes the whole image
    crop_size: int = 480
    flip: bool = True
    #: metres; deeper or zero ground truth is invalid
    max_depth: float = 10.0
    min_depth: float = 1e-3
    #: evaluate on the Eigen crop (NYUv2's 640x480 test images; other sizes: its fractions)
    eigen_crop: bool = True

    def __post_init__(self):
        _check_data(self)
        _check(0 <= self.min_depth < self.max_depth, "data.min_depth must be in [0, max_depth)")


@dataclass
class DepthModelConfig:
    drop_path: float = 0.1
    indices: Optional[List[int]] = None
    #: decoder width (DPT: 256)
    features: int = 256
    #: SiLog's variance weight (BTS / GLPDepth: 0.85)
    silog_lambda: float = 0.85

    def __post_init__(self):
        _check(0 <= self.drop_path < 1, f"model.drop_path must be in [0, 1), got {self.drop_path}")
        _check(self.features >= 1, "model.features must be >= 1")
        _check(0 <= self.silog_lambda <= 1, "model.silog_lambda must be in [0, 1]")


def _depth_optim() -> DenseOptimConfig:
    return DenseOptimConfig(lr=5e-5, weight_decay=0.01, layer_decay=0.9, schedule="onecycle", warmup_steps=0,
                            warmup_lr=5e-6, min_lr=5e-7, clip_grad=0.0)


@dataclass
class DepthConfig(_DenseRun):
    data: DepthDataConfig = field(default_factory=DepthDataConfig)
    model: DepthModelConfig = field(default_factory=DepthModelConfig)
    optim: DenseOptimConfig = field(default_factory=_depth_optim)
    epochs: int = 25


# -- COCO detection -----------------------------------------------------------------------------------
@dataclass
class DetectDataConfig:
    batch_size: int = 16
    num_workers: int = 8
    #: multi-scale training: shorter side drawn from [min, max] in steps of ``size_step``, longer side <= max_size
    train_sizes: Tuple[int, int] = (480, 800)
    size_step: int = 32
    test_size: int = 800
    max_size: int = 1333
    #: the largest input (resized, then padded to a multiple of 32) the global blocks' relative
    #: position tables are sized for: max_size rounded up to 32 (larger inputs clamp the offsets)
    crop_size: int = 1344
    flip: bool = True

    def __post_init__(self):
        _check_data(self)
        _check(0 < self.train_sizes[0] <= self.train_sizes[1], "data.train_sizes must be 0 < min <= max")
        _check(self.size_step >= 1 and self.test_size >= 1 and self.max_size >= self.test_size,
               "data.size_step, data.test_size must be >= 1 and data.max_size >= data.test_size")


@dataclass
class DetectModelConfig:
    drop_path: float = 0.1
    #: window attention in every block (the paper: window 14) and one added global block on top
    window_size: int = 14
    add_global_block: bool = True
    #: existing blocks (0-based) kept global (ViTDet: 2, 5, 8, 11; the paper: none)
    global_blocks: List[int] = field(default_factory=list)
    #: width of the simple feature pyramid (ViTDet: 256)
    fpn_channels: int = 256
    #: one anchor size per pyramid level, strides 4 ... 64, in resized-image pixels (ViTDet: 32 ... 512)
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    #: torchvision Mask R-CNN's sampling (its defaults): RPN proposals kept after NMS in training /
    #: testing, RoIs per image for the box head's loss, detections kept per image
    proposals_train: int = 2000
    proposals_test: int = 1000
    rois_per_image: int = 512
    detections_per_image: int = 100

    def __post_init__(self):
        _check(0 <= self.drop_path < 1, f"model.drop_path must be in [0, 1), got {self.drop_path}")
        _check(self.window_size >= 1 and self.fpn_channels >= 1, "model.window_size and model.fpn_channels must be >= 1")
        _check(len(self.anchor_sizes) == 5 and min(self.anchor_sizes) >= 1,
               f"model.anchor_sizes must be 5 positive sizes (strides 4 ... 64), got {self.anchor_sizes}")
        _check(min(self.proposals_train, self.proposals_test, self.rois_per_image, self.detections_per_image) >= 1,
               "model.proposals_train, proposals_test, rois_per_image, detections_per_image must be >= 1")

    def maskrcnn_kwargs(self) -> dict:
        """The torchvision ``MaskRCNN`` arguments these fields set."""
        return dict(rpn_pre_nms_top_n_train=self.proposals_train, rpn_post_nms_top_n_train=self.proposals_train,
                    rpn_pre_nms_top_n_test=self.proposals_test, rpn_post_nms_top_n_test=self.proposals_test,
                    box_batch_size_per_image=self.rois_per_image, box_detections_per_img=self.detections_per_image)


def _detect_optim() -> DenseOptimConfig:
    return DenseOptimConfig(lr=1e-4, weight_decay=0.1, layer_decay=0.7, schedule="step", warmup_steps=250,
                            warmup_lr=1e-7, clip_grad=0.0)


@dataclass
class DetectConfig(_DenseRun):
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    optim: DenseOptimConfig = field(default_factory=_detect_optim)
    epochs: int = 12
