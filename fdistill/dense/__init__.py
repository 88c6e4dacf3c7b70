"""Building blocks of the dense benchmarks (issue 14): multi-level backbone features for decoders,
UPerNet on any backbone, the NYUv2 depth metrics. The commands (segment, detect, depth) are not
built yet."""
from .depth_metrics import DepthMetrics
from .pyramid import DenseError, ViTPyramid, default_block_indices, intermediate_maps
from .upernet import UperNetSegmenter

__all__ = ["DenseError", "DepthMetrics", "UperNetSegmenter", "ViTPyramid", "default_block_indices",
           "intermediate_maps"]
