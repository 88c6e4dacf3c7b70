"""The paper's dense benchmarks (Sec. 5, Table 1): fine-tuning a backbone inside a dense model, on
the one training engine, for any backbone fdistill loads.

- ``fdistill segment``: UPerNet on ADE20K (:mod:`.segment`, :mod:`.upernet`, :mod:`.pyramid`);
- ``fdistill depth``: a DPT decoder on NYUv2 (:mod:`.depth`, :mod:`.depth_head`, :mod:`.depth_loss`,
  :mod:`.depth_metrics`);
- ``fdistill detect``: the ViTDet-style Mask R-CNN on COCO and the COCO API's AP (:mod:`.detect`,
  :mod:`.vitdet`, :mod:`.maskrcnn`, :mod:`.coco_eval`).

Each task module has its builder beside its loop (``build_segmenter``, ``build_depth_estimator``,
``build_detector``: a recipe + a loaded model -> the trainable dense model) and its fine-tuning
function (``finetune_segmentation``, ``finetune_depth``, ``finetune_detection``).

What they share: :mod:`.backbone` (any model -> a trainable backbone), :mod:`.common` (optimizer,
schedule, the engine's run), :mod:`.sliding` (sliding-window inference), :mod:`.commands` (the CLI's
library functions).
"""
from .coco_eval import CocoEvaluator, coco_evaluate
from .depth_head import DepthEstimator
from .depth_loss import SiLogLoss
from .depth_metrics import DepthMetrics
from .commands import run_depth, run_detect, run_segment
from .maskrcnn import build_maskrcnn
from .pyramid import DenseError, ViTPyramid, default_block_indices, intermediate_maps
from .upernet import UperNetSegmenter
from .vitdet import SimpleFeaturePyramid, WindowedViT

__all__ = ["CocoEvaluator", "DenseError", "DepthEstimator", "DepthMetrics", "SiLogLoss", "SimpleFeaturePyramid",
           "UperNetSegmenter", "ViTPyramid", "WindowedViT", "build_maskrcnn", "coco_evaluate",
           "default_block_indices", "intermediate_maps", "run_depth", "run_detect", "run_segment"]
