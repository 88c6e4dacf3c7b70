"""Losses: the feature-distillation objective (paper Sec. 3)."""
from .feature_distill import (
    GRANULARITIES,
    NORMS,
    feature_distill_loss,
    feature_distill_loss_parts,
    normalize_target,
)

__all__ = ["feature_distill_loss", "feature_distill_loss_parts", "normalize_target", "NORMS", "GRANULARITIES"]
