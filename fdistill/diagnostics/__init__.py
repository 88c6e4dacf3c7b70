"""Diagnostics of the paper's Section 4: why FD helps.

* :func:`attention_distance` / :class:`AttentionDistanceMeter`: per-head mean attention distance
  (Figure 3: after FD, deep-layer heads stay diverse instead of collapsing);
* :class:`AttentionMapMeter`: per-layer attention maps averaged over heads and images (Figure 4:
  more diagonal, fewer vertical-bar patterns);
* :func:`filter_normalized_direction` / :func:`loss_landscape`: 1-D loss landscapes along
  filter-normalised random directions (Figure 5: flatter after FD);
* :func:`capture_attention`: streams per-layer attention probabilities out of timm (ViT-like and
  Swin's windowed attention), FD-student, open_clip and Hugging Face models.

The ``fdistill diagnose`` commands (:mod:`fdistill.diagnostics.commands`) run them on any model
:func:`fdistill.models.loading.load_model` loads and draw the paper's figures.
"""
from .capture import AttentionCapture, AttentionCaptureError, WindowGeometry, capture_attention
from .distance import DEFAULT_RENORMALIZE, AttentionDistanceMeter, attention_distance, grid_distances
from .landscape import LandscapeResult, alpha_grid, evaluate_classifier, filter_normalized_direction, loss_landscape
from .maps import AttentionMapMeter, default_layers, mean_attention_map, select_layers

__all__ = [
    "attention_distance", "AttentionDistanceMeter", "grid_distances", "DEFAULT_RENORMALIZE",
    "AttentionMapMeter", "mean_attention_map", "select_layers", "default_layers",
    "filter_normalized_direction", "loss_landscape", "evaluate_classifier", "alpha_grid", "LandscapeResult",
    "capture_attention", "AttentionCapture", "AttentionCaptureError", "WindowGeometry",
]
