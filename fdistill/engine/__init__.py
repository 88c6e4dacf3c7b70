"""Distillation runs: the training loop, checkpoints, resume, distributed helpers, export.

    from fdistill.config import build_config
    from fdistill.config.distill import DistillConfig
    from fdistill.engine import distill

    cfg = build_config(DistillConfig, "configs/distill/tiny_cpu.yaml", ["train.output=runs/tiny"])
    result = distill(cfg)              # resumes from runs/tiny/checkpoints if there are any
"""
from .checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from .distill import RunResult, distill
from .resume import check_resume_compatible
from .errors import RunError

__all__ = ["distill", "RunResult", "RunError", "check_resume_compatible", "save_checkpoint", "load_checkpoint",
           "latest_valid_checkpoint"]
