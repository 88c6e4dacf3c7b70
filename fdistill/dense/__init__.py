"""Building blocks of the dense benchmarks (issue 14): multi-level backbone features for decoders."""
from .pyramid import DenseError, ViTPyramid, default_block_indices, intermediate_maps

__all__ = ["DenseError", "ViTPyramid", "default_block_indices", "intermediate_maps"]
