"""The benchmark's named configurations (issue 7): which teacher(s), student, input and batch.

Teachers are timm ViTs with random weights (``pretrained=False``): speed does not depend on
the weights, and no model hub is needed. A config with ``teachers`` (issue 15) distils several
teachers at once through :class:`fdistill.multi.MultiTeacherDistiller`: every teacher sees the
batch, the student runs once, one linear head (FD's projector) per teacher, FD's loss per
teacher (standardised targets, smooth-L1), summed with the teachers' weights. The student follows the CLIP ViT-B recipe
(``configs/distill/clip_vit_base_300ep.yaml``): shared relative position bias, layer scale
0.1, drop path 0.2, [CLS] target weight 1, gradient clipping at 3.0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Tuple


@dataclass(frozen=True)
class BenchTeacher:
    """One teacher of a several-teacher config."""

    name: str                         # its key: head, loss and log name
    model: str                        # timm model name (random init)
    kwargs: Dict = field(default_factory=dict)
    weight: float = 1.0               # its loss weight


@dataclass(frozen=True)
class BenchConfig:
    name: str
    description: str
    teacher: str                      # timm model name (random init); with ``teachers``, their names joined by " + "
    student_arch: str                 # fdistill STUDENT_SIZES key
    img_size: int
    patch_size: int
    batch: int
    precision: str                    # fp32 | bf16 (autocast)
    device: str                       # cpu | cuda
    teacher_kwargs: Dict = field(default_factory=dict)
    student_kwargs: Dict = field(default_factory=dict)
    drop_path_rate: float = 0.2
    cls_weight: float = 1.0
    clip_grad: float = 3.0
    teachers: Tuple[BenchTeacher, ...] = ()  # several teachers (MultiTeacherDistiller); empty: ``teacher`` alone

    @property
    def multi(self) -> bool:
        return bool(self.teachers)

    def replace(self, **kw) -> "BenchConfig":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


CONFIGS: Dict[str, BenchConfig] = {c.name: c for c in [
    BenchConfig("tiny", "tiny ViT -> tiny ViT at 32 px (tests: seconds)", "vit_tiny_patch16_224", "vit_tiny",
                img_size=32, patch_size=8, batch=4, precision="fp32", device="cpu",
                teacher_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3),
                student_kwargs=dict(embed_dim=32, depth=2, num_heads=2)),
    BenchConfig("cpu-vits-fp32", "ViT-S/16 -> ViT-S/16 at 224, batch 16, fp32", "vit_small_patch16_224", "vit_small",
                img_size=224, patch_size=16, batch=16, precision="fp32", device="cpu"),
    BenchConfig("cpu-vits-bf16", "ViT-S/16 -> ViT-S/16 at 224, batch 16, bf16 autocast", "vit_small_patch16_224",
                "vit_small", img_size=224, patch_size=16, batch=16, precision="bf16", device="cpu"),
    BenchConfig("gpu-vitb-bf16", "ViT-B/16 -> ViT-B/16 at 224, batch 128, bf16 autocast", "vit_base_patch16_224",
                "vit_base", img_size=224, patch_size=16, batch=128, precision="bf16", device="cuda"),
    BenchConfig("gpu-vitl-bf16", "CLIP ViT-L/14 -> ViT-L/14 at 224, batch 128, bf16 autocast (use --grad-ckpt)",
                "vit_large_patch14_clip_224", "vit_large", img_size=224, patch_size=14, batch=128, precision="bf16",
                device="cuda", drop_path_rate=0.3),
    BenchConfig("tiny-multi", "two tiny ViTs (48 and 64 wide) -> tiny ViT at 32 px (tests: seconds)",
                "vit_tiny_patch16_224 + vit_tiny_patch16_224", "vit_tiny", img_size=32, patch_size=8, batch=4,
                precision="fp32", device="cpu", student_kwargs=dict(embed_dim=32, depth=2, num_heads=2),
                teachers=(BenchTeacher("a", "vit_tiny_patch16_224",
                                       dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)),
                          BenchTeacher("b", "vit_tiny_patch16_224",
                                       dict(img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2),
                                       weight=0.5))),
    BenchConfig("cpu-multi-vits-fp32", "ViT-S/16 + ViT-Ti/16 -> ViT-S/16 at 224, batch 16, fp32 (two teachers)",
                "vit_small_patch16_224 + vit_tiny_patch16_224", "vit_small", img_size=224, patch_size=16,
                batch=16, precision="fp32", device="cpu",
                teachers=(BenchTeacher("vits", "vit_small_patch16_224"),
                          BenchTeacher("vitt", "vit_tiny_patch16_224"))),
]}


def get_config(name: str) -> BenchConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise SystemExit(f"unknown --config {name!r}; choose from {', '.join(CONFIGS)}") from None
