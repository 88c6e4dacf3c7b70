"""Data for feature distillation: image folders, WebDataset shards, the built-in ``synthetic``
dataset; the FD view; resumable, reproducible loaders. See docs/data.md."""
from .errors import DataError
from .folder import IMG_EXTENSIONS, ImageFolderDataset
from .loader import (DistillDataLoader, DistillDataset, build_distill_dataset, build_distill_loader,
                     collate_distill, default_num_workers)
from .named import build_classification_dataset
from .sampler import ResumableDistributedSampler
from .seeding import sample_seed, seeded
from .shards import WebShardDataset
from .synthetic import SHAPES, SyntheticShapes
from .transforms import DistillView, distill_transform, eval_transform

__all__ = [
    "DataError", "ImageFolderDataset", "IMG_EXTENSIONS", "SyntheticShapes", "SHAPES", "WebShardDataset",
    "DistillDataset", "DistillDataLoader", "build_distill_dataset", "build_distill_loader", "collate_distill",
    "default_num_workers", "build_classification_dataset", "ResumableDistributedSampler", "distill_transform",
    "eval_transform", "DistillView", "sample_seed", "seeded",
]
