"""Building blocks of the dense benchmarks (issue 14): multi-level backbone features for decoders,
the NYUv2 depth metrics. The commands (segment, detect, depth) are not built yet."""
from .depth_metrics import DepthMetrics
from .pyramid import DenseError, ViTPyramid, default_block_indices, intermediate_maps

__all__ = ["DenseError", "DepthMetrics", "ViTPyramid", "default_block_indices", "intermediate_maps"]
